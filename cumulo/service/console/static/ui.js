// Shared pieces of every page: the page frame with its loading / error / empty states, tables, charts on
// window.Chart, a copy button and time formatting. Data is rendered as text only (htm escapes strings).
import { html, useEffect, useRef, useState } from './vendor/preact-htm.js';

export { html };

export function Page({ title, loading = false, error = null, empty = null, actions = null, children }) {
  let body = children;
  if (loading) body = html`<p class="state loading" role="status">Loading…</p>`;
  else if (error) body = html`<p class="state error" role="alert">${errorText(error)}</p>`;
  else if (empty) body = html`<p class="state empty">${empty}</p>`;
  return html`<section class="page" aria-busy=${loading ? 'true' : 'false'}>
    <header class="page-head"><h1>${title}</h1>${actions}</header>
    ${body}
  </section>`;
}

export function errorText(error) {
  if (!error) return '';
  if (typeof error === 'string') return error;
  return error.status ? `${error.message} (${error.status})` : String(error.message || error);
}

export function Table({ columns, rows, caption = null }) {
  return html`<div class="table-wrap"><table>
    ${caption && html`<caption>${caption}</caption>`}
    <thead><tr>${columns.map((c) => html`<th scope="col">${c.label}</th>`)}</tr></thead>
    <tbody>${rows.map((row, i) => html`<tr key=${row.id ?? i}>${columns.map(
      (c) => html`<td data-label=${c.label}>${c.render ? c.render(row) : cell(row[c.key])}</td>`,
    )}</tr>`)}</tbody>
  </table></div>`;
}

function cell(value) {
  return value === null || value === undefined ? '' : String(value);
}

const COLOURS = ['#2563eb', '#db2777', '#16a34a', '#ea580c', '#7c3aed', '#0891b2', '#ca8a04', '#64748b'];

function ChartCanvas({ type, labels, datasets, stacked = false, label = 'chart' }) {
  const canvas = useRef(null);
  const chart = useRef(null);
  useEffect(() => {
    if (!window.Chart) return undefined;
    const coloured = datasets.map((d, i) => ({
      backgroundColor: COLOURS[i % COLOURS.length],
      borderColor: COLOURS[i % COLOURS.length],
      ...d,
    }));
    chart.current = new window.Chart(canvas.current, {
      type,
      data: { labels, datasets: coloured },
      options: {
        responsive: true,
        maintainAspectRatio: false,
        animation: false,
        scales: { x: { stacked }, y: { stacked, beginAtZero: true } },
      },
    });
    return () => chart.current.destroy();
  }, [JSON.stringify([type, labels, datasets, stacked])]);
  if (!window.Chart) return html`<p class="state error">Charts are unavailable (vendor/chart.umd.js missing).</p>`;
  return html`<div class="chart"><canvas ref=${canvas} role="img" aria-label=${label}></canvas></div>`;
}

export function LineChart(props) {
  return html`<${ChartCanvas} type="line" ...${props} />`;
}

export function BarChart(props) {
  return html`<${ChartCanvas} type="bar" ...${props} />`;
}

function CopyButton({ text, label = 'Copy' }) {
  const [done, setDone] = useState(false);
  const copy = async () => {
    try {
      await navigator.clipboard.writeText(text);
      setDone(true);
    } catch {
      setDone(false);
    }
  };
  return html`<button type="button" class="copy" onClick=${copy}>${done ? 'Copied' : label}</button>`;
}

export function copyButton(text, label = 'Copy') {
  return html`<${CopyButton} text=${text} label=${label} />`;
}

export function fmtTime(unixSeconds) {
  if (unixSeconds === null || unixSeconds === undefined) return '';
  return new Date(unixSeconds * 1000).toISOString().replace('T', ' ').slice(0, 19) + ' UTC';
}

export function fmtNumber(n) {
  return n === null || n === undefined ? '' : Number(n).toLocaleString('en-US');
}

export function fmtSeconds(s) {
  return s === null || s === undefined ? '' : `${(s * 1000).toFixed(0)} ms`;
}

export function fmtUsd(x) {
  return x === null || x === undefined ? '' : `$${Number(x).toFixed(6)}`;
}

// Runs `load` on mount and whenever `deps` change: {loading, error, data, reload}.
export function useLoad(load, deps = []) {
  const [state, setState] = useState({ loading: true, error: null, data: null });
  const [tick, setTick] = useState(0);
  useEffect(() => {
    let live = true;
    setState((s) => ({ ...s, loading: true, error: null }));
    load().then(
      (data) => live && setState({ loading: false, error: null, data }),
      (error) => live && setState({ loading: false, error, data: null }),
    );
    return () => {
      live = false;
    };
  }, [...deps, tick]);
  return { ...state, reload: () => setTick((t) => t + 1) };
}
