import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    include: ["**/*.test.ts"],
    exclude: ["**/node_modules/**", "**/.git/**", "**/dist/**", "**/.data/**"],
    // Starts a throwaway Postgres (unless TEST_DATABASE_URL is set) and a migrated template DB.
    globalSetup: ["test/global-setup.ts"],
    testTimeout: 60_000,
    hookTimeout: 120_000,
    teardownTimeout: 30_000,
    // Tests spawn real processes (control plane, agents): separate processes, two at a time on
    // these 2-core machines.
    pool: "forks",
    fileParallelism: true,
    maxWorkers: 2,
  },
});
