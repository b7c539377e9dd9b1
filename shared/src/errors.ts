// One error shape on the wire, Hypeman's `{code, message}`, and one table from code to HTTP status.
import { z } from "zod";

export const ERROR_STATUS = {
  invalid_request: 400,
  invalid_platform: 400,
  /** An instance asked for an image the tenant is still pulling (or failed to pull). */
  image_not_ready: 400,
  unauthorized: 401,
  /** A request body over the control plane's limit (MAX_BODY_BYTES). */
  payload_too_large: 413,
  not_found: 404,
  /** More of something at once than the control plane allows a tenant (its event streams). */
  too_many_requests: 429,
  ambiguous: 409,
  invalid_state: 409,
  name_conflict: 409,
  insufficient_resources: 409,
  conflict: 409,
  /** The guest did not boot (the hypervisor or the guest's kernel gave up): the message carries
   * what they said. Usually the request's doing (too little memory, a broken image). */
  boot_failed: 422,
  internal_error: 500,
  /** The agent restarted mid-command and rolled it back (see host-agent commands.ts). */
  interrupted: 500,
  not_supported: 501,
  host_unavailable: 503,
  /** Postgres cannot be reached, or dropped the session mid-request (a write in flight may or
   * may not have been committed: read before repeating it). */
  database_unavailable: 503,
  timeout: 504,
} as const;

type Code = keyof typeof ERROR_STATUS;
/** The codes as a schema: for settings that name one, and to compare a code against
 * (`ErrorCode.enum.interrupted`) rather than a bare string. */
export const ErrorCode = z.enum(Object.keys(ERROR_STATUS) as [Code, ...Code[]]);
export type ErrorCode = z.infer<typeof ErrorCode>;

export class ApiError extends Error {
  constructor(
    readonly code: ErrorCode,
    message: string,
  ) {
    super(message);
    this.name = new.target.name;
  }
  get status(): (typeof ERROR_STATUS)[ErrorCode] {
    return ERROR_STATUS[this.code];
  }
}

export class InvalidRequestError extends ApiError {
  constructor(message: string) {
    super("invalid_request", message);
  }
}
export class NotFoundError extends ApiError {
  constructor(message: string) {
    super("not_found", message);
  }
}
export class AmbiguousError extends ApiError {
  constructor(message: string) {
    super("ambiguous", message);
  }
}
export class InvalidStateError extends ApiError {
  constructor(message: string) {
    super("invalid_state", message);
  }
}
export class NameConflictError extends ApiError {
  constructor(message: string) {
    super("name_conflict", message);
  }
}
export class ConflictError extends ApiError {
  constructor(message: string) {
    super("conflict", message);
  }
}
export class InsufficientResourcesError extends ApiError {
  constructor(message: string) {
    super("insufficient_resources", message);
  }
}
export class NotSupportedError extends ApiError {
  constructor(message: string) {
    super("not_supported", message);
  }
}
export class HostUnavailableError extends ApiError {
  constructor(message: string) {
    super("host_unavailable", message);
  }
}
export class DatabaseUnavailableError extends ApiError {
  constructor(message = "the database is unavailable; retry shortly") {
    super("database_unavailable", message);
  }
}
export class TimeoutError extends ApiError {
  constructor(message: string) {
    super("timeout", message);
  }
}

/** An error reported by a host agent for a command; carries the agent's code through. */
export class HostCommandError extends ApiError {
  constructor(code: ErrorCode, message: string) {
    super(code, message);
  }
}

/** The request's client went away: there is no one to answer. */
export class ClientGoneError extends Error {
  constructor() {
    super("the client went away");
    this.name = "ClientGoneError";
  }
}

export function isErrorCode(code: string): code is ErrorCode {
  return Object.hasOwn(ERROR_STATUS, code);
}
