import { createRoute, z } from "@hono/zod-openapi";
import { CreateVolumeRequest, Volume } from "@offshoot/shared";
import { createVolume, deleteVolume, getVolume, listVolumes } from "../services/volumes.ts";
import { errorsFor, json, type Router, security } from "./common.ts";
import { tagFilter } from "./images.ts";

const IdParam = z.object({
  id: z.string().openapi({ param: { name: "id", in: "path" }, example: "vol-data-1" }),
});

export function registerVolumeRoutes(app: Router) {
  app.openapi(
    createRoute({
      method: "get",
      path: "/volumes",
      summary: "List volumes",
      description: "The tenant's volumes; `tags[key]=value` keeps volumes having every tag given.",
      security,
      responses: {
        200: { description: "Volumes", content: json(z.array(Volume)) },
        ...errorsFor(401),
      },
    }),
    async (c) =>
      c.json(await listVolumes(c.var.services, c.var.tenantId, tagFilter(c.req.queries())), 200),
  );

  app.openapi(
    createRoute({
      method: "post",
      path: "/volumes",
      summary: "Create a volume",
      description:
        "An empty ext4 disk of `size_gb` GiB on one host, made before the answer. Instances that attach it are placed on that host.",
      security,
      request: { body: { content: json(CreateVolumeRequest), required: true } },
      responses: {
        201: { description: "Created", content: json(Volume) },
        ...errorsFor(400, 401, 409, 503, 504),
      },
    }),
    async (c) =>
      c.json(await createVolume(c.var.services, c.var.tenantId, c.req.valid("json")), 201),
  );

  app.openapi(
    createRoute({
      method: "get",
      path: "/volumes/{id}",
      summary: "Get a volume",
      security,
      request: { params: IdParam },
      responses: {
        200: { description: "The volume", content: json(Volume) },
        ...errorsFor(401, 404),
      },
    }),
    async (c) =>
      c.json(await getVolume(c.var.services, c.var.tenantId, c.req.valid("param").id), 200),
  );

  app.openapi(
    createRoute({
      method: "delete",
      path: "/volumes/{id}",
      summary: "Delete a volume",
      description: "409 while an instance attaches it. Its data is gone.",
      security,
      request: { params: IdParam },
      responses: {
        204: { description: "Deleted" },
        ...errorsFor(401, 404, 409),
      },
    }),
    async (c) => {
      await deleteVolume(c.var.services, c.var.tenantId, c.req.valid("param").id);
      return c.body(null, 204);
    },
  );
}
