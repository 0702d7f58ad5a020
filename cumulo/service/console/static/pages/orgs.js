// Organisations and plans (admins only): the plans with their limits and prices, the organisations with their
// keys, a form for a new plan, and one for a new organisation (made with its first key, shown once).
import { html, useEffect, useState } from '../vendor/preact-htm.js';
import { api } from '../api.js';
import { Page, Table, copyButton, fmtTime } from '../ui.js';
import { numberOr } from './common.js';

function limit(value) {
  return value === null || value === undefined ? 'unlimited' : String(value);
}

function PlanForm({ onCreated }) {
  const [error, setError] = useState(null);
  const submit = async (event) => {
    event.preventDefault();
    const f = event.target.elements;
    const body = { name: f.name.value.trim(), explicit_label: f.explicit_label.checked };
    for (const key of ['rpm', 'tpm', 'concurrency', 'monthly_tokens', 'price_in', 'price_out']) {
      const value = numberOr(f[key].value);
      if (value !== undefined) body[key] = value;
    }
    const models = f.models.value
      .split(',')
      .map((m) => m.trim())
      .filter(Boolean);
    if (models.length) body.models = models;
    setError(null);
    try {
      onCreated(await api('/admin/plans', { method: 'POST', body }));
      event.target.reset();
    } catch (e) {
      setError(e.message);
    }
  };
  return html`<form class="card" onSubmit=${submit} aria-label="create a plan">
    <h3>New plan</h3>
    <label>Name <input name="name" required maxlength="64" /></label>
    <label>Requests per minute <input name="rpm" type="number" min="0" placeholder="unlimited" /></label>
    <label>Tokens per minute <input name="tpm" type="number" min="0" placeholder="unlimited" /></label>
    <label>Concurrent requests <input name="concurrency" type="number" min="0" placeholder="unlimited" /></label>
    <label>Monthly tokens <input name="monthly_tokens" type="number" min="0" placeholder="unlimited" /></label>
    <label>Models (comma-separated) <input name="models" placeholder="all" /></label>
    <label>USD per million input tokens <input name="price_in" type="number" step="any" min="0" /></label>
    <label>USD per million output tokens <input name="price_out" type="number" step="any" min="0" /></label>
    <label class="check"><input name="explicit_label" type="checkbox" /> visible AI label on every answer</label>
    <button type="submit">Create plan</button>
    ${error && html`<p class="error" role="alert">${error}</p>`}
  </form>`;
}

function OrgForm({ plans, onCreated }) {
  const [error, setError] = useState(null);
  const [made, setMade] = useState(null);
  const submit = async (event) => {
    event.preventDefault();
    const f = event.target.elements;
    const body = { org: f.org.value.trim(), plan: f.plan.value, name: f.key_name.value.trim() || 'first key' };
    setError(null);
    try {
      const key = await api('/admin/keys', { method: 'POST', body });
      setMade(key);
      onCreated(key);
      event.target.reset();
    } catch (e) {
      setError(e.message);
    }
  };
  return html`<form class="card" onSubmit=${submit} aria-label="create an organisation">
    <h3>New organisation</h3>
    <p class="hint">An organisation is created with its first API key.</p>
    <label>Organisation <input name="org" required maxlength="64" /></label>
    <label>Plan <select name="plan">${plans.map((p) => html`<option value=${p.name}>${p.name}</option>`)}</select></label>
    <label>Key name <input name="key_name" maxlength="64" placeholder="first key" /></label>
    <button type="submit" disabled=${!plans.length}>Create</button>
    ${error && html`<p class="error" role="alert">${error}</p>`}
    ${
      made &&
      html`<p class="ok" data-test="new-key">Key for ${made.org} (shown once): <code>${made.key}</code> ${copyButton(made.key)}</p>`
    }
  </form>`;
}

export default function Orgs() {
  const [plans, setPlans] = useState(null);
  const [orgs, setOrgs] = useState([]);
  const [keys, setKeys] = useState([]);
  const [error, setError] = useState(null);
  const load = () =>
    Promise.all([api('/admin/plans'), api('/admin/orgs'), api('/admin/keys')])
      .then(([p, o, k]) => {
        setPlans(p.data);
        setOrgs(o.data);
        setKeys(k.data);
      })
      .catch(setError);
  useEffect(() => {
    load();
  }, []);
  const planColumns = [
    { key: 'name', label: 'plan' },
    { key: 'rpm', label: 'rpm', render: (p) => limit(p.rpm) },
    { key: 'tpm', label: 'tpm', render: (p) => limit(p.tpm) },
    { key: 'concurrency', label: 'concurrency', render: (p) => limit(p.concurrency) },
    { key: 'monthly_tokens', label: 'monthly tokens', render: (p) => limit(p.monthly_tokens) },
    { key: 'models', label: 'models', render: (p) => (p.models && p.models.length ? p.models.join(', ') : 'all') },
    { key: 'price', label: 'USD / M tokens in, out', render: (p) => `${p.price_in}, ${p.price_out}` },
    { key: 'explicit_label', label: 'visible label', render: (p) => (p.explicit_label ? 'yes' : 'no') },
  ];
  const orgRows = orgs.map((o) => {
    const own = keys.filter((k) => k.org === o.name);
    const live = own.filter((k) => !k.revoked_at);
    return { ...o, keys: live.length, plans: [...new Set(live.map((k) => k.plan))].join(', ') || '-' };
  });
  const orgColumns = [
    { key: 'name', label: 'organisation' },
    { key: 'plans', label: 'plans of its keys' },
    { key: 'keys', label: 'live keys' },
    { key: 'created_at', label: 'created', render: (o) => fmtTime(o.created_at) },
  ];
  return html`<${Page} title="Organisations and plans" loading=${plans === null && !error} error=${error}>
    <h3>Plans</h3>
    <${Table} columns=${planColumns} rows=${plans || []} />
    <h3>Organisations</h3>
    ${
      orgRows.length === 0
        ? html`<p class="empty">No organisation yet.</p>`
        : html`<${Table} columns=${orgColumns} rows=${orgRows} />`
    }
    <div class="grid2">
      <${PlanForm} onCreated=${load} />
      <${OrgForm} plans=${plans || []} onCreated=${load} />
    </div>
  <//>`;
}
