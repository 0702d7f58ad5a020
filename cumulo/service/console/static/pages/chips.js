// The chip catalog (admins only) beside the performance model's predictions for one workload: decode tokens/s,
// time per output token and USD per million tokens per chip, as charts and as a table (docs/chips.md).
import { html, useEffect, useState } from '../vendor/preact-htm.js';
import { api } from '../api.js';
import { BarChart, Page, Table } from '../ui.js';
import './common.js'; // the pages' stylesheet

function fixed(value, digits = 2) {
  return value === null || value === undefined ? '-' : Number(value).toFixed(digits);
}

export default function Chips() {
  const [query, setQuery] = useState({ model: 'llama-3.1-8b', format: 'bf16', batch: 8, context: 2048 });
  const [answer, setAnswer] = useState(null);
  const [error, setError] = useState(null);
  useEffect(() => {
    const q = new URLSearchParams(Object.entries(query).map(([k, v]) => [k, String(v)]));
    setError(null);
    api(`/console/api/ops/chips?${q}`).then(setAnswer).catch(setError);
  }, [query]);
  const submit = (event) => {
    event.preventDefault();
    const f = event.target.elements;
    setQuery({
      model: f.model.value,
      format: f.format.value,
      batch: Number(f.batch.value),
      context: Number(f.context.value),
    });
  };
  const rows = (answer && answer.data) || [];
  const shown = (answer && answer.query) || query; // what the figures below were predicted for
  const predicted = rows.filter((c) => c.prediction);
  const columns = [
    { key: 'id', label: 'chip' },
    { key: 'vendor', label: 'vendor' },
    { key: 'year', label: 'year' },
    { key: 'memory_gb', label: 'memory GB', render: (c) => fixed(c.memory_gb, 0) },
    { key: 'memory_bandwidth_gbs', label: 'bandwidth GB/s', render: (c) => fixed(c.memory_bandwidth_gbs, 0) },
    { key: 'decode', label: 'decode tok/s', render: (c) => (c.prediction ? fixed(c.prediction.decode_tok_s, 1) : '-') },
    { key: 'tpot', label: 'TPOT ms', render: (c) => (c.prediction ? fixed(c.prediction.tpot_s * 1e3, 2) : '-') },
    { key: 'bound', label: 'bound', render: (c) => (c.prediction ? c.prediction.bound : '-') },
    {
      key: 'usd',
      label: 'USD / M tokens',
      render: (c) => (c.prediction ? fixed(c.prediction.usd_per_million_tokens, 3) : '-'),
    },
    { key: 'fits', label: 'fits', render: (c) => (c.prediction ? (c.prediction.fits ? 'yes' : 'no') : c.error) },
  ];
  // Racks (many chips counted as one entry) would flatten every single chip's bar: they stay in the table.
  const charted = predicted.filter((c) => c.kind !== 'rack');
  const labels = charted.map((c) => c.id);
  const options = (list, chosen) =>
    (list.includes(chosen) ? list : [chosen].concat(list)).map((v) => html`<option value=${v}>${v}</option>`);
  return html`<${Page} title="Chips" loading=${answer === null && !error} error=${error}
    empty=${answer && rows.length === 0 ? answer.note || 'The catalog is empty.' : null}>
    <form class="inline" onSubmit=${submit} aria-label="workload to predict">
      <label>Model <select name="model" value=${query.model}>${options((answer && answer.models) || [], query.model)}</select></label>
      <label>Format <select name="format" value=${query.format}>${options((answer && answer.formats) || [], query.format)}</select></label>
      <label>Batch <input name="batch" type="number" min="1" max="4096" value=${query.batch} /></label>
      <label>Context <input name="context" type="number" min="1" value=${query.context} /></label>
      <button type="submit">Predict</button>
    </form>
    <div class="grid2">
      <figure>
        <figcaption>${
          `Predicted decode tokens/s per chip (${shown.model}, ${shown.format}, batch ${shown.batch}, ` +
          `context ${shown.context}; racks in the table only)`
        }</figcaption>
        <${BarChart} labels=${labels} datasets=${[{ label: 'tokens/s', data: charted.map((c) => c.prediction.decode_tok_s) }]} />
      </figure>
      <figure>
        <figcaption>Predicted USD per million tokens</figcaption>
        <${BarChart} labels=${labels} datasets=${[{ label: 'USD / M tokens', data: charted.map((c) => c.prediction.usd_per_million_tokens) }]} />
      </figure>
    </div>
    <${Table} columns=${columns} rows=${rows} />
  <//>`;
}
