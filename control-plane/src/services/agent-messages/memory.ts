// memory: what guests' memory really costs the host (MemoryReport). The host's MemAvailable goes
// on its row; each listed guest's private bytes become its charge, and every other guest of the
// host is charged its size again (it no longer shares, or never did). One statement.
import type { MemoryReport } from "@offshoot/shared";
import { sql } from "drizzle-orm";
import { statement } from "../../db/client.ts";
import type { Services } from "../context.ts";

export async function memoryReported(
  s: Services,
  hostId: string,
  report: MemoryReport,
): Promise<void> {
  await statement(
    s.db,
    sql`with r as (
      select x.id, x.bytes from jsonb_to_recordset(${JSON.stringify(report.charges)}::jsonb)
        as x(id text, bytes bigint)
    ), h as (
      update hosts set memory_available_bytes = ${report.available_bytes},
        memory_reported_at = now()
      where id = ${hostId}
    )
    update instances i set memory_charge_bytes = r.bytes
    from instances j left join r on r.id = j.id
    where i.id = j.id and j.host_id = ${hostId}
      and i.memory_charge_bytes is distinct from r.bytes`,
  );
}
