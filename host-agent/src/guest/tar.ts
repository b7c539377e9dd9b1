// A streaming tar reader (ustar, with GNU long names and pax path/linkpath/size records): what
// cp reads out of a guest (busybox tar's output) and checks coming in from a client. Bytes go in
// as they arrive; entries and their data come out in order, never more than a chunk held.

export type EntryType = "file" | "dir" | "symlink" | "hardlink" | "other";

export interface TarEntry {
  path: string;
  type: EntryType;
  mode: number;
  uid: number;
  gid: number;
  size: number;
  mtime: number;
  linkTarget: string;
}

export interface TarEvents {
  entry(e: TarEntry): void;
  data(chunk: Buffer): void;
  /** The archive's end (two zero blocks, or its input ended at an entry boundary). */
  end(): void;
}

export class TarError extends Error {}

const BLOCK = 512;

function field(block: Buffer, offset: number, length: number): string {
  const raw = block.subarray(offset, offset + length);
  const nul = raw.indexOf(0);
  return raw.subarray(0, nul < 0 ? length : nul).toString("utf8");
}

function octal(block: Buffer, offset: number, length: number): number {
  // GNU base-256 for large values: high bit of the first byte set.
  if ((block[offset] ?? 0) & 0x80) {
    let n = 0;
    for (let i = offset + 1; i < offset + length; i++) n = n * 256 + (block[i] ?? 0);
    return n;
  }
  const s = field(block, offset, length).trim();
  return s === "" ? 0 : Number.parseInt(s, 8);
}

function checksumOk(block: Buffer): boolean {
  let sum = 0;
  for (let i = 0; i < BLOCK; i++) sum += i >= 148 && i < 156 ? 32 : (block[i] ?? 0);
  return sum === octal(block, 148, 8);
}

/** pax records: "LEN key=value\n"… */
function paxRecords(data: Buffer): Map<string, string> {
  const out = new Map<string, string>();
  let i = 0;
  while (i < data.length) {
    const space = data.indexOf(0x20, i);
    if (space < 0) break;
    const len = Number(data.subarray(i, space).toString());
    if (!Number.isInteger(len) || len <= 0) break;
    const record = data.subarray(space + 1, i + len - 1).toString("utf8");
    const eq = record.indexOf("=");
    if (eq > 0) out.set(record.slice(0, eq), record.slice(eq + 1));
    i += len;
  }
  return out;
}

/** The largest GNU long name or pax header read into memory. */
const MAX_META_BYTES = 1024 * 1024;

export class TarReader {
  private buf: Buffer = Buffer.alloc(0);
  /** Bytes of the current entry's data still to come, and its padding after. */
  private left = 0;
  private pad = 0;
  /** A metadata entry being collected (GNU L/K, pax x). */
  private meta: { kind: string; size: number; parts: Buffer[]; got: number } | undefined;
  private longName: string | undefined;
  private longLink: string | undefined;
  private pax = new Map<string, string>();
  private zeroBlocks = 0;
  private done = false;

  constructor(private events: TarEvents) {}

  get finished(): boolean {
    return this.done;
  }

  push(chunk: Buffer): void {
    if (this.done) return;
    this.buf = this.buf.length ? Buffer.concat([this.buf, chunk]) : chunk;
    for (;;) {
      if (this.left > 0) {
        if (this.buf.length === 0) return;
        const n = Math.min(this.left, this.buf.length);
        const part = this.buf.subarray(0, n);
        this.buf = this.buf.subarray(n);
        this.left -= n;
        if (this.meta) {
          this.meta.parts.push(Buffer.from(part));
          this.meta.got += n;
          if (this.left === 0) this.finishMeta();
        } else this.events.data(part);
        continue;
      }
      if (this.pad > 0) {
        const n = Math.min(this.pad, this.buf.length);
        this.buf = this.buf.subarray(n);
        this.pad -= n;
        if (this.pad > 0) return;
        continue;
      }
      if (this.buf.length < BLOCK) return;
      const block = this.buf.subarray(0, BLOCK);
      this.buf = this.buf.subarray(BLOCK);
      if (block.every((b) => b === 0)) {
        if (++this.zeroBlocks === 2) {
          this.done = true;
          this.events.end();
          return;
        }
        continue;
      }
      this.zeroBlocks = 0;
      this.header(Buffer.from(block));
    }
  }

  /** The input ended. An archive cut off inside an entry is an error. */
  close(): void {
    if (this.done) return;
    if (this.left > 0 || this.meta || this.buf.length > 0) {
      throw new TarError("the archive ends inside an entry");
    }
    this.done = true;
    this.events.end();
  }

  private header(block: Buffer): void {
    if (!checksumOk(block)) throw new TarError("a tar header's checksum does not match");
    const flag = String.fromCharCode(block[156] ?? 0);
    const size = octal(block, 124, 12);
    if (flag === "L" || flag === "K" || flag === "x" || flag === "g") {
      if (size > MAX_META_BYTES) throw new TarError("a tar metadata entry is too large");
      this.meta = { kind: flag, size, parts: [], got: 0 };
      this.left = size;
      this.pad = (BLOCK - (size % BLOCK)) % BLOCK;
      if (size === 0) this.finishMeta();
      return;
    }
    const prefix = field(block, 345, 155);
    const name = field(block, 0, 100);
    let path = this.pax.get("path") ?? this.longName ?? (prefix ? `${prefix}/${name}` : name);
    const linkTarget = this.pax.get("linkpath") ?? this.longLink ?? field(block, 157, 100);
    const paxSize = this.pax.get("size");
    const entrySize = paxSize !== undefined ? Number(paxSize) : size;
    this.longName = undefined;
    this.longLink = undefined;
    this.pax = new Map();
    const type: EntryType =
      flag === "0" || flag === "\0" || flag === "7"
        ? "file"
        : flag === "5"
          ? "dir"
          : flag === "2"
            ? "symlink"
            : flag === "1"
              ? "hardlink"
              : "other";
    if (type === "dir") path = path.replace(/\/+$/, "");
    const hasData = type === "file" || type === "other";
    this.events.entry({
      path,
      type,
      mode: octal(block, 100, 8) & 0o7777,
      uid: octal(block, 108, 8),
      gid: octal(block, 116, 8),
      size: hasData ? entrySize : 0,
      mtime: octal(block, 136, 12),
      linkTarget,
    });
    this.left = hasData ? entrySize : 0;
    this.pad = hasData ? (BLOCK - (entrySize % BLOCK)) % BLOCK : 0;
  }

  private finishMeta(): void {
    const meta = this.meta;
    if (!meta) return;
    this.meta = undefined;
    const data = Buffer.concat(meta.parts);
    if (meta.kind === "L") this.longName = data.toString("utf8").replace(/\0+$/, "");
    else if (meta.kind === "K") this.longLink = data.toString("utf8").replace(/\0+$/, "");
    else if (meta.kind === "x") this.pax = paxRecords(data);
  }
}

/** Why an archive entry's path would land outside the directory it is unpacked into (or through a
 * symlink the archive made), or undefined when it stays inside. */
export function escapes(path: string, symlinks: ReadonlySet<string>): string | undefined {
  if (path.startsWith("/")) return "an absolute path";
  const parts = path.split("/").filter((p) => p !== "" && p !== ".");
  if (parts.includes("..")) return "a '..' component";
  for (let i = 1; i < parts.length; i++) {
    if (symlinks.has(parts.slice(0, i).join("/"))) return "a path through a symlink in the archive";
  }
  return undefined;
}

/** A ustar header for `e` (a pax record first when its path or link is too long for ustar). */
export function tarHeader(e: Omit<TarEntry, "mtime"> & { mtime?: number }): Buffer {
  const flag = { file: "0", dir: "5", symlink: "2", hardlink: "1", other: "0" }[e.type];
  const name = e.type === "dir" ? `${e.path.replace(/\/+$/, "")}/` : e.path;
  const fitsName = Buffer.byteLength(name) <= 100;
  const fitsLink = Buffer.byteLength(e.linkTarget) <= 100;
  const parts: Buffer[] = [];
  if (!fitsName || !fitsLink) {
    let records = "";
    const record = (key: string, value: string) => {
      const body = ` ${key}=${value}\n`;
      let len = Buffer.byteLength(body) + 1;
      while (String(len).length + Buffer.byteLength(body) !== len) len++;
      records += `${len}${body}`;
    };
    if (!fitsName) record("path", name);
    if (!fitsLink) record("linkpath", e.linkTarget);
    const data = Buffer.from(records);
    parts.push(block("x", "pax", data.length, 0o644, 0, 0, 0, ""), pad(data));
  }
  parts.push(
    block(
      flag,
      fitsName ? name : name.slice(0, 99),
      e.type === "file" ? e.size : 0,
      e.mode,
      e.uid,
      e.gid,
      e.mtime ?? 0,
      fitsLink ? e.linkTarget : "",
    ),
  );
  return Buffer.concat(parts);
}

/** Zero bytes to the next block boundary after `size` bytes of data. */
export function tarPadding(size: number): Buffer {
  return Buffer.alloc((BLOCK - (size % BLOCK)) % BLOCK);
}

/** The end of an archive. */
export const TAR_END = Buffer.alloc(2 * BLOCK);

function pad(data: Buffer): Buffer {
  return Buffer.concat([data, tarPadding(data.length)]);
}

function block(
  flag: string,
  name: string,
  size: number,
  mode: number,
  uid: number,
  gid: number,
  mtime: number,
  link: string,
): Buffer {
  const b = Buffer.alloc(BLOCK);
  b.write(name, 0, 100, "utf8");
  const num = (v: number, offset: number, len: number) =>
    b.write(`${v.toString(8).padStart(len - 1, "0")}\0`, offset, len, "ascii");
  num(mode & 0o7777, 100, 8);
  num(uid, 108, 8);
  num(gid, 116, 8);
  num(size, 124, 12);
  num(mtime, 136, 12);
  b.write(flag, 156, 1, "ascii");
  b.write(link, 157, 100, "utf8");
  b.write("ustar\0", 257, 6, "ascii");
  b.write("00", 263, 2, "ascii");
  b.fill(32, 148, 156);
  let sum = 0;
  for (const byte of b) sum += byte;
  b.write(`${sum.toString(8).padStart(6, "0")}\0 `, 148, 8, "ascii");
  return b;
}
