import type { HostView } from "@offshoot/shared";
import { usePoll } from "../poll.ts";
import { bytes, ErrorNote, when } from "../ui.tsx";

function Meter(props: { label: string; used: number; total: number; text: string }) {
  return (
    <div class="meter">
      <meter
        min={0}
        max={Math.max(1, props.total)}
        value={props.used}
        high={props.total * 0.85}
        aria-label={props.label}
      />
      <span>{props.text}</span>
    </div>
  );
}

export function HostsPage() {
  const hosts = usePoll<HostView[]>("/hosts", 5000);
  return (
    <section aria-labelledby="page-title">
      <h1 id="page-title" tabIndex={-1}>
        Hosts
      </h1>
      <p class="hint">
        Capacity counts every tenant's instances; the instance count is yours. Refreshed every 5 s.
      </p>
      <ErrorNote error={hosts.error} />
      {hosts.value?.length === 0 && <p class="empty">No hosts are registered.</p>}
      {hosts.value && hosts.value.length > 0 && (
        <div class="table-wrap">
          <table>
            <thead>
              <tr>
                <th scope="col">Host</th>
                <th scope="col">Connected</th>
                <th scope="col">Last heartbeat</th>
                <th scope="col">vCPUs</th>
                <th scope="col">Memory</th>
                <th scope="col">Your instances</th>
              </tr>
            </thead>
            <tbody>
              {hosts.value.map((h) => (
                <tr key={h.id}>
                  <th scope="row" data-label="Host">
                    {h.name} <span class="hint">{h.driver ?? ""}</span>
                  </th>
                  <td data-label="Connected">
                    <span class={`state ${h.connected ? "state-running" : "state-unknown"}`}>
                      {h.connected ? "connected" : "not connected"}
                    </span>
                  </td>
                  <td data-label="Last heartbeat">{when(h.last_heartbeat_at)}</td>
                  <td data-label="vCPUs">
                    <Meter
                      label={`${h.name} vCPUs allocated`}
                      used={h.vcpus.allocated}
                      total={h.vcpus.total}
                      text={`${h.vcpus.allocated} of ${h.vcpus.total} (${h.vcpus.free} free)`}
                    />
                  </td>
                  <td data-label="Memory">
                    <Meter
                      label={`${h.name} memory allocated`}
                      used={h.memory.allocated_bytes}
                      total={h.memory.total_bytes}
                      text={`${bytes(h.memory.allocated_bytes)} of ${bytes(h.memory.total_bytes)} (${bytes(h.memory.free_bytes)} free${h.memory.available_bytes === null ? "" : `; ${bytes(h.memory.available_bytes)} available`})`}
                    />
                  </td>
                  <td data-label="Your instances">{h.instances}</td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
      )}
    </section>
  );
}
