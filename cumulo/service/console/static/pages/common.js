// Helpers the playground, fine-tuning, edge and operator pages share: server-sent events from a fetch Response,
// the hash's query, numbers from inputs, and the training-file check.

// The pages' own stylesheet, added once beside app.css (the CSP allows 'self' styles, not inline ones).
if (!document.querySelector('link[data-pages-css]')) {
  const link = document.createElement('link');
  link.rel = 'stylesheet';
  link.href = new URL('./pages.css', import.meta.url).href;
  link.dataset.pagesCss = '';
  document.head.append(link);
}

// Yields each `data:` payload of an SSE body, parsed as JSON ("[DONE]" ends the stream).
export async function* sseEvents(response, signal) {
  const reader = response.body.getReader();
  // Stop must not wait for the next event: cancelling the reader ends a pending read and closes the connection,
  // which the service takes as the client leaving (it aborts the request).
  if (signal) signal.addEventListener('abort', () => reader.cancel().catch(() => {}), { once: true });
  const decoder = new TextDecoder();
  let buffer = '';
  try {
    while (true) {
      if (signal && signal.aborted) return;
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf('\n\n')) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = block
          .split('\n')
          .filter((line) => line.startsWith('data:'))
          .map((line) => line.slice(5).trimStart())
          .join('\n');
        if (!data) continue; // a comment (": keep-alive")
        if (data === '[DONE]') return;
        yield JSON.parse(data);
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

// `#/playground?model=ft:...` -> URLSearchParams of the part after "?".
export function hashParams() {
  const hash = window.location.hash || '';
  const at = hash.indexOf('?');
  return new URLSearchParams(at >= 0 ? hash.slice(at + 1) : '');
}

// Number from an <input> value, or undefined when left empty (so the server's default applies).
export function numberOr(value) {
  if (value === '' || value === null || value === undefined) return undefined;
  const n = Number(value);
  return Number.isFinite(n) ? n : undefined;
}

// Checks a JSONL training file the way the server does, but reports every bad line (the server names the first).
export function jsonlErrors(text, max = 20) {
  const errors = [];
  let examples = 0;
  const lines = text.split('\n');
  for (let i = 0; i < lines.length && errors.length < max; i++) {
    const line = lines[i].trim();
    if (!line) continue;
    let value;
    try {
      value = JSON.parse(line);
    } catch (_) {
      errors.push(`line ${i + 1}: not valid JSON`);
      continue;
    }
    if (value === null || typeof value !== 'object' || Array.isArray(value)) {
      errors.push(`line ${i + 1}: each line must be a JSON object`);
      continue;
    }
    const problem = messagesProblem(value.messages);
    if (problem) {
      errors.push(`line ${i + 1}: ${problem}`);
      continue;
    }
    examples += 1;
  }
  if (!errors.length && examples === 0) errors.push('the file holds no examples (one JSON object per line)');
  return errors;
}

// The first problem with one example's messages (the trainer's checks in cumulo/finetune/data.py), or "".
function messagesProblem(messages) {
  if (!Array.isArray(messages) || !messages.length) return "missing or empty 'messages' list";
  let trainable = false;
  for (let i = 0; i < messages.length; i++) {
    const m = messages[i];
    if (m === null || typeof m !== 'object') return `message ${i + 1} is not an object`;
    if (!['system', 'user', 'assistant'].includes(m.role)) return `message ${i + 1} has unknown role`;
    if (typeof m.content !== 'string') return `message ${i + 1} (${m.role}) must have 'content' as a string`;
    if (m.role === 'assistant' && m.content.trim() && m.weight !== 0) trainable = true;
  }
  return trainable ? '' : 'no assistant message to learn from';
}
