// Fine-tuning: upload a JSONL training file (every bad line named before it leaves the browser; the server's own
// check names the first), start a job, list jobs, follow one job's events live and draw its loss curve.
import { html, useEffect, useState } from '../vendor/preact-htm.js';
import { api } from '../api.js';
import { LineChart, Page, Table, fmtTime } from '../ui.js';
import { jsonlErrors, numberOr } from './common.js';

const FINAL = ['succeeded', 'failed', 'cancelled'];
const POLL_MS = 2000;

// Every event of a job, oldest first (the API pages newest first, `after` the last id seen).
async function allEvents(jobId) {
  const out = [];
  let after = null;
  for (let page = 0; page < 20; page++) {
    const query = `limit=1000${after ? `&after=${encodeURIComponent(after)}` : ''}`;
    const list = await api(`/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}/events?${query}`);
    out.push(...list.data);
    if (!list.has_more || !list.data.length) break;
    after = list.data[list.data.length - 1].id;
  }
  return out.sort((a, b) => idNumber(a.id) - idNumber(b.id));
}

function idNumber(id) {
  return Number(String(id).replace(/\D/g, '')) || 0;
}

// Loss per step from the `metrics` events: {labels: [step...], datasets: [{label, data}]}.
export function lossCurve(events) {
  const steps = new Map();
  for (const e of events) {
    if (e.type !== 'metrics' || !e.data || e.data.step === undefined) continue;
    steps.set(e.data.step, e.data);
  }
  const rows = [...steps.values()].sort((a, b) => a.step - b.step);
  const datasets = [{ label: 'train loss', data: rows.map((r) => r.train_loss ?? null) }];
  if (rows.some((r) => r.valid_loss !== undefined)) {
    datasets.push({ label: 'validation loss', data: rows.map((r) => r.valid_loss ?? null) });
  }
  return { labels: rows.map((r) => r.step), datasets, points: rows.length };
}

function Upload({ onUploaded }) {
  const [errors, setErrors] = useState([]);
  const [done, setDone] = useState(null);
  const [busy, setBusy] = useState(false);
  const submit = async (event) => {
    event.preventDefault();
    const file = event.target.elements.file.files[0];
    setDone(null);
    if (!file) return setErrors(['choose a .jsonl file first']);
    const found = jsonlErrors(await file.text());
    setErrors(found);
    if (found.length) return;
    const form = new FormData();
    form.append('purpose', 'fine-tune');
    form.append('file', file, file.name);
    setBusy(true);
    try {
      const stored = await api('/v1/files', { method: 'POST', body: form });
      setDone(stored);
      onUploaded(stored);
    } catch (e) {
      setErrors([e.message]);
    } finally {
      setBusy(false);
    }
  };
  return html`<form class="card" onSubmit=${submit} aria-label="upload a training file">
    <h3>Upload training data</h3>
    <p class="hint">JSONL: one <code>{"messages": [...]}</code> conversation per line.</p>
    <input type="file" name="file" accept=".jsonl,.json,application/jsonl" />
    <button type="submit" disabled=${busy}>Upload</button>
    ${
      errors.length > 0 &&
      html`<ul class="error" role="alert" data-test="file-errors">${errors.map((e) => html`<li>${e}</li>`)}</ul>`
    }
    ${done && html`<p class="ok" data-test="uploaded">Uploaded ${done.filename} as ${done.id}</p>`}
  </form>`;
}

function Create({ models, files, onCreated }) {
  const [error, setError] = useState(null);
  const submit = async (event) => {
    event.preventDefault();
    const f = event.target.elements;
    const hyper = {};
    for (const key of ['n_epochs', 'batch_size', 'learning_rate_multiplier']) {
      const value = numberOr(f[key].value);
      if (value !== undefined) hyper[key] = value;
    }
    const body = { model: f.model.value, training_file: f.training_file.value };
    if (f.suffix.value) body.suffix = f.suffix.value;
    if (f.validation_file.value) body.validation_file = f.validation_file.value;
    if (numberOr(f.seed.value) !== undefined) body.seed = numberOr(f.seed.value);
    body.method = { type: 'supervised', supervised: { hyperparameters: hyper } };
    setError(null);
    try {
      onCreated(await api('/v1/fine_tuning/jobs', { method: 'POST', body }));
    } catch (e) {
      setError(e.message);
    }
  };
  const base = models.filter((m) => !m.parent);
  return html`<form class="card" onSubmit=${submit} aria-label="start a fine-tuning job">
    <h3>Start a job</h3>
    <label>Base model <select name="model">${base.map((m) => html`<option value=${m.id}>${m.id}</option>`)}</select></label>
    <label>Training file
      <select name="training_file">${files.map((f) => html`<option value=${f.id}>${f.filename} (${f.id})</option>`)}</select>
    </label>
    <label>Validation file
      <select name="validation_file"><option value="">none</option>
        ${files.map((f) => html`<option value=${f.id}>${f.filename} (${f.id})</option>`)}</select>
    </label>
    <label>Suffix <input name="suffix" maxlength="64" pattern="[A-Za-z0-9._\\-]*" /></label>
    <label>Epochs <input name="n_epochs" type="number" min="1" max="50" placeholder="auto" /></label>
    <label>Batch size <input name="batch_size" type="number" min="1" max="256" placeholder="auto" /></label>
    <label>Learning-rate multiplier <input name="learning_rate_multiplier" type="number" step="any" min="0" placeholder="auto" /></label>
    <label>Seed <input name="seed" type="number" min="0" /></label>
    <button type="submit" disabled=${!files.length || !base.length}>Start</button>
    ${error && html`<p class="error" role="alert" data-test="job-error">${error}</p>`}
  </form>`;
}

function JobDetail({ job, onChange }) {
  const [events, setEvents] = useState([]);
  const [error, setError] = useState(null);
  useEffect(() => {
    let live = true;
    let timer = null;
    const tick = async () => {
      try {
        const [fresh, evs] = await Promise.all([
          api(`/v1/fine_tuning/jobs/${encodeURIComponent(job.id)}`),
          allEvents(job.id),
        ]);
        if (!live) return;
        setEvents(evs);
        onChange(fresh);
        setError(null);
        if (!FINAL.includes(fresh.status)) timer = setTimeout(tick, POLL_MS);
      } catch (e) {
        if (live) setError(e.message);
        if (live) timer = setTimeout(tick, POLL_MS * 2);
      }
    };
    tick();
    return () => {
      live = false;
      clearTimeout(timer);
    };
  }, [job.id]);
  const curve = lossCurve(events);
  const cancel = async () => {
    try {
      onChange(await api(`/v1/fine_tuning/jobs/${encodeURIComponent(job.id)}/cancel`, { method: 'POST' }));
    } catch (e) {
      setError(e.message);
    }
  };
  return html`<section class="card" aria-label=${'job ' + job.id} data-test="job-detail">
    <h3>${job.id} <span class=${'status ' + job.status} data-test="job-status">${job.status}</span></h3>
    ${error && html`<p class="error" role="alert">${error}</p>`}
    ${
      job.fine_tuned_model &&
      html`<p>Model <code>${job.fine_tuned_model}</code>${' '}
      <a href=${'#/playground?model=' + encodeURIComponent(job.fine_tuned_model)} data-test="try">Try in playground</a></p>`
    }
    ${job.error && job.error.message && html`<p class="error">${job.error.message}</p>`}
    ${!FINAL.includes(job.status) && html`<button type="button" class="danger" onClick=${cancel}>Cancel job</button>`}
    ${
      curve.points > 0
        ? html`<${LineChart} labels=${curve.labels} datasets=${curve.datasets} />`
        : html`<p class="hint">The loss curve appears with the first training step.</p>`
    }
    <h4>Events</h4>
    <ol class="events" data-test="events">
      ${events.map(
        (e) => html`<li class=${e.level}><time>${fmtTime(e.created_at)}</time> <span>${e.message}</span></li>`,
      )}
    </ol>
  </section>`;
}

export default function FineTune() {
  const [jobs, setJobs] = useState(null);
  const [files, setFiles] = useState([]);
  const [models, setModels] = useState([]);
  const [error, setError] = useState(null);
  const [open, setOpen] = useState(null);

  const load = async () => {
    try {
      const [j, f, m] = await Promise.all([
        api('/v1/fine_tuning/jobs?limit=100'),
        api('/v1/files?purpose=fine-tune'),
        api('/v1/models'),
      ]);
      setJobs(j.data);
      setFiles(f.data);
      setModels(m.data);
    } catch (e) {
      setError(e);
    }
  };
  useEffect(() => {
    load();
  }, []);
  const replace = (job) => {
    setJobs((list) => [job].concat((list || []).filter((j) => j.id !== job.id)));
    setOpen((o) => (o && o.id === job.id ? job : o));
  };
  const columns = [
    {
      key: 'id',
      label: 'job',
      render: (j) => html`<button type="button" class="link" onClick=${() => setOpen(j)}>${j.id}</button>`,
    },
    { key: 'model', label: 'base model' },
    { key: 'status', label: 'status' },
    { key: 'fine_tuned_model', label: 'fine-tuned model', render: (j) => j.fine_tuned_model || '-' },
    { key: 'created_at', label: 'created', render: (j) => fmtTime(j.created_at) },
  ];
  return html`<${Page} title="Fine-tuning" loading=${jobs === null && !error} error=${error}>
    <div class="grid2">
      <${Upload} onUploaded=${(f) => setFiles((all) => [f].concat(all))} />
      <${Create} models=${models} files=${files} onCreated=${(job) => {
        replace(job);
        setOpen(job);
      }} />
    </div>
    <h3>Jobs</h3>
    ${
      jobs && jobs.length === 0
        ? html`<p class="empty">No fine-tuning job yet: upload a file and start one.</p>`
        : html`<${Table} columns=${columns} rows=${jobs || []} />`
    }
    ${open && html`<${JobDetail} key=${open.id} job=${open} onChange=${replace} />`}
  <//>`;
}
