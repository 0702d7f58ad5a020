// Talks to the gateway from the console: same-origin fetch with the session cookie, the CSRF header on writes,
// OpenAI's error JSON turned into ApiError.

export class ApiError extends Error {
  constructor(status, message, code = null, param = null) {
    super(message);
    this.name = 'ApiError';
    this.status = status;
    this.code = code;
    this.param = param;
  }
}

let csrf = null; // from the session; sent as X-CSRF-Token on every non-GET request

export async function api(path, { method = 'GET', body, raw = false } = {}) {
  const headers = {};
  if (method !== 'GET' && method !== 'HEAD') {
    if (csrf === null) await session();
    if (csrf) headers['X-CSRF-Token'] = csrf;
  }
  let payload;
  if (body instanceof FormData) payload = body;
  else if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    payload = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, { method, headers, body: payload, credentials: 'same-origin' });
  } catch (err) {
    throw new ApiError(0, `network error: ${err.message}`, 'network_error');
  }
  if (!response.ok) throw await toError(response);
  if (raw) return response;
  if (response.status === 204) return null;
  const type = response.headers.get('content-type') || '';
  return type.includes('json') ? response.json() : response.text();
}

async function toError(response) {
  try {
    const { error } = await response.json();
    return new ApiError(response.status, error.message, error.code, error.param);
  } catch {
    return new ApiError(response.status, `${response.status} ${response.statusText}`);
  }
}

// {org, org_id, is_admin, key_name, key_prefix, plan, expires_at, csrf} when signed in, else null.
export async function session() {
  const response = await fetch('/console/session', { credentials: 'same-origin' });
  if (response.status === 401) {
    csrf = '';
    return null;
  }
  if (!response.ok) throw await toError(response);
  const who = await response.json();
  csrf = who.csrf;
  return who;
}

export async function signIn(apiKey) {
  const response = await fetch('/console/session', {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ api_key: apiKey }),
    credentials: 'same-origin',
  });
  if (!response.ok) throw await toError(response);
  const who = await response.json();
  csrf = who.csrf;
  return who;
}

export async function signOut() {
  await fetch('/console/session', { method: 'DELETE', credentials: 'same-origin' });
  csrf = '';
}

function csvCell(value) {
  const text = value === null || value === undefined ? '' : String(value);
  // A leading = + - @ would be a formula in a spreadsheet: quote it as text.
  const safe = typeof value === 'string' && /^[=+\-@\t\r]/.test(text) ? `'${text}` : text;
  return /[",\n\r]/.test(safe) ? `"${safe.replaceAll('"', '""')}"` : safe;
}

// rows: an array of objects (the first one's keys are the columns) or of arrays (the first is the header).
export function toCsv(rows) {
  if (!rows.length) return '';
  const table = Array.isArray(rows[0]) ? rows : [Object.keys(rows[0]), ...rows.map((r) => Object.values(r))];
  return table.map((row) => row.map(csvCell).join(',')).join('\r\n') + '\r\n';
}

export function downloadCsv(filename, rows) {
  const url = URL.createObjectURL(new Blob([toCsv(rows)], { type: 'text/csv' }));
  const link = document.createElement('a');
  link.href = url;
  link.download = filename;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}
