// `tsx scripts/patch-postgres.ts` (the root package's postinstall): patches the installed
// postgres.js driver where a connection that closes under load crashes the process or hangs
// (porsager/postgres#1208, #1154, #1066):
//
// - A reserved or begin() handle keeps executing on its connection after the socket closed (a
//   rollback after a failed statement); the buffered write is flushed from a setImmediate
//   callback that dereferences the null socket: an uncaught TypeError ends the process.
// - closed() and terminate() clear the flush timer without forgetting it: after a reconnect,
//   write() sees a timer "armed" and never flushes the StartupMessage, so that connection hangs
//   until connect_timeout on every use.
// - A query issued between a socket's 'error' and its 'close' was never settled.
// - The FATAL of a backend terminated mid-query outlived the connection: the first query on the
//   next session failed with it (57P01 on a healthy connection).
// - release() of a reserved connection that had closed handed it to the pool as open: without
//   the fixes above the pool's next query on it crashed the process; with them alone, every
//   query given that connection would fail for good (index.js).
// - A reserve() whose request a reconnecting connection took off the pool's waiting list was
//   never answered once that connection was ready (connection.js, index.js); a rejected one
//   stayed on the list and was later handed a connection that nobody used again (index.js).
// - A reserved connection that closed left the queries queued on it (behind one in flight)
//   pending forever, and later queries on the handle ran on whatever session the pool had
//   reconnected it for — outside the caller's transaction (index.js).
//
// The edits are exact text replacements in connection.js and index.js of the driver's three
// copies (src/ for Node's import, cjs/src/ for require, cf/src/ which wrangler bundles for
// Workers), written against one version only: any other version, or any expected text not
// found exactly once, is refused. A marker comment on a file's first line says it is patched;
// re-running changes nothing.
import { readFileSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import path from "node:path";
import { fileURLToPath } from "node:url";

export const POSTGRES_VERSION = "3.4.9";

const MARKER = `// offshoot: patched by scripts/patch-postgres.ts for postgres ${POSTGRES_VERSION}`;

const COPIES = ["src", "cjs/src", "cf/src"];

interface Edit {
  what: string;
  from: string;
  to: string;
}

const CONNECTION_EDITS: Edit[] = [
  {
    what: "execute() without a socket",
    from: `      return queryError(q, Errors.connection('CONNECTION_DESTROYED', options))

    if (stream)`,
    to: `      return queryError(q, Errors.connection('CONNECTION_DESTROYED', options))

    // offshoot: no socket means the connection closed, yet a reserved or begin() handle still
    // executes on it (a rollback after a failed statement). A buffered write would make
    // nextWrite() throw on the null socket (porsager/postgres#1208): reject the query instead.
    // true keeps the caller from moving the connection to the full queue, out of reach.
    if (!socket)
      return (queryError(q, Errors.connection('CONNECTION_CLOSED', options)), true)

    if (stream)`,
  },
  {
    what: "closed() keeps the session's last error",
    from: `  async function closed(hadError) {
`,
    to: `  async function closed(hadError) {
    // offshoot: the FATAL a dying backend sends during a query (57P01) is kept as errorResponse
    // while the close rejects that query with CONNECTION_CLOSED; left set, the next session's
    // first ReadyForQuery would reject the query that reconnected with that stale error.
    errorResponse = null
`,
  },
  {
    what: "nextWrite() on a null socket",
    from: `  function nextWrite(fn) {
    const x = socket.write(chunk, fn)`,
    to: `  function nextWrite(fn) {
    // offshoot: a flush that finds the socket gone drops its bytes (the lines below reset the
    // chunk and the timer); throwing here, in a setImmediate callback, ends the process.
    const x = socket !== null && socket.write(chunk, fn)`,
  },
  {
    what: "terminate() forgets the flush timer",
    from: `    clearImmediate(nextWriteTimer)
    if (socket) {`,
    to: `    clearImmediate(nextWriteTimer)
    // offshoot: a cleared but non-null timer stops write() from ever scheduling a flush again,
    // and the old chunk would go out ahead of the next session's StartupMessage.
    nextWriteTimer = chunk = null
    if (socket) {`,
  },
  {
    what: "closed() forgets the flush timer",
    from: `    clearImmediate(nextWriteTimer)
    socket.removeListener('data', data)`,
    to: `    clearImmediate(nextWriteTimer)
    // offshoot: as in terminate(); left armed, the reconnect hangs until connect_timeout.
    nextWriteTimer = chunk = null
    socket.removeListener('data', data)`,
  },
  {
    what: "closed() after an error leaves queries pending",
    from: `    !hadError && (query || sent.length) && error(Errors.connection('CONNECTION_CLOSED', options, socket))`,
    to: `    // offshoot: after an error too. The 'error' event rejected what was pending then, but a
    // query issued between 'error' and 'close' sat in \`sent\` for good. Rejecting a query
    // again is a no-op. (An if: a line opening with "(" would continue \`return reconnect()\`.)
    if (query || sent.length)
      error(Errors.connection('CONNECTION_CLOSED', options, socket))`,
  },
  {
    what: "a connection made for reserve() keeps its reservation",
    from: `    , final = null
`,
    to: `    , final = null
    // offshoot: the reserve() a new connection was opened for, until the connection is ready
    // (see ReadyForQuery); a pool reconnect may have taken it out of the pool's waiting list.
    , reserving = null
`,
  },
  {
    what: "ReadyForQuery drops a reserve() waiting for the types",
    from: `        initial.reserve && (initial = null)`,
    to: `        initial.reserve && (reserving = initial, initial = null)`,
  },
  {
    what: "ReadyForQuery drops a reserve() without types",
    from: `      initial && !initial.reserve && execute(initial)
      options.shared.retries = retries = 0
      initial = null
      return`,
    to: `      const waiting = initial
      options.shared.retries = retries = 0
      initial = null
      if (!waiting.reserve)
        return execute(waiting)
      reserving = waiting`,
  },
  {
    what: "a ready connection goes to its reserve()",
    from: `      : ending
        ? terminate()
        : onopen(connection)
  }`,
    to: `      : ending
        ? terminate()
        : handOver()
  }

  // offshoot: a connection opened for a reserve() goes to it once ready. The driver dropped
  // that request there, counting on the pool's waiting list to hand over the next open
  // connection; but when a closing connection reconnects for the next waiting request it takes
  // it off that list, and a reserve() taken so was never answered: awaited forever.
  function handOver() {
    const r = reserving
    reserving = null
    r && !r.settled ? r.reserve(connection) : onopen(connection)
  }`,
  },
  {
    what: "errored() fails a reserve() still waiting for its connection",
    from: `    initial && (queryError(initial, err), initial = null)`,
    to: `    initial && (queryError(initial, err), initial = null)
    reserving && (queryError(reserving, err), reserving = null)`,
  },
];

const INDEX_EDITS: Edit[] = [
  {
    what: "a reserve() leaves the waiting list once answered",
    from: `        const query = { reserve: resolve, reject }`,
    to: `        // offshoot: answered once, from wherever (a connection opened for it, or one the pool
        // hands out), and off the waiting list then: a rejected request left there would be
        // handed a connection later, which nobody would ever use or release.
        const query = {
          reserve: x => (query.settled = true, queries.remove(query), resolve(x)),
          reject: e => (query.settled = true, queries.remove(query), reject(e))
        }`,
  },
  {
    what: "reserve() outlives its connection",
    from: `    c.reserved.release = true

    const sql = Sql(handler)`,
    to: `    c.reserved.release = true
    // offshoot: once the connection closes under this reservation the pool owns it again and
    // may reconnect it for other queries. Queries queued here behind one in flight were neither
    // sent nor failed (awaited forever), and later ones would run on whatever session the pool
    // opened next: reject both.
    let lostWith = null
    c.onclose = e => {
      lostWith = e
      while (queue.length)
        queue.shift().reject(e)
    }

    const sql = Sql(handler)`,
  },
  {
    what: "reserve()'s handler after its connection closed",
    from: `    function handler(q) {
      c.queue === full
        ? queue.push(q)`,
    to: `    function handler(q) {
      if (lostWith)
        return q.reject(lostWith)
      c.queue === full
        ? queue.push(q)`,
  },
  {
    what: "release() of a connection that closed",
    from: `    sql.release = () => {
      c.reserved = null
      onopen(c)
    }`,
    to: `    sql.release = () => {
      // offshoot: a connection that closed while reserved went back to the closed queue
      // (onclose); handing it out as open would give the pool's queries a connection without a
      // socket, for good. A live reserved connection sits in the reserved or full queue.
      if (lostWith || (c.queue !== reserved && c.queue !== full))
        return
      c.onclose = null
      c.reserved = null
      onopen(c)
    }`,
  },
];

/** Every file this script edits, relative to the package's directory, with its edits. */
const FILES: { file: string; edits: Edit[] }[] = COPIES.flatMap((dir) => [
  { file: `${dir}/connection.js`, edits: CONNECTION_EDITS },
  { file: `${dir}/index.js`, edits: INDEX_EDITS },
]);

class Refusal extends Error {}

/** The installed postgres package's directory, as this repository resolves it. */
function packageDir(): string {
  const entry = createRequire(import.meta.url).resolve("postgres");
  for (let dir = path.dirname(entry); dir !== path.dirname(dir); dir = path.dirname(dir)) {
    try {
      const pkg = JSON.parse(readFileSync(path.join(dir, "package.json"), "utf8")) as {
        name?: unknown;
      };
      if (pkg.name === "postgres") return dir;
    } catch {
      // No package.json here (or a partial one): keep walking up.
    }
  }
  throw new Refusal(`no package.json named postgres above ${entry}`);
}

function installedVersion(dir: string): string {
  const pkg = JSON.parse(readFileSync(path.join(dir, "package.json"), "utf8")) as {
    version?: unknown;
  };
  return String(pkg.version);
}

function count(text: string, part: string): number {
  let n = 0;
  for (let i = text.indexOf(part); i !== -1; i = text.indexOf(part, i + part.length)) n++;
  return n;
}

/** Patches every copy; returns the line to print. Throws Refusal when it will not. */
export function patchPostgres(): string {
  const dir = packageDir();
  const version = installedVersion(dir);
  if (version !== POSTGRES_VERSION) {
    throw new Refusal(
      `postgres ${version} is installed at ${dir}; this patch is written for ${POSTGRES_VERSION} only: review it against the new connection.js`,
    );
  }
  // Check every file before writing any, so a refusal leaves the package as it was.
  const writes: { file: string; text: string }[] = [];
  let already = 0;
  for (const { file, edits } of FILES) {
    const full = path.join(dir, file);
    const text = readFileSync(full, "utf8");
    if (text.startsWith(`${MARKER}\n`)) {
      for (const edit of edits) {
        if (count(text, edit.to) !== 1)
          throw new Refusal(
            `${file} is marked as patched but lacks the edit "${edit.what}" (another revision of this script?): reinstall it with npm ci`,
          );
      }
      already++;
      continue;
    }
    let patched = text;
    for (const edit of edits) {
      const n = count(patched, edit.from);
      if (n !== 1) {
        throw new Refusal(
          `${file}: the text for "${edit.what}" occurs ${n} times, expected exactly once`,
        );
      }
      patched = patched.replace(edit.from, () => edit.to);
    }
    writes.push({ file: full, text: `${MARKER}\n${patched}` });
  }
  for (const w of writes) writeFileSync(w.file, w.text);
  const names = FILES.map((f) => f.file).join(", ");
  return writes.length === 0
    ? `patch-postgres: postgres ${version} already patched (${names})`
    : `patch-postgres: patched postgres ${version}: ${writes.length} file(s) edited, ${already} already patched (${names})`;
}

/** True when the copy Node imports (src/connection.js, src/index.js) carries the marker. */
export function postgresDriverPatched(): boolean {
  try {
    const dir = packageDir();
    return ["src/connection.js", "src/index.js"].every((file) =>
      readFileSync(path.join(dir, file), "utf8").startsWith(`${MARKER}\n`),
    );
  } catch {
    return false;
  }
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  try {
    process.stdout.write(`${patchPostgres()}\n`);
  } catch (e) {
    const why = e instanceof Error ? e.message : String(e);
    process.stderr.write(`patch-postgres: REFUSED: ${why}\n`);
    process.exit(1);
  }
}
