// The playground: chat with any model the key may call (fine-tuned ones included), streamed over SSE, with the
// system prompt and sampling parameters, the same request as curl and as Python, and the answer's signed label.
import { html, useEffect, useRef, useState } from '../vendor/preact-htm.js';
import { api } from '../api.js';
import { Page, copyButton } from '../ui.js';
import { hashParams, numberOr, sseEvents } from './common.js';

const PARAMS = [
  { key: 'temperature', label: 'temperature', step: '0.1', min: '0', max: '2' },
  { key: 'top_p', label: 'top_p', step: '0.05', min: '0', max: '1' },
  { key: 'max_tokens', label: 'max_tokens', step: '1', min: '1' },
  { key: 'seed', label: 'seed', step: '1', min: '0' },
];

// The request body the form describes; `messages` already includes the system prompt.
export function requestBody(model, messages, params, stream) {
  const body = { model, messages };
  for (const { key } of PARAMS) {
    const value = numberOr(params[key]);
    if (value !== undefined) body[key] = value;
  }
  const stops = (params.stop || '').split('\n').filter((s) => s.length > 0);
  if (stops.length) body.stop = stops.slice(0, 4);
  if (stream) {
    body.stream = true;
    body.stream_options = { include_usage: true };
  }
  return body;
}

function curlOf(body) {
  const json = JSON.stringify(body, null, 2).replace(/'/g, "'\\''");
  return `curl ${window.location.origin}/v1/chat/completions \\\n  -H "Authorization: Bearer $CUMULO_API_KEY" \\\n  -H "Content-Type: application/json" \\\n  -d '${json}'`;
}

function pythonOf(body) {
  const { model, messages, stream, stream_options: _, ...rest } = body;
  const args = [`    model=${JSON.stringify(model)},`, `    messages=${JSON.stringify(messages)},`];
  for (const [k, v] of Object.entries(rest)) args.push(`    ${k}=${JSON.stringify(v)},`);
  if (stream) args.push('    stream=True,');
  const read = stream
    ? 'for chunk in answer:\n    if chunk.choices:\n        print(chunk.choices[0].delta.content or "", end="")'
    : 'print(answer.choices[0].message.content)';
  return (
    'import os\nfrom openai import OpenAI\n\n' +
    `client = OpenAI(base_url="${window.location.origin}/v1", api_key=os.environ["CUMULO_API_KEY"])\n` +
    `answer = client.chat.completions.create(\n${args.join('\n')}\n)\n${read}\n`
  );
}

function Label({ label, seal, text }) {
  const [check, setCheck] = useState(null);
  if (!label && !seal) return null;
  const verify = async () => {
    try {
      setCheck(await api('/v1/labels/verify', { method: 'POST', body: { text, label } }));
    } catch (e) {
      setCheck({ valid: false, reason: e.message });
    }
  };
  return html`<section class="label" aria-label="label of the answer">
    <h3>Label</h3>
    <dl>
      <dt>model seal</dt><dd class="mono" data-test="seal">${seal || (label && label.seal) || '-'}</dd>
      ${
        label &&
        html`<dt>content id</dt><dd class="mono">${label.content_id}</dd>
        <dt>content sha256</dt><dd class="mono">${label.content_sha256}</dd>
        <dt>signed by key</dt><dd class="mono">${label.key_id}</dd>`
      }
    </dl>
    ${
      label &&
      html`<button type="button" onClick=${verify}>Verify label</button>
      ${check && html`<p data-test="verify" class=${check.valid ? 'ok' : 'bad'}>${check.reason}</p>`}`
    }
  </section>`;
}

export default function Playground() {
  const [models, setModels] = useState(null);
  const [error, setError] = useState(null);
  const [model, setModel] = useState('');
  const [system, setSystem] = useState('');
  const [params, setParams] = useState({ temperature: '', top_p: '', max_tokens: '256', seed: '', stop: '' });
  const [turns, setTurns] = useState([]);
  const [input, setInput] = useState('');
  const [answer, setAnswer] = useState(null); // {text, label, seal, finish, usage, error}
  const [busy, setBusy] = useState(false);
  const abort = useRef(null);

  useEffect(() => {
    api('/v1/models')
      .then((list) => {
        const ids = list.data.map((m) => m.id);
        setModels(list.data);
        const wanted = hashParams().get('model');
        setModel(wanted && ids.includes(wanted) ? wanted : ids[0] || '');
      })
      .catch(setError);
    return () => abort.current && abort.current.abort();
  }, []);

  const messages = (extra) => {
    const all = system.trim() ? [{ role: 'system', content: system }] : [];
    return all.concat(turns, extra ? [extra] : []);
  };
  const draft = requestBody(model, messages(input ? { role: 'user', content: input } : null), params, true);

  const send = async (event) => {
    event.preventDefault();
    if (!input.trim() || busy || !model) return;
    const asked = { role: 'user', content: input };
    const body = requestBody(model, messages(asked), params, true);
    const controller = new AbortController();
    abort.current = controller;
    setTurns((t) => t.concat([asked]));
    setInput('');
    setBusy(true);
    let text = '';
    const shown = { text: '', label: null, seal: null, finish: null, usage: null, error: null };
    setAnswer({ ...shown });
    try {
      const response = await api('/v1/chat/completions', { method: 'POST', body, raw: true });
      shown.seal = response.headers.get('X-Cumulo-Model-Seal');
      for await (const chunk of sseEvents(response, controller.signal)) {
        if (chunk.error) throw new Error(chunk.error.message || 'the stream failed');
        const choice = (chunk.choices || [])[0];
        if (choice) {
          text += (choice.delta && choice.delta.content) || '';
          if (choice.finish_reason) shown.finish = choice.finish_reason;
          if (choice.label) shown.label = choice.label;
        }
        if (chunk.usage) shown.usage = chunk.usage;
        setAnswer({ ...shown, text });
      }
      if (controller.signal.aborted) setAnswer({ ...shown, text, finish: 'stopped' });
      setTurns((t) => t.concat([{ role: 'assistant', content: text }]));
    } catch (e) {
      setAnswer({ ...shown, text, error: e.message || String(e) });
      if (!text) {
        // Nothing came back: take the question out of the history and give it back to edit.
        setTurns((t) => t.slice(0, -1));
        setInput(asked.content);
      }
    } finally {
      setBusy(false);
      abort.current = null;
    }
  };

  const stop = () => abort.current && abort.current.abort();
  const clear = () => {
    setTurns([]);
    setAnswer(null);
  };
  const setParam = (key) => (e) => setParams({ ...params, [key]: e.target.value });
  const curl = curlOf(draft);
  const python = pythonOf(draft);

  return html`<${Page}
    title="Playground"
    loading=${models === null && !error}
    error=${error}
    empty=${models !== null && models.length === 0 ? 'No model is available to this key.' : null}
  >
    <div class="playground">
      <form class="settings" onSubmit=${send} aria-label="request settings">
        <label>Model
          <select name="model" value=${model} onChange=${(e) => setModel(e.target.value)}>
            ${(models || []).map(
              (m) => html`<option value=${m.id}>${m.id}${m.parent ? ` (tuned from ${m.parent})` : ''}</option>`,
            )}
          </select>
        </label>
        <label>System prompt
          <textarea name="system" rows="3" value=${system} onInput=${(e) => setSystem(e.target.value)}></textarea>
        </label>
        <div class="params">
          ${PARAMS.map(
            (p) => html`<label>${p.label}
              <input name=${p.key} type="number" step=${p.step} min=${p.min} max=${p.max}
                value=${params[p.key]} onInput=${setParam(p.key)} />
            </label>`,
          )}
          <label>stop (one per line, up to 4)
            <textarea name="stop" rows="2" value=${params.stop} onInput=${setParam('stop')}></textarea>
          </label>
        </div>
      </form>
      <section class="chat" aria-label="conversation">
        <ol class="turns" aria-live="polite">
          ${turns.map(
            (t) => html`<li class=${'turn ' + t.role}><b>${t.role}</b><pre class="text">${t.content}</pre></li>`,
          )}
          ${
            busy &&
            answer &&
            html`<li class="turn assistant"><b>assistant</b><pre class="text" data-test="streaming">${answer.text}</pre></li>`
          }
        </ol>
        ${answer && answer.error && html`<p class="error" role="alert" data-test="chat-error">${answer.error}</p>`}
        <form class="ask" onSubmit=${send}>
          <label class="grow">Message
            <textarea name="message" rows="3" value=${input} onInput=${(e) => setInput(e.target.value)}
              onKeyDown=${(e) => e.key === 'Enter' && (e.ctrlKey || e.metaKey) && send(e)}></textarea>
          </label>
          <div class="buttons">
            <button type="submit" disabled=${busy || !model}>Send</button>
            ${busy && html`<button type="button" onClick=${stop}>Stop</button>`}
            <button type="button" onClick=${clear} disabled=${busy}>Clear</button>
          </div>
        </form>
        ${
          answer &&
          !busy &&
          html`<p class="meta" data-test="finish">
            finish: ${answer.finish || '-'}${
              answer.usage
                ? ` · ${answer.usage.prompt_tokens} prompt + ${answer.usage.completion_tokens} completion tokens`
                : ''
            }
          </p>
          <${Label} label=${answer.label} seal=${answer.seal} text=${answer.text} />`
        }
      </section>
      <section class="code" aria-label="the request as code">
        <h3>curl ${copyButton(curl)}</h3>
        <pre class="mono" data-test="curl">${curl}</pre>
        <h3>Python (openai) ${copyButton(python)}</h3>
        <pre class="mono" data-test="python">${python}</pre>
      </section>
    </div>
  <//>`;
}
