// Where measured figures go: BENCHMARKS.md, between the generated markers; the notes around them
// are kept as written. Inside the generated section each benchmark part (the control-plane sim
// figures, the VM figures) has its own markers, so one part can be measured again alone without
// losing the other's last figures.
import { existsSync, readFileSync, writeFileSync } from "node:fs";

export type BenchPart = "sim" | "vm" | "images" | "exec" | "snapshots";

const START = "<!-- bench:start (written by npm run bench) -->";
const END = "<!-- bench:end -->";
const PARTS: readonly BenchPart[] = ["sim", "vm", "images", "exec", "snapshots"];
const partStart = (p: BenchPart) => `<!-- bench:${p}:start -->`;
const partEnd = (p: BenchPart) => `<!-- bench:${p}:end -->`;

/** Replaces one part's figures in `file`, keeping the other part and everything hand-written. */
export function writeBenchPart(part: BenchPart, text: string, file = "BENCHMARKS.md"): void {
  const old = existsSync(file) ? readFileSync(file, "utf8") : "";
  const [before, rest] = old.includes(START) ? old.split(START) : [old, ""];
  const endAt = rest?.indexOf(END) ?? -1;
  const inner = endAt >= 0 ? (rest ?? "").slice(0, endAt) : "";
  const after = endAt >= 0 ? (rest ?? "").slice(endAt + END.length) : "\n";
  const parts = splitParts(inner);
  parts.set(part, text.trim());
  const body = PARTS.filter((p) => parts.get(p))
    .map((p) => `${partStart(p)}\n${parts.get(p)}\n${partEnd(p)}`)
    .join("\n\n");
  writeFileSync(file, `${before}${START}\n${body}\n${END}${after}`);
}

function splitParts(inner: string): Map<BenchPart, string> {
  const parts = new Map<BenchPart, string>();
  if (!PARTS.some((p) => inner.includes(partStart(p)))) {
    // Written before the section had parts: all of it is the sim figures.
    if (inner.trim()) parts.set("sim", inner.trim());
    return parts;
  }
  for (const p of PARTS) {
    const from = inner.indexOf(partStart(p));
    const to = inner.indexOf(partEnd(p));
    if (from >= 0 && to > from) parts.set(p, inner.slice(from + partStart(p).length, to).trim());
  }
  return parts;
}
