import { createRoute, z } from "@hono/zod-openapi";
import {
  CreateSnapshotRequest,
  ForkSnapshotRequest,
  RestoreSnapshotRequest,
  SetSnapshotScheduleRequest,
  Snapshot,
  SnapshotKind,
  SnapshotSchedule,
} from "@offshoot/shared";
import { deleteSchedule, getSchedule, setSchedule } from "../services/schedules.ts";
import {
  createSnapshot,
  deleteSnapshot,
  forkSnapshot,
  getSnapshot,
  listSnapshots,
  restoreSnapshot,
} from "../services/snapshots.ts";
import { errorsFor, IdParam, json, type Router, security } from "./common.ts";
import { tagFilter } from "./images.ts";
import { instanceOk } from "./instances/common.ts";

const SnapshotParam = z.object({
  snapshotId: z.string().openapi({ param: { name: "snapshotId", in: "path" } }),
});

export function registerSnapshotRoutes(app: Router) {
  app.openapi(
    createRoute({
      method: "post",
      path: "/instances/{id}/snapshots",
      summary: "Create a snapshot of an instance",
      description:
        "Standby: of a Running instance (paused while its memory and disk are captured, then running again) or a Standby one (sharing its snapshot's files copy-on-write). Stopped: the disk of a Stopped instance. The snapshot stays on the instance's host; forks from it are placed there.",
      security,
      request: { params: IdParam, body: { content: json(CreateSnapshotRequest), required: true } },
      responses: {
        201: { description: "Snapshot created", content: json(Snapshot) },
        ...errorsFor(400, 401, 404, 409, 501, 503, 504),
      },
    }),
    async (c) =>
      c.json(
        await createSnapshot(
          c.var.services,
          c.var.tenantId,
          c.req.valid("param").id,
          c.req.valid("json"),
          c.var.call,
        ),
        201,
      ),
  );

  app.openapi(
    createRoute({
      method: "get",
      path: "/snapshots",
      summary: "List snapshots",
      description:
        "The tenant's snapshots, oldest first (at most 1,000); `tags[key]=value` keeps those having every tag given.",
      security,
      request: {
        query: z.object({
          source_instance_id: z.string().optional(),
          kind: SnapshotKind.optional(),
          name: z.string().optional(),
        }),
      },
      responses: {
        200: { description: "Snapshots", content: json(z.array(Snapshot)) },
        ...errorsFor(400, 401),
      },
    }),
    async (c) =>
      c.json(
        await listSnapshots(c.var.services, c.var.tenantId, {
          ...c.req.valid("query"),
          tags: tagFilter(c.req.queries()),
        }),
        200,
      ),
  );

  app.openapi(
    createRoute({
      method: "get",
      path: "/snapshots/{snapshotId}",
      summary: "Get a snapshot",
      security,
      request: { params: SnapshotParam },
      responses: {
        200: { description: "The snapshot", content: json(Snapshot) },
        ...errorsFor(401, 404),
      },
    }),
    async (c) =>
      c.json(
        await getSnapshot(c.var.services, c.var.tenantId, c.req.valid("param").snapshotId),
        200,
      ),
  );

  app.openapi(
    createRoute({
      method: "delete",
      path: "/snapshots/{snapshotId}",
      summary: "Delete a snapshot",
      description:
        "Instances forked from it keep running and keep their files. 409 while a fork from it or a restore to it is in progress.",
      security,
      request: { params: SnapshotParam },
      responses: {
        204: { description: "Deleted" },
        ...errorsFor(401, 404, 409, 503, 504),
      },
    }),
    async (c) => {
      await deleteSnapshot(
        c.var.services,
        c.var.tenantId,
        c.req.valid("param").snapshotId,
        c.var.call,
      );
      return c.body(null, 204);
    },
  );

  app.openapi(
    createRoute({
      method: "post",
      path: "/snapshots/{snapshotId}/fork",
      summary: "Fork a new instance from a snapshot",
      description:
        "On the snapshot's host, with a new id, MAC, address and RNG seed. target_state defaults to Running for a Standby snapshot and Stopped for a Stopped one.",
      security,
      request: {
        params: SnapshotParam,
        body: { content: json(ForkSnapshotRequest), required: true },
      },
      responses: {
        201: instanceOk("Forked instance created"),
        ...errorsFor(400, 401, 404, 409, 501, 503, 504),
      },
    }),
    async (c) =>
      c.json(
        await forkSnapshot(
          c.var.services,
          c.var.tenantId,
          c.req.valid("param").snapshotId,
          c.req.valid("json"),
          c.var.call,
        ),
        201,
      ),
  );

  app.openapi(
    createRoute({
      method: "post",
      path: "/instances/{id}/snapshots/{snapshotId}/restore",
      summary: "Restore an instance from one of its snapshots, in place",
      description:
        "The instance (Stopped or Standby; 409 while Running) gets the snapshot's disk, and for a Standby snapshot its memory, keeping its id, name, MAC and address. target_state defaults to Running for a Standby snapshot and Stopped for a Stopped one.",
      security,
      request: {
        params: IdParam.extend(SnapshotParam.shape),
        body: { content: json(RestoreSnapshotRequest), required: true },
      },
      responses: {
        200: instanceOk("Instance restored from the snapshot"),
        ...errorsFor(400, 401, 404, 409, 501, 503, 504),
      },
    }),
    async (c) => {
      const { id, snapshotId } = c.req.valid("param");
      return c.json(
        await restoreSnapshot(
          c.var.services,
          c.var.tenantId,
          id,
          snapshotId,
          c.req.valid("json"),
          c.var.call,
        ),
        200,
      );
    },
  );
}

export function registerScheduleRoutes(app: Router) {
  app.openapi(
    createRoute({
      method: "get",
      path: "/instances/{id}/snapshot-schedule",
      summary: "Get an instance's snapshot schedule",
      security,
      request: { params: IdParam },
      responses: {
        200: { description: "The schedule", content: json(SnapshotSchedule) },
        ...errorsFor(401, 404),
      },
    }),
    async (c) =>
      c.json(await getSchedule(c.var.services, c.var.tenantId, c.req.valid("param").id), 200),
  );

  app.openapi(
    createRoute({
      method: "put",
      path: "/instances/{id}/snapshot-schedule",
      summary: "Create or replace an instance's snapshot schedule",
      description:
        "Each run takes a Standby snapshot of a Running or Standby instance (a brief pause) and a Stopped one of a Stopped instance, named `<name_prefix or scheduled>-<due time, UTC>`, then deletes the instance's scheduled snapshots beyond retention.max_count (newest kept) or older than retention.max_age. Exactly one run per due time across all control-plane replicas; runs missed while none was up are made up by one run. interval is at least 1m; changing it starts a new cadence (first run one interval from now), changing only the rest keeps the next run.",
      security,
      request: {
        params: IdParam,
        body: { content: json(SetSnapshotScheduleRequest), required: true },
      },
      responses: {
        200: { description: "The schedule", content: json(SnapshotSchedule) },
        ...errorsFor(400, 401, 404),
      },
    }),
    async (c) =>
      c.json(
        await setSchedule(
          c.var.services,
          c.var.tenantId,
          c.req.valid("param").id,
          c.req.valid("json"),
        ),
        200,
      ),
  );

  app.openapi(
    createRoute({
      method: "delete",
      path: "/instances/{id}/snapshot-schedule",
      summary: "Delete an instance's snapshot schedule",
      description: "Its snapshots stay.",
      security,
      request: { params: IdParam },
      responses: {
        204: { description: "Deleted" },
        ...errorsFor(401, 404),
      },
    }),
    async (c) => {
      await deleteSchedule(c.var.services, c.var.tenantId, c.req.valid("param").id);
      return c.body(null, 204);
    },
  );
}
