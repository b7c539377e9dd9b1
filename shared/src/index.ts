export * from "./errors.ts";
export * from "./flows.ts";
export * from "./images.ts";
export * from "./protocol.ts";
export * from "./schemas.ts";
export * from "./states.ts";
export * from "./tunnel.ts";
export * from "./units.ts";
