// The edge fleet: devices with their health, last heartbeat and last result, results as they arrive (the SSE
// stream /v1/edge/results/stream), and rollouts with their state.
import { html, useEffect, useRef, useState } from '../vendor/preact-htm.js';
import { api } from '../api.js';
import { Page, Table, copyButton, fmtTime } from '../ui.js';
import { sseEvents } from './common.js';

const SHOWN = 50; // results kept on screen
const RECONNECT_MS = 3000;
const REFRESH_MS = 10000;

function health(d) {
  if (d.state !== 'enrolled') return d.state;
  return d.online ? 'online' : 'offline';
}

function brief(result) {
  if (!result) return '-';
  return `${result.kind} ${JSON.stringify(result.body)}`.slice(0, 120);
}

// Follows /v1/edge/results/stream, calling `onResult` per result; reconnects after a drop until unmounted.
function useResultStream(onResult, onState) {
  const latest = useRef(onResult);
  latest.current = onResult;
  useEffect(() => {
    const controller = new AbortController();
    let timer = null;
    const connect = async () => {
      try {
        const response = await api('/v1/edge/results/stream', { raw: true });
        onState('live');
        for await (const item of sseEvents(response, controller.signal)) {
          if (item.object === 'edge.result') latest.current(item);
          else if (item.object === 'edge.lost') onState(`live (${item.count} results skipped: reload to see them)`);
        }
      } catch (e) {
        if (controller.signal.aborted) return;
        onState(`reconnecting: ${e.message || e}`);
      }
      if (!controller.signal.aborted) timer = setTimeout(connect, RECONNECT_MS);
    };
    connect();
    return () => {
      controller.abort();
      clearTimeout(timer);
    };
  }, []);
}

// Adds a device; the one-time token its agent needs (`cumulo edge agent --server URL --token T`) is shown once.
function Enrol({ onEnrolled }) {
  const [made, setMade] = useState(null);
  const [error, setError] = useState(null);
  const submit = async (event) => {
    event.preventDefault();
    const f = event.target.elements;
    const body = { name: f.name.value.trim() };
    if (f.device_id.value.trim()) body.device_id = f.device_id.value.trim();
    setError(null);
    try {
      const device = await api('/v1/edge/devices', { method: 'POST', body });
      setMade(device);
      onEnrolled(device);
      event.target.reset();
    } catch (e) {
      setError(e.message);
    }
  };
  return html`<form class="card" onSubmit=${submit} aria-label="enrol a device">
    <h3>Enrol a device</h3>
    <label>Device id <input name="device_id" maxlength="64" placeholder="generated" /></label>
    <label>Name <input name="name" maxlength="128" /></label>
    <button type="submit">Create</button>
    ${error && html`<p class="error" role="alert">${error}</p>`}
    ${
      made &&
      html`<p class="ok" data-test="enrolment">Token for ${made.device_id} (shown once, valid until
      ${fmtTime(made.token_expires_at)}): <code>${made.enrollment_token}</code> ${copyButton(made.enrollment_token)}</p>`
    }
  </form>`;
}

export default function Edge() {
  const [devices, setDevices] = useState(null);
  const [results, setResults] = useState([]);
  const [rollouts, setRollouts] = useState([]);
  const [error, setError] = useState(null);
  const [stream, setStream] = useState('connecting');
  const [last, setLast] = useState({}); // device id -> its newest result

  useEffect(() => {
    api('/console/api/edge/recent')
      .then((r) => {
        setResults((now) => merge(now, r.data));
        setLast((now) => ({ ...r.last_by_device, ...now }));
      })
      .catch(setError);
    // Heartbeats and rollout states change without an event: read them again every few seconds.
    const refresh = () =>
      Promise.all([api('/v1/edge/devices'), api('/v1/edge/rollouts')])
        .then(([d, o]) => {
          setDevices(d.data);
          setRollouts(o.data);
        })
        .catch(setError);
    refresh();
    const timer = setInterval(refresh, REFRESH_MS);
    return () => clearInterval(timer);
  }, []);
  useResultStream((item) => {
    setResults((now) => merge(now, [item]));
    setLast((now) => ({ ...now, [item.device_id]: item }));
  }, setStream);

  const deviceColumns = [
    { key: 'device_id', label: 'device' },
    { key: 'name', label: 'name' },
    { key: 'health', label: 'health', render: (d) => html`<span class=${'status ' + health(d)}>${health(d)}</span>` },
    { key: 'last_seen', label: 'last heartbeat', render: (d) => (d.last_seen ? fmtTime(d.last_seen) : 'never') },
    { key: 'model', label: 'model', render: (d) => (d.desired && d.desired.model ? d.desired.model.name : '-') },
    { key: 'last', label: 'last result', render: (d) => brief(last[d.device_id]) },
  ];
  const resultColumns = [
    { key: 'received_at', label: 'received', render: (r) => fmtTime(r.received_at) },
    { key: 'device_id', label: 'device' },
    { key: 'kind', label: 'kind' },
    { key: 'body', label: 'body', render: (r) => JSON.stringify(r.body) },
  ];
  const rolloutColumns = [
    { key: 'id', label: 'rollout' },
    { key: 'model', label: 'model', render: (o) => (o.model ? `${o.model.name} ${o.model.version || ''}` : '-') },
    { key: 'state', label: 'state', render: (o) => html`<span class=${'status ' + o.state}>${o.state}</span>` },
    { key: 'reason', label: 'reason', render: (o) => o.reason || '-' },
    { key: 'canaries', label: 'canaries', render: (o) => o.canaries.join(', ') || '-' },
    { key: 'updated_at', label: 'updated', render: (o) => fmtTime(o.updated_at) },
  ];
  return html`<${Page} title="Edge fleet" loading=${devices === null && !error} error=${error}>
    <h3>Devices</h3>
    ${
      devices && devices.length === 0
        ? html`<p class="empty">No device yet: enrol one below.</p>`
        : html`<${Table} columns=${deviceColumns} rows=${devices || []} />`
    }
    <h3>Results <small data-test="stream-state">${stream}</small></h3>
    ${
      results.length === 0
        ? html`<p class="empty">No result yet; new ones appear here as devices send them.</p>`
        : html`<${Table} columns=${resultColumns} rows=${results} />`
    }
    <h3>Rollouts</h3>
    ${
      rollouts.length === 0
        ? html`<p class="empty">No rollout.</p>`
        : html`<${Table} columns=${rolloutColumns} rows=${rollouts} />`
    }
    <${Enrol} onEnrolled=${(d) => setDevices((now) => (now || []).concat([d]))} />
  <//>`;
}

// Newest first by id, each result once, at most SHOWN.
function merge(now, more) {
  const byId = new Map(now.map((r) => [r.id, r]));
  for (const r of more) byId.set(r.id, r);
  return [...byId.values()].sort((a, b) => b.id - a.id).slice(0, SHOWN);
}
