// Usage: tokens and cost of the organisation per day and per model, and the plan's quotas with what is left.
import { api } from '../api.js';
import { BarChart, LineChart, Page, Table, fmtNumber, fmtUsd, html, useLoad } from '../ui.js';
import { useState } from '../vendor/preact-htm.js';

function limit(value, unit = '') {
  return value === null || value === undefined ? 'unlimited' : `${fmtNumber(value)}${unit}`;
}

function Quota({ quota }) {
  const items = [
    ['Plan', quota.plan],
    [`Tokens used in ${quota.month}`, fmtNumber(quota.month_tokens_used)],
    ['Monthly tokens', limit(quota.monthly_tokens)],
    ['Tokens left this month', limit(quota.month_tokens_left)],
    ['Requests per minute', limit(quota.rpm)],
    ['Tokens per minute', limit(quota.tpm)],
    ['Concurrent requests', limit(quota.concurrency)],
  ];
  return html`<div class="cards" aria-label="Plan and quotas">${items.map(
    ([label, value]) => html`<div class="card"><div class="label">${label}</div>
      <div class="value" data-quota=${label}>${value}</div></div>`,
  )}</div>`;
}

export default function UsagePage() {
  const [days, setDays] = useState(14);
  const { loading, error, data, reload } = useLoad(() => api(`/console/api/usage?days=${days}`), [days]);
  const actions = html`<label class="inline">Days
      <select value=${days} onChange=${(e) => setDays(Number(e.target.value))}>
        ${[7, 14, 30, 90].map((d) => html`<option value=${d}>${d}</option>`)}
      </select></label>
    <button type="button" class="secondary" onClick=${reload}>Refresh</button>`;
  if (loading || error || !data) return html`<${Page} title="Usage" loading=${loading} error=${error} actions=${actions} />`;
  const labels = data.days.map((d) => d.day.slice(5));
  const total = data.days.reduce((sum, d) => sum + d.tokens, 0);
  const models = Object.entries(data.tokens_by_model).map(([model, values]) => ({ label: model, data: values }));
  return html`<${Page} title="Usage" actions=${actions}>
    <${Quota} quota=${data.quota} />
    <p class="total">Tokens in the last ${days} days: <strong data-total-tokens>${fmtNumber(total)}</strong></p>
    ${total === 0
      ? html`<p class="state empty">No requests in the last ${days} days yet.</p>`
      : html`<h2>Tokens per day and model</h2>
        <${BarChart} labels=${labels} datasets=${models} stacked=${true} label="Tokens per day, stacked by model" />
        <h2>Cost per day (USD)</h2>
        <${LineChart} labels=${labels} datasets=${[{ label: 'cost', data: data.days.map((d) => d.cost) }]}
          label="Cost per day in US dollars" />
        <h2>Per model</h2>
        <${Table} rows=${data.models} columns=${[
          { key: 'model', label: 'Model' },
          { key: 'requests', label: 'Requests', render: (m) => fmtNumber(m.requests) },
          { key: 'tokens', label: 'Tokens', render: (m) => fmtNumber(m.tokens) },
          { key: 'cost', label: 'Cost', render: (m) => fmtUsd(m.cost) },
        ]} />`}
  <//>`;
}
