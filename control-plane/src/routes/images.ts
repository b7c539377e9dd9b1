import { createRoute, z } from "@hono/zod-openapi";
import { Image, NotSupportedError } from "@offshoot/shared";
import { hostGrace } from "../services/context.ts";
import { getImage, listImages } from "../services/images.ts";
import { errorsFor, json, type Router, security } from "./common.ts";

const NameParam = z.object({
  name: z.string().openapi({
    param: { name: "name", in: "path" },
    description: "URL-encoded image name, e.g. docker.io%2Flibrary%2Falpine%3Alatest",
  }),
});
const PULL_MESSAGE =
  "pulling images from registries is not supported yet; hosts import OCI image layouts (AGENT_IMAGES)";

export function registerImageRoutes(app: Router) {
  app.openapi(
    createRoute({
      method: "get",
      path: "/images",
      summary: "List the images connected hosts can boot",
      description: "Images carry no tags here: any `tags[key]=value` filter matches none.",
      security,
      responses: {
        200: { description: "Images", content: json(z.array(Image)) },
        ...errorsFor(401),
      },
    }),
    async (c) => {
      const filtered = Object.keys(c.req.queries()).some((k) => /^tags\[.*\]$/.test(k));
      const s = c.var.services;
      return c.json(filtered ? [] : await listImages(s.db, hostGrace(s)), 200);
    },
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
    async (c) => {
      const s = c.var.services;
      return c.json(await getImage(s.db, hostGrace(s), c.req.valid("param").name), 200);
    },
  );

  for (const [method, path] of [
    ["post", "/images"],
    ["delete", "/images/{name}"],
  ] as const) {
    app.openapi(
      createRoute({
        method,
        path,
        summary:
          method === "post"
            ? "Pull an image (not supported yet)"
            : "Delete an image (not supported yet)",
        security,
        ...(method === "delete" ? { request: { params: NameParam } } : {}),
        responses: errorsFor(401, 501),
      }),
      () => {
        throw new NotSupportedError(PULL_MESSAGE);
      },
    );
  }
}
