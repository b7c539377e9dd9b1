// image_pull: the host fetches an image for the control plane (which keeps the tenant's name for
// it) and answers with what it found. Pulls run a few at a time (AGENT_PULL_CONCURRENCY), the
// rest wait in arrival order; each reports its progress at most every half second, and logs it
// every few seconds.
import { type ImageProgress, type Operation, PROTOCOL_VERSION } from "@offshoot/shared";
import type { AgentConfig } from "../config.ts";
import type { ImageStore, PullProgress } from "../images/store.ts";
import type { Outcome } from "../journal.ts";
import { errorMessage, type Logger } from "../log.ts";
import { Slots } from "../slots.ts";

type PullOp = Extract<Operation, { kind: "image_pull" }>;

const SEND_EVERY_MS = 500;
const LOG_EVERY_MS = 5_000;

export class ImagePulls {
  private readonly slots: Slots;

  constructor(
    private readonly images: ImageStore,
    private readonly config: AgentConfig["pulls"],
    private readonly log: Logger,
    private readonly onProgress: (p: ImageProgress) => void,
    /** Rootfs files instances boot (never evicted). */
    private readonly inUse: () => Promise<Set<string>>,
  ) {
    this.slots = new Slots(config.concurrency);
  }

  async run(commandId: string, op: PullOp): Promise<Outcome> {
    if (op.credentialed && !op.credentials) {
      return failed(
        "interrupted",
        "the pull was interrupted and its credentials are not kept: pull the image again with its credentials",
      );
    }
    return this.slots.run(() => this.pull(commandId, op));
  }

  private async pull(commandId: string, op: PullOp): Promise<Outcome> {
    const started = performance.now();
    let sentAt = 0;
    let loggedAt = 0;
    let phase: PullProgress["phase"] | undefined;
    const progress = (p: PullProgress) => {
      const now = performance.now();
      const changed = p.phase !== phase;
      const done = p.bytes_done === p.bytes_total;
      phase = p.phase;
      if (changed || done || now - sentAt >= SEND_EVERY_MS) {
        sentAt = now;
        this.onProgress({
          v: PROTOCOL_VERSION,
          type: "image_progress",
          command_id: commandId,
          image_id: op.image_id,
          ...p,
        });
      }
      if (changed || now - loggedAt >= LOG_EVERY_MS) {
        loggedAt = now;
        this.log("info", "image pull progress", { image: op.ref, ...p });
      }
    };
    try {
      const image = await this.images.pull(op.ref, {
        platform: op.platform,
        credentials: op.credentials,
        maxLayerBytes: this.config.maxLayerBytes,
        idleTimeoutMs: this.config.idleTimeoutMs,
        insecure: this.config.insecure,
        onProgress: progress,
      });
      this.log("info", "image pulled", {
        image: op.ref,
        digest: image.digest,
        size_bytes: image.size_bytes,
        ms: Math.round(performance.now() - started),
      });
      const evicted = await this.images
        .evict(this.config.cacheBytes, await this.inUse(), image.digest)
        .catch((e: unknown) => {
          this.log("warn", "image cache not trimmed", { error: errorMessage(e) });
          return [];
        });
      if (evicted.length > 0) this.log("info", "images evicted from the cache", { evicted });
      return {
        ok: true,
        instances: [],
        image: {
          digest: image.digest,
          platform: image.platform,
          size_bytes: image.size_bytes,
          entrypoint: image.entrypoint,
          cmd: image.cmd,
          env: image.env,
          working_dir: image.working_dir,
        },
      };
    } catch (err) {
      return failed("invalid_request", errorMessage(err));
    }
  }
}

function failed(code: "interrupted" | "invalid_request", message: string): Outcome {
  return { ok: false, error: { code, message }, instances: [] };
}

/** The command as the journal may keep it: credentials never reach the disk. */
export function withoutSecrets<T extends { op: Operation }>(command: T): T {
  if (command.op.kind !== "image_pull" || !command.op.credentials) return command;
  const { credentials: _, ...op } = command.op;
  return { ...command, op };
}
