import fc from "fast-check";
import { describe, expect, it } from "vitest";
import {
  formatRate,
  formatSize,
  parseDuration,
  parseRate,
  parseSize,
  UnitParseError,
} from "./units.ts";

describe("sizes", () => {
  it("parses the forms Hypeman documents, in binary multiples", () => {
    expect(parseSize("1GB")).toBe(1024 ** 3);
    expect(parseSize("2G")).toBe(2 * 1024 ** 3);
    expect(parseSize("512MB")).toBe(512 * 1024 ** 2);
    expect(parseSize("1.5GB")).toBe(1.5 * 1024 ** 3);
    expect(parseSize("4096")).toBe(4096);
    expect(parseSize("10gb")).toBe(10 * 1024 ** 3);
  });
  it("rejects what is not a whole number of bytes, or not a size", () => {
    for (const bad of ["", "GB", "1.5", "-1GB", "1 XB", "0.3B", "1e9", "9999999999999TB"]) {
      expect(() => parseSize(bad), bad).toThrow(UnitParseError);
    }
  });
  it("formats to the largest exact unit", () => {
    expect(formatSize(2 * 1024 ** 3)).toBe("2GB");
    expect(formatSize(1536 * 1024 ** 2)).toBe("1536MB");
    expect(formatSize(1000)).toBe("1000B");
    expect(formatSize(0)).toBe("0B");
  });
  it("round-trips every byte count: parse(format(n)) === n", () => {
    fc.assert(
      fc.property(fc.maxSafeNat(), (n) => {
        expect(parseSize(formatSize(n))).toBe(n);
      }),
    );
  });
  it("round-trips every formatted size: format(parse(s)) === s", () => {
    const unit = fc.constantFrom("B", "KB", "MB", "GB", "TB");
    fc.assert(
      fc.property(fc.integer({ min: 1, max: 8191 }), unit, (n, u) => {
        const s = formatSize(parseSize(`${n}${u}`));
        expect(parseSize(s)).toBe(parseSize(`${n}${u}`));
      }),
    );
  });
});

describe("rates", () => {
  it("treats 1Gbps and 125MB/s as the same rate, as the reference spec does", () => {
    expect(parseRate("1Gbps")).toBe(125_000_000);
    expect(parseRate("125MB/s")).toBe(125_000_000);
    expect(parseRate("100MB/s")).toBe(100_000_000);
    expect(parseRate("8bps")).toBe(1);
    expect(parseRate("1Gb/s")).toBe(125_000_000);
    expect(formatRate(125_000_000)).toBe("125MB/s");
  });
  it("rejects fractions of a byte and unknown units", () => {
    for (const bad of ["1bps", "3bps", "100MB", "fast", "", "10 XB/s", "1 Kbit"]) {
      expect(() => parseRate(bad), bad).toThrow(UnitParseError);
    }
  });
  it("round-trips every rate in bytes per second", () => {
    fc.assert(
      fc.property(fc.maxSafeNat(), (n) => {
        expect(parseRate(formatRate(n))).toBe(n);
      }),
    );
  });
  it("agrees between bit and byte forms for every whole multiple of 8 bits", () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 1, max: 1_000_000 }),
        fc.constantFrom("K", "M", "G"),
        (n, p) => {
          expect(parseRate(`${n * 8}${p}bps`)).toBe(parseRate(`${n}${p}B/s`));
        },
      ),
    );
  });
});

describe("durations", () => {
  it("parses Go-style durations", () => {
    expect(parseDuration("30s")).toBe(30_000);
    expect(parseDuration("2m")).toBe(120_000);
    expect(parseDuration("1m30s")).toBe(90_000);
    expect(parseDuration("500ms")).toBe(500);
  });
  it("rejects anything else", () => {
    for (const bad of ["", "30", "s", "-1s", "1d", "1 s"]) {
      expect(() => parseDuration(bad), bad).toThrow(UnitParseError);
    }
  });
});
