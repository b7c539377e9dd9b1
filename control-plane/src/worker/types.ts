// The Workers runtime's types, imported explicitly rather than as ambient globals, so they do
// not clash with Node's in the one TypeScript project.
import type {
  WebSocket as CfWebSocket,
  DurableObjectNamespace,
  DurableObjectState,
  ExecutionContext,
  Hyperdrive,
} from "@cloudflare/workers-types/index.ts";

export type { CfWebSocket, DurableObjectState, ExecutionContext };

/** wrangler.toml's bindings and vars. */
export interface Bindings {
  HYPERDRIVE: Hyperdrive;
  HOST_SESSION: DurableObjectNamespace;
  HEARTBEAT_MS?: string;
  HOST_GRACE_MS?: string;
  COMMAND_TIMEOUT_MS?: string;
  VCPU_OVERCOMMIT?: string;
  MEMORY_OVERCOMMIT?: string;
  /** How long a HostSession holds a /command request open for the agent's result (30 s). */
  SESSION_WAIT_MS?: string;
  /** "1" enables POST /__evict on a HostSession (tests: drop the object from memory now). */
  SESSION_TEST_EVICT?: string;
}

/** workerd's WebSocketPair and the Response init that hands one side to the client. */
export const WebSocketPair = (
  globalThis as unknown as { WebSocketPair: new () => { 0: CfWebSocket; 1: CfWebSocket } }
).WebSocketPair;

export function upgraded(client: CfWebSocket): Response {
  return new Response(null, { status: 101, webSocket: client } as ResponseInit);
}
