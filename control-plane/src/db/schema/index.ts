export * from "./api-keys.ts";
export * from "./events.ts";
export * from "./hosts.ts";
export * from "./images.ts";
export * from "./instances.ts";
export * from "./operations.ts";
export * from "./tenants.ts";
export * from "./volumes.ts";
