/**
 * A browsable API reference rendered in the browser from /openapi.json, with no assets from
 * elsewhere (hosts may have no internet access).
 */
export function referencePage(): string {
  return `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Offshoot API reference</title>
<style>
body{font:15px/1.5 system-ui,sans-serif;max-width:960px;margin:2rem auto;padding:0 1rem;color:#1d1d1f}
h1{font-size:1.6rem}h2{font-size:1.1rem;margin:2rem 0 .3rem}code,pre{font:13px ui-monospace,monospace}
pre{background:#f5f5f7;padding:.8rem;overflow:auto;border-radius:6px}
.m{display:inline-block;min-width:4.5em;font-weight:600}.get{color:#0a7}.post{color:#06c}.delete{color:#c33}
table{border-collapse:collapse}td{padding:.15rem .8rem .15rem 0;vertical-align:top}
</style></head><body>
<h1>Offshoot API reference</h1>
<p>Machine-readable document: <a href="/openapi.json">/openapi.json</a>. Authenticate with <code>Authorization: Bearer &lt;API key&gt;</code>. Errors are <code>{"code","message"}</code>.</p>
<div id="ops">Loading…</div>
<script>
const esc = (s) => String(s ?? "").replace(/[&<>"]/g, (c) => ({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;"}[c]));
const ref = (doc, s) => s && s.$ref ? doc.components.schemas[s.$ref.split("/").pop()] : s;
fetch("/openapi.json").then((r) => r.json()).then((doc) => {
  let html = "";
  for (const [path, item] of Object.entries(doc.paths)) {
    for (const [method, op] of Object.entries(item)) {
      html += '<h2><span class="m ' + method + '">' + method.toUpperCase() + '</span><code>' + esc(path) + '</code></h2>';
      html += '<p>' + esc(op.summary) + (op.description ? ' — ' + esc(op.description) : '') + '</p>';
      const params = (op.parameters || []).map((p) => {
        const s = ref(doc, p.schema) || {};
        const kind = s.enum ? s.enum.join(" | ") : (s.type || "");
        const dflt = s.default !== undefined ? ' (default ' + JSON.stringify(s.default) + ')' : '';
        return '<tr><td><code>' + esc(p.name) + '</code></td><td>' + esc(p.in) + (p.required ? ', required' : '') + '</td><td>' + esc(kind + dflt) + '</td><td>' + esc(p.description || s.description) + '</td></tr>';
      });
      if (params.length) html += '<p>Parameters:</p><table>' + params.join("") + '</table>';
      const body = op.requestBody && op.requestBody.content["application/json"];
      if (body) html += '<p>Body:</p><pre>' + esc(JSON.stringify(ref(doc, body.schema), null, 2)) + '</pre>';
      html += '<table>' + Object.entries(op.responses).map(([code, r]) => '<tr><td><code>' + code + '</code></td><td>' + esc(r.description) + '</td></tr>').join("") + '</table>';
    }
  }
  document.getElementById("ops").innerHTML = html;
});
</script></body></html>`;
}
