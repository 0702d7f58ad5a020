// Keys: the organisation's API keys; create one (name, expiry; the secret is shown once) or revoke one.
import { api } from '../api.js';
import { Page, Table, copyButton, fmtTime, html, useLoad } from '../ui.js';
import { useState } from '../vendor/preact-htm.js';

function CreateForm({ onCreated }) {
  const [name, setName] = useState('');
  const [days, setDays] = useState('');
  const [error, setError] = useState(null);
  const submit = async (event) => {
    event.preventDefault();
    setError(null);
    try {
      const body = { name: name.trim(), expires_in_days: days ? Number(days) : null };
      onCreated(await api('/console/api/keys', { method: 'POST', body }));
      setName('');
      setDays('');
    } catch (err) {
      setError(err);
    }
  };
  return html`<form class="form-row" onSubmit=${submit} aria-label="Create a key">
    <label>Name <input name="name" maxlength="128" value=${name} onInput=${(e) => setName(e.target.value)} /></label>
    <label>Expires in days <input name="expires_in_days" type="number" min="1" max="3650" placeholder="never"
      value=${days} onInput=${(e) => setDays(e.target.value)} /></label>
    <button type="submit">Create key</button>
    ${error && html`<p class="state error" role="alert">${error.message}</p>`}
  </form>`;
}

export default function KeysPage({ session }) {
  const { loading, error, data, reload } = useLoad(() => api('/console/api/keys'));
  const [secret, setSecret] = useState(null);
  const [actionError, setActionError] = useState(null);
  const revoke = async (key) => {
    if (!confirm(`Revoke key ${key.prefix}… (${key.name || 'unnamed'})? Programs using it stop working.`)) return;
    try {
      await api(`/console/api/keys/${key.id}/revoke`, { method: 'POST' });
      setActionError(null);
      reload();
    } catch (err) {
      setActionError(err);
    }
  };
  const columns = [
    { key: 'name', label: 'Name' },
    { key: 'prefix', label: 'Key', render: (k) => `${k.prefix}…${k.current ? ' (this session)' : ''}` },
    { key: 'plan', label: 'Plan' },
    { key: 'created_at', label: 'Created', render: (k) => fmtTime(k.created_at) },
    { key: 'expires_at', label: 'Expires', render: (k) => (k.expires_at ? fmtTime(k.expires_at) : 'never') },
    { key: 'state', label: 'State', render: (k) => (k.revoked_at ? `revoked ${fmtTime(k.revoked_at)}` : 'active') },
    { key: 'actions', label: '', render: (k) => (k.revoked_at ? '' : html`<button type="button" class="danger"
      data-revoke=${k.id} onClick=${() => revoke(k)}>Revoke</button>`) },
  ];
  const rows = data ? data.data : [];
  return html`<${Page} title=${`Keys of ${session.org}`} loading=${loading} error=${error}>
    <${CreateForm} onCreated=${(key) => { setSecret(key); reload(); }} />
    ${secret && html`<div class="secret" role="status">
      <span>New key <strong>${secret.name || secret.prefix}</strong>, shown this once:</span>
      <code id="new-secret">${secret.key}</code>${copyButton(secret.key)}
      <button type="button" class="secondary" onClick=${() => setSecret(null)}>Done</button></div>`}
    ${actionError && html`<p class="state error" role="alert">${actionError.message}</p>`}
    ${rows.length ? html`<${Table} columns=${columns} rows=${rows} />` : html`<p class="state empty">No keys.</p>`}
  <//>`;
}
