import { defineConfig } from "drizzle-kit";

export default defineConfig({
  dialect: "postgresql",
  schema: "./control-plane/src/db/schema/index.ts",
  out: "./migrations",
});
