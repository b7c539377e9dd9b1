import { createRoute, z } from "@hono/zod-openapi";
import { CreateImageRequest, Image } from "@offshoot/shared";
import { deleteImage, getImage, listImages, pullImage } from "../services/images.ts";
import { errorsFor, json, type Router, security } from "./common.ts";

const NameParam = z.object({
  name: z.string().openapi({
    param: { name: "name", in: "path" },
    description: "URL-encoded image name, e.g. docker.io%2Flibrary%2Falpine%3Alatest",
  }),
});

/** `tags[key]=value` query parameters (deepObject), as a record. */
export function tagFilter(queries: Record<string, string[]>): Record<string, string> {
  const tags: Record<string, string> = {};
  for (const [k, v] of Object.entries(queries)) {
    const m = /^tags\[(.+)\]$/.exec(k);
    if (m?.[1] && v[0] !== undefined) tags[m[1]] = v[0];
  }
  return tags;
}

export function registerImageRoutes(app: Router) {
  app.openapi(
    createRoute({
      method: "get",
      path: "/images",
      summary: "List images",
      description:
        "The tenant's images (pulled with POST /images) and the images its hosts imported at start (shared by every tenant, with no tags). `tags[key]=value` keeps images having every tag given.",
      security,
      responses: {
        200: { description: "Images", content: json(z.array(Image)) },
        ...errorsFor(401),
      },
    }),
    async (c) =>
      c.json(await listImages(c.var.services, c.var.tenantId, tagFilter(c.req.queries())), 200),
  );

  app.openapi(
    createRoute({
      method: "post",
      path: "/images",
      summary: "Pull and convert an OCI image",
      description:
        "Answers 202 at once; the image's `status` then moves pending → pulling → converting → ready, or to failed with `error`. Asking again for a name being pulled joins that pull (409 if with other credentials); asking for a ready or failed one pulls it again (a moved tag is followed). `credentials` go to the pulling host for this pull only and are never stored or logged: a pull interrupted by an agent restart fails and must be asked for again with them.",
      security,
      request: { body: { content: json(CreateImageRequest), required: true } },
      responses: {
        202: { description: "Pull started (or joined)", content: json(Image) },
        ...errorsFor(400, 401, 409, 503),
      },
    }),
    async (c) => c.json(await pullImage(c.var.services, c.var.tenantId, c.req.valid("json")), 202),
  );

  app.openapi(
    createRoute({
      method: "get",
      path: "/images/{name}",
      summary: "Get an image",
      security,
      request: { params: NameParam },
      responses: {
        200: { description: "The image", content: json(Image) },
        ...errorsFor(401, 404),
      },
    }),
    async (c) =>
      c.json(await getImage(c.var.services, c.var.tenantId, c.req.valid("param").name), 200),
  );

  app.openapi(
    createRoute({
      method: "delete",
      path: "/images/{name}",
      summary: "Delete an image",
      description:
        "Removes the tenant's image. 409 while an instance made from it exists, and for images the hosts imported. Hosts keep the layers they pulled as a cache.",
      security,
      request: { params: NameParam },
      responses: {
        204: { description: "Deleted" },
        ...errorsFor(401, 404, 409),
      },
    }),
    async (c) => {
      await deleteImage(c.var.services, c.var.tenantId, c.req.valid("param").name);
      return c.body(null, 204);
    },
  );
}
