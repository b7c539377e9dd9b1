// Human-readable sizes and rates, as Hypeman's API speaks them.
//
// Sizes use binary multiples ("1GB" = 1024^3 bytes), as Hypeman does for memory and disks.
// Rates use decimal multiples so that bit and byte forms agree: "1Gbps" = 10^9 bits/s =
// 125,000,000 bytes/s = "125MB/s", the equivalence the reference spec gives as its example.
// Both are stored as whole bytes (or bytes per second); anything that is not a whole number
// of bytes is rejected rather than rounded, so parse(format(n)) === n for every value.

const SIZE_UNITS: ReadonlyArray<readonly [string, bigint]> = [
  ["TB", 1024n ** 4n],
  ["GB", 1024n ** 3n],
  ["MB", 1024n ** 2n],
  ["KB", 1024n],
  ["B", 1n],
];

const SIZE_SUFFIX: Record<string, bigint> = {
  "": 1n,
  B: 1n,
  K: 1024n,
  KB: 1024n,
  KIB: 1024n,
  M: 1024n ** 2n,
  MB: 1024n ** 2n,
  MIB: 1024n ** 2n,
  G: 1024n ** 3n,
  GB: 1024n ** 3n,
  GIB: 1024n ** 3n,
  T: 1024n ** 4n,
  TB: 1024n ** 4n,
  TIB: 1024n ** 4n,
};

const NUMBER = /^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$/;

/** Largest value we accept anywhere: keeps every size exactly representable as a JS number. */
export const MAX_BYTES = Number.MAX_SAFE_INTEGER;

export class UnitParseError extends Error {}

/** A guest's bandwidth limits (bytes/s): 8 kbit/s, below which tc's smallest burst is over a
 * minute of traffic, to 100 Gbit/s, above anything a TAP carries. */
export const BANDWIDTH_LIMIT_BPS = { min: 1_000, max: 12_500_000_000 } as const;

/** Exact decimal → scaled bigint; throws when the result is not a whole number. */
function scale(num: string, multiplier: bigint, divisor: bigint, what: string): bigint {
  const [whole = "0", frac = ""] = num.split(".");
  const denom = 10n ** BigInt(frac.length);
  const numerator = BigInt(whole + frac) * multiplier;
  if (numerator % (denom * divisor) !== 0n) {
    throw new UnitParseError(`${what} "${num}" is not a whole number of bytes`);
  }
  return numerator / (denom * divisor);
}

function toSafeNumber(v: bigint, input: string): number {
  if (v > BigInt(MAX_BYTES)) throw new UnitParseError(`"${input}" is too large`);
  return Number(v);
}

/** "2GB", "512MB", "2G", "1.5GB", "4096" → bytes. */
export function parseSize(input: string): number {
  const m = NUMBER.exec(input);
  const mult = m ? SIZE_SUFFIX[(m[2] ?? "").toUpperCase()] : undefined;
  if (!m || mult === undefined || m[1] === undefined) {
    throw new UnitParseError(`invalid size "${input}" (expected e.g. "512MB", "2GB")`);
  }
  return toSafeNumber(scale(m[1], mult, 1n, "size"), input);
}

/** bytes → the shortest exact form: 2147483648 → "2GB", 1610612736 → "1536MB". */
export function formatSize(bytes: number): string {
  if (!Number.isSafeInteger(bytes) || bytes < 0)
    throw new RangeError(`invalid byte count ${bytes}`);
  const b = BigInt(bytes);
  for (const [unit, mult] of SIZE_UNITS) {
    if (b !== 0n && b % mult === 0n) return `${b / mult}${unit}`;
  }
  return "0B";
}

// Rates: bytes per second ("B/s", "KB/s", …) or bits per second ("bps", "Kbps", …), decimal.
const BYTE_RATE: Record<string, bigint> = {
  "B/S": 1n,
  "KB/S": 1000n,
  "MB/S": 1000n ** 2n,
  "GB/S": 1000n ** 3n,
  "TB/S": 1000n ** 4n,
};
const RATE = /^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]+(?:\/[sS])?)\s*$/;

/** "100MB/s", "125MB/s", "1Gbps" → bytes per second. */
export function parseRate(input: string): number {
  const m = RATE.exec(input);
  if (m?.[1] && m[2]) {
    // Only the b/B tells bits from bytes: "Mbps" and "Mb/s" are bits, "MB/s" is bytes.
    const unit = m[2];
    const isBits = /(bps|b\/s)$/.test(unit);
    const isBytes = /B\/s$/.test(unit);
    const prefix = unit.replace(/(bps|b\/s|B\/s)$/, "").toUpperCase();
    const mult = isBits || isBytes ? BYTE_RATE[`${prefix}B/S`] : undefined;
    if (mult !== undefined) return toSafeNumber(scale(m[1], mult, isBits ? 8n : 1n, "rate"), input);
  }
  throw new UnitParseError(`invalid rate "${input}" (expected e.g. "100MB/s", "1Gbps")`);
}

const RATE_UNITS: ReadonlyArray<readonly [string, bigint]> = [
  ["TB/s", 1000n ** 4n],
  ["GB/s", 1000n ** 3n],
  ["MB/s", 1000n ** 2n],
  ["KB/s", 1000n],
  ["B/s", 1n],
];

/** bytes per second → "125MB/s". */
export function formatRate(bytesPerSecond: number): string {
  if (!Number.isSafeInteger(bytesPerSecond) || bytesPerSecond < 0) {
    throw new RangeError(`invalid rate ${bytesPerSecond}`);
  }
  const b = BigInt(bytesPerSecond);
  for (const [unit, mult] of RATE_UNITS) {
    if (b !== 0n && b % mult === 0n) return `${b / mult}${unit}`;
  }
  return "0B/s";
}

/** Go-style durations as the wait endpoint takes them: "30s", "2m", "1m30s", "500ms". */
export function parseDuration(input: string): number {
  const re = /(\d+(?:\.\d+)?)(ms|s|m|h)/g;
  if (!/^(\d+(?:\.\d+)?(ms|s|m|h))+$/.test(input)) {
    throw new UnitParseError(`invalid duration "${input}" (expected e.g. "30s", "2m")`);
  }
  const factor: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000 };
  let total = 0;
  for (const m of input.matchAll(re)) total += Number(m[1]) * (factor[m[2] ?? "s"] ?? 1000);
  return Math.round(total);
}
