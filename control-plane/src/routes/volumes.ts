import { createRoute, z } from "@hono/zod-openapi";
import { ARCHIVE_PATH, CreateVolumeRequest, MAX_VOLUME_GB, Volume } from "@offshoot/shared";
import {
  ARCHIVE_MAX_BYTES,
  archiveForHost,
  createVolume,
  createVolumeFromArchive,
  deleteVolume,
  getVolume,
  listVolumes,
} from "../services/volumes.ts";
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
      method: "post",
      path: "/volumes/from-archive",
      summary: "Create a volume from a tar.gz",
      description: `The body is a gzip'd tar (application/gzip), at most VOLUME_ARCHIVE_MAX_BYTES (default ${ARCHIVE_MAX_BYTES}) bytes, read as it arrives; its files are unpacked into a new volume of \`size_gb\` GiB (400 if they do not fit, or if the body is not gzip or is too large). Entries are unpacked confined to the volume: \`../\` names and absolute paths stay inside it, links out of it are refused.`,
      security,
      request: {
        query: z.object({
          name: z.string().min(1).max(255),
          size_gb: z.coerce.number().int().min(1).max(MAX_VOLUME_GB),
          id: z.string().optional(),
        }),
      },
      responses: {
        201: { description: "Created", content: json(Volume) },
        ...errorsFor(400, 401, 409, 503, 504),
      },
    }),
    async (c) => {
      const q = c.req.valid("query");
      const req = CreateVolumeRequest.parse({
        name: q.name,
        size_gb: q.size_gb,
        ...(q.id ? { id: q.id } : {}),
        tags: tagFilter(c.req.queries()),
      });
      return c.json(
        await createVolumeFromArchive(
          c.var.services,
          c.var.tenantId,
          req,
          c.req.raw.body,
          c.var.services.env.VOLUME_ARCHIVE_MAX_BYTES,
        ),
        201,
      );
    },
  );

  // The host's side: its agent fetches an archive it was told to unpack (host token, checked
  // by app.ts's hostAuthed).
  app.get(ARCHIVE_PATH, async (c) => {
    const chunks = await archiveForHost(c.var.services, c.get("agentHost").id, c.req.param("id"));
    if (!chunks)
      return c.json({ code: "not_found", message: "no such archive for this host" }, 404);
    const iterator = chunks[Symbol.asyncIterator]();
    const stream = new ReadableStream<Uint8Array>({
      async pull(controller) {
        const next = await iterator.next();
        if (next.done) controller.close();
        else controller.enqueue(new Uint8Array(next.value));
      },
    });
    return new Response(stream, { headers: { "content-type": "application/gzip" } });
  });

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
