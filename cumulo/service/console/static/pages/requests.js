// Requests: the organisation's request log (status, timings, seal, label id), filterable, exportable as CSV.
import { api, downloadCsv } from '../api.js';
import { Page, Table, fmtSeconds, fmtTime, html, useLoad } from '../ui.js';
import { useState } from '../vendor/preact-htm.js';

const STATUSES = ['', 'completed', 'in_progress', 'aborted', 'error', 'interrupted', 'rejected'];

const COLUMNS = [
  { key: 'started_at', label: 'Started', render: (r) => fmtTime(r.started_at) },
  { key: 'status', label: 'Status', render: (r) => html`<span class=${`status ${r.status}`}>${r.status}${r.error_code ? ` (${r.error_code})` : ''}</span>` },
  { key: 'model', label: 'Model' },
  { key: 'endpoint', label: 'Endpoint' },
  { key: 'prompt_tokens', label: 'In' },
  { key: 'completion_tokens', label: 'Out' },
  { key: 'ttft', label: 'TTFT', render: (r) => fmtSeconds(r.ttft) },
  { key: 'total_time', label: 'Total', render: (r) => fmtSeconds(r.total_time) },
  { key: 'seal', label: 'Seal' },
  { key: 'label_id', label: 'Label id' },
  { key: 'request_id', label: 'Request id' },
];

const CSV_FIELDS = ['request_id', 'started_at', 'finished_at', 'status', 'error_code', 'endpoint', 'model', 'seal',
  'device', 'prompt_tokens', 'completion_tokens', 'cached_tokens', 'cost', 'ttft', 'total_time', 'key_id', 'label_id'];

function query(filters) {
  const params = new URLSearchParams({ limit: '1000' });
  if (filters.status) params.set('status', filters.status);
  if (filters.model) params.set('model', filters.model);
  if (filters.key) params.set('key_id', filters.key);
  if (filters.since) params.set('start_time', String(Date.parse(`${filters.since}T00:00:00Z`) / 1000));
  return `/console/api/requests?${params}`;
}

export default function RequestsPage() {
  const [filters, setFilters] = useState({ status: '', model: '', key: '', since: '' });
  const keys = useLoad(() => api('/console/api/keys'));
  const { loading, error, data, reload } = useLoad(() => api(query(filters)), [JSON.stringify(filters)]);
  const set = (name) => (e) => setFilters({ ...filters, [name]: e.target.value });
  const rows = data ? data.data : [];
  const exportCsv = () => downloadCsv('cumulo-requests.csv', [CSV_FIELDS, ...rows.map((r) => CSV_FIELDS.map((f) => r[f]))]);
  const actions = html`<button type="button" class="secondary" onClick=${reload}>Refresh</button>
    <button type="button" onClick=${exportCsv} disabled=${!rows.length}>Export CSV</button>`;
  return html`<${Page} title="Requests" actions=${actions}>
    <form class="filters" role="search" onSubmit=${(e) => e.preventDefault()}>
      <label>Status <select name="status" value=${filters.status} onChange=${set('status')}>
        ${STATUSES.map((s) => html`<option value=${s}>${s || 'any'}</option>`)}</select></label>
      <label>Model <input name="model" value=${filters.model} onChange=${set('model')} placeholder="any" /></label>
      <label>Key <select name="key" value=${filters.key} onChange=${set('key')}>
        <option value="">any</option>
        ${(keys.data ? keys.data.data : []).map((k) => html`<option value=${k.id}>${k.name || k.prefix}</option>`)}
      </select></label>
      <label>Since (UTC day) <input name="since" type="date" value=${filters.since} onChange=${set('since')} /></label>
    </form>
    ${loading
      ? html`<p class="state loading" role="status">Loading…</p>`
      : error
        ? html`<p class="state error" role="alert">${error.message}</p>`
        : rows.length
          ? html`<p class="hint">${rows.length}${data.has_more ? ' (newest; more exist)' : ''} requests</p>
            <${Table} columns=${COLUMNS} rows=${rows} />`
          : html`<p class="state empty">No requests match.</p>`}
  <//>`;
}
