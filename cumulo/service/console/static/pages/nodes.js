// Nodes and deployments (admins only): the machines with their chips, the engines this gateway serves with their
// health and load, the stored deployments with each replica's node, state, load and why placement chose it; a
// form to deploy (or change) a model and a button to undeploy one.
import { html, useEffect, useState } from '../vendor/preact-htm.js';
import { api } from '../api.js';
import { Page, Table, fmtTime } from '../ui.js';
import { numberOr } from './common.js';

const REFRESH_MS = 5000;

function DeployForm({ onDone }) {
  const [error, setError] = useState(null);
  const submit = async (event) => {
    event.preventDefault();
    const f = event.target.elements;
    const body = { model: f.model.value.trim() };
    for (const key of ['source', 'format', 'chip']) if (f[key].value.trim()) body[key] = f[key].value.trim();
    const low = numberOr(f.min_replicas.value);
    const high = numberOr(f.max_replicas.value);
    if (low !== undefined || high !== undefined) {
      body.min_replicas = low ?? high;
      body.max_replicas = high ?? low;
    } else if (numberOr(f.replicas.value) !== undefined) {
      body.replicas = numberOr(f.replicas.value);
    }
    for (const key of ['ttft_slo_ms', 'tpot_slo_ms']) {
      if (numberOr(f[key].value) !== undefined) body[key] = numberOr(f[key].value);
    }
    setError(null);
    try {
      await api('/admin/deployments', { method: 'POST', body });
      onDone();
    } catch (e) {
      setError(e.message);
    }
  };
  return html`<form class="card" onSubmit=${submit} aria-label="deploy a model">
    <h3>Deploy</h3>
    <label>Model name <input name="model" required maxlength="256" /></label>
    <label>Source <input name="source" placeholder="catalog name, .gguf path or directory (default: the name)" /></label>
    <label>Replicas <input name="replicas" type="number" min="1" placeholder="1" /></label>
    <label>Min replicas <input name="min_replicas" type="number" min="1" /></label>
    <label>Max replicas <input name="max_replicas" type="number" min="1" /></label>
    <label>Format <input name="format" placeholder="chosen by placement" /></label>
    <label>Chip <input name="chip" placeholder="chosen by placement" /></label>
    <label>TTFT SLO (ms) <input name="ttft_slo_ms" type="number" step="any" min="0" /></label>
    <label>TPOT SLO (ms) <input name="tpot_slo_ms" type="number" step="any" min="0" /></label>
    <button type="submit">Deploy</button>
    ${error && html`<p class="error" role="alert" data-test="deploy-error">${error}</p>`}
  </form>`;
}

export default function Nodes() {
  const [ops, setOps] = useState(null);
  const [deployments, setDeployments] = useState([]);
  const [error, setError] = useState(null);
  const [notice, setNotice] = useState(null);
  const load = () =>
    Promise.all([api('/console/api/ops/nodes'), api('/admin/deployments')])
      .then(([o, d]) => {
        setOps(o);
        setDeployments(d.data);
        setError(null);
      })
      .catch(setError);
  useEffect(() => {
    load();
    const timer = setInterval(load, REFRESH_MS);
    return () => clearInterval(timer);
  }, []);
  const undeploy = async (model) => {
    if (!window.confirm(`Undeploy ${model}? Its replicas stop.`)) return;
    try {
      await api(`/admin/deployments/${encodeURIComponent(model)}`, { method: 'DELETE' });
      setNotice(`${model} undeployed`);
      load();
    } catch (e) {
      setNotice(e.message);
    }
  };
  const nodeColumns = [
    { key: 'name', label: 'node' },
    { key: 'alive', label: 'health', render: (n) => (n.alive === false ? 'dead' : 'alive') },
    { key: 'device', label: 'device', render: (n) => `${n.kind || '?'}: ${n.device || ''}` },
    { key: 'chip', label: 'chip' },
    { key: 'devices', label: 'devices' },
    { key: 'cpus', label: 'CPUs' },
    { key: 'memory_gb', label: 'memory GB' },
    { key: 'replicas', label: 'replicas', render: (n) => (n.replicas || []).join(', ') || '-' },
  ];
  const engineColumns = [
    { key: 'model', label: 'model' },
    { key: 'device', label: 'device' },
    { key: 'ok', label: 'health', render: (e) => (e.ok ? 'ok' : `down: ${e.detail}`) },
    { key: 'load', label: 'running / waiting', render: (e) => `${e.running} / ${e.waiting}` },
    { key: 'seal', label: 'seal', render: (e) => html`<code>${(e.seal || '').slice(0, 19)}</code>` },
  ];
  const replicaRows = deployments.flatMap((d) => d.replicas_status || []);
  const deploymentColumns = [
    { key: 'model', label: 'model' },
    { key: 'source', label: 'source' },
    { key: 'replicas', label: 'replicas', render: (d) => `${d.replicas} (${d.min_replicas}-${d.max_replicas})` },
    { key: 'format', label: 'format', render: (d) => d.format || 'auto' },
    { key: 'chip', label: 'chip', render: (d) => d.chip || 'auto' },
    { key: 'live', label: 'live replicas', render: (d) => (d.replicas_status || []).length },
    {
      key: 'undeploy',
      label: '',
      render: (d) => html`<button type="button" class="danger" onClick=${() => undeploy(d.model)}>Undeploy</button>`,
    },
  ];
  const replicaColumns = [
    { key: 'replica', label: 'replica' },
    { key: 'model', label: 'model' },
    { key: 'node', label: 'node' },
    { key: 'state', label: 'state' },
    { key: 'chip', label: 'chip / format', render: (r) => `${r.chip || '-'} / ${r.format || '-'}` },
    { key: 'in_flight', label: 'in flight', render: (r) => `${r.in_flight ?? 0} (served ${r.served ?? 0})` },
    { key: 'reason', label: 'placement reason', render: (r) => r.reason || '-' },
    { key: 'since', label: 'since', render: (r) => (r.since ? fmtTime(r.since) : '-') },
  ];
  return html`<${Page} title="Nodes and deployments" loading=${ops === null && !error} error=${ops ? null : error}>
    ${notice && html`<p class="notice" role="status">${notice}</p>`}
    <h3>Nodes</h3>
    ${ops && ops.note && html`<p class="hint">${ops.note}</p>`}
    ${ops && ops.data.length > 0 && html`<${Table} columns=${nodeColumns} rows=${ops.data} />`}
    <h3>Engines served by this gateway</h3>
    ${
      ops && ops.engines.length === 0
        ? html`<p class="empty">None in this process (a pool serves the deployments below).</p>`
        : html`<${Table} columns=${engineColumns} rows=${(ops && ops.engines) || []} />`
    }
    <h3>Deployments</h3>
    ${
      deployments.length === 0
        ? html`<p class="empty">No deployment stored.</p>`
        : html`<${Table} columns=${deploymentColumns} rows=${deployments} />`
    }
    ${replicaRows.length > 0 && html`<h3>Replicas</h3><${Table} columns=${replicaColumns} rows=${replicaRows} />`}
    <${DeployForm} onDone=${load} />
  <//>`;
}
