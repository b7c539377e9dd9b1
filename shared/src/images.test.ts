import { describe, expect, it } from "vitest";
import { normalizeImageRef } from "./images.ts";

describe("normalizeImageRef", () => {
  it("fills in Docker's defaults", () => {
    expect(normalizeImageRef("alpine")).toBe("docker.io/library/alpine:latest");
    expect(normalizeImageRef("alpine:3.20")).toBe("docker.io/library/alpine:3.20");
    expect(normalizeImageRef("nginx/unit")).toBe("docker.io/nginx/unit:latest");
    expect(normalizeImageRef("docker.io/library/nginx:latest")).toBe(
      "docker.io/library/nginx:latest",
    );
    expect(normalizeImageRef("localhost/offshoot/busybox:1")).toBe("localhost/offshoot/busybox:1");
    expect(normalizeImageRef("localhost:5000/a/b")).toBe("localhost:5000/a/b:latest");
    expect(normalizeImageRef("ghcr.io/o/r:v1.2")).toBe("ghcr.io/o/r:v1.2");
    const d = `sha256:${"a".repeat(64)}`;
    expect(normalizeImageRef(`alpine@${d}`)).toBe(`docker.io/library/alpine@${d}`);
  });

  it("refuses what is not a reference", () => {
    for (const bad of [
      "",
      "UPPER",
      "a b",
      "a:",
      "a@sha256:1",
      "/a",
      "a//b",
      "a:-x",
      "x".repeat(300),
    ])
      expect(normalizeImageRef(bad), bad).toBeUndefined();
  });
});
