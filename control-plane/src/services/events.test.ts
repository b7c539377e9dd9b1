import { describe, expect, it } from "vitest";
import { EVENT_STREAM_LEASE_MS, EVENT_STREAMS_PER_TENANT, openEventStream } from "./events.ts";

describe("event stream places", () => {
  const clock = () => {
    let t = 1_000_000;
    return { now: () => t, advance: (ms: number) => (t += ms) };
  };
  const fill = (tenant: string, now: () => number) =>
    Array.from({ length: EVENT_STREAMS_PER_TENANT }, () => openEventStream(tenant, now));

  it("holds a tenant's places until released, 429 beyond, other tenants unaffected", () => {
    const { now } = clock();
    const places = fill("t-held", now);
    expect(() => openEventStream("t-held", now)).toThrow(/at most 16 event streams/);
    openEventStream("t-other", now).release();
    places[0]?.release();
    places[0]?.release(); // twice frees one place only
    const again = openEventStream("t-held", now);
    expect(() => openEventStream("t-held", now)).toThrow(/at most/);
    again.release();
    for (const p of places) p.release();
  });

  it("frees the place of a stream that stopped renewing it, keeps those that renew", () => {
    const c = clock();
    const places = fill("t-lease", c.now);
    c.advance(EVENT_STREAM_LEASE_MS - 1);
    // Half renew; the other half went silent (a torn-down request never released them).
    const half = EVENT_STREAMS_PER_TENANT / 2;
    for (const p of places.slice(0, half)) p.renew();
    expect(() => openEventStream("t-lease", c.now)).toThrow(/at most/);
    c.advance(1);
    const fresh = Array.from({ length: half }, () => openEventStream("t-lease", c.now));
    expect(() => openEventStream("t-lease", c.now)).toThrow(/at most/);
    for (const p of [...places, ...fresh]) p.release();
  });
});
