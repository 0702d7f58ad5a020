// The console's shell: sign-in screen, nav, and a hash router (#/usage, #/keys, ...) that imports each page's
// module only when it is first opened.
import { html, render, useEffect, useState } from './vendor/preact-htm.js';
import { session, signIn, signOut } from './api.js';
import { PAGES } from './pages/index.js';
import { Page, errorText } from './ui.js';

function currentId() {
  return location.hash.replace(/^#\/?/, '').split('?')[0] || 'usage';
}

function SignIn({ onSignedIn }) {
  const [key, setKey] = useState('');
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);
  const submit = async (event) => {
    event.preventDefault();
    setBusy(true);
    setError(null);
    try {
      onSignedIn(await signIn(key.trim()));
    } catch (err) {
      setError(err);
    } finally {
      setBusy(false);
    }
  };
  return html`<main class="signin">
    <form onSubmit=${submit} aria-labelledby="signin-title">
      <h1 id="signin-title">Cumulo console</h1>
      <label for="api-key">API key</label>
      <input id="api-key" name="api_key" type="password" autocomplete="off" required placeholder="sk-cumulo-…"
        value=${key} onInput=${(e) => setKey(e.target.value)} />
      <button type="submit" disabled=${busy}>${busy ? 'Signing in…' : 'Sign in'}</button>
      ${error && html`<p class="state error" role="alert">${errorText(error)}</p>`}
      <p class="hint">The key stays in this server's memory for the request only; the browser keeps a signed
        session cookie, never the key.</p>
    </form>
  </main>`;
}

function Loaded({ entry, who }) {
  const [state, setState] = useState({ component: null, error: null });
  useEffect(() => {
    let live = true;
    setState({ component: null, error: null });
    import(`./pages/${entry.module}`).then(
      (mod) => live && setState({ component: mod.default, error: null }),
      () => live && setState({ component: null, error: `The ${entry.title} page is not available yet.` }),
    );
    return () => {
      live = false;
    };
  }, [entry.id]);
  if (state.error) return html`<${Page} title=${entry.title} error=${state.error} />`;
  if (!state.component) return html`<${Page} title=${entry.title} loading=${true} />`;
  return html`<${state.component} session=${who} />`;
}

function Shell({ who, onSignedOut }) {
  const [id, setId] = useState(currentId());
  const [menuOpen, setMenuOpen] = useState(false);
  useEffect(() => {
    const onHash = () => {
      setId(currentId());
      setMenuOpen(false);
    };
    addEventListener('hashchange', onHash);
    return () => removeEventListener('hashchange', onHash);
  }, []);
  const pages = PAGES.filter((p) => !p.admin || who.is_admin);
  const entry = pages.find((p) => p.id === id);
  const out = async () => {
    await signOut();
    onSignedOut();
  };
  return html`<div class="shell">
    <header class="top">
      <a class="brand" href="#/usage">Cumulo</a>
      <button type="button" class="menu" aria-expanded=${menuOpen ? 'true' : 'false'} aria-controls="nav"
        onClick=${() => setMenuOpen(!menuOpen)}>Menu</button>
      <span class="who" title=${who.key_prefix}>${who.org}${who.is_admin ? ' (admin)' : ''}</span>
      <button type="button" class="signout" onClick=${out}>Sign out</button>
    </header>
    <nav id="nav" class=${menuOpen ? 'open' : ''} aria-label="Console pages">
      <ul>${pages.map((p) => html`<li key=${p.id}>
        <a href=${`#/${p.id}`} aria-current=${p.id === id ? 'page' : null}>${p.title}</a></li>`)}</ul>
    </nav>
    <main id="main">
      ${entry
        ? html`<${Loaded} key=${entry.id} entry=${entry} who=${who} />`
        : html`<${Page} title="Not found" error=${`No console page named '${id}'.`} />`}
    </main>
  </div>`;
}

function App() {
  const [state, setState] = useState({ loading: true, who: null, error: null });
  useEffect(() => {
    session().then(
      (who) => setState({ loading: false, who, error: null }),
      (error) => setState({ loading: false, who: null, error }),
    );
  }, []);
  if (state.loading) return html`<p class="boot" role="status">Loading the console…</p>`;
  if (state.error) return html`<p class="state error" role="alert">${errorText(state.error)}</p>`;
  if (!state.who) return html`<${SignIn} onSignedIn=${(who) => setState({ loading: false, who, error: null })} />`;
  return html`<${Shell} who=${state.who} onSignedOut=${() => setState({ loading: false, who: null, error: null })} />`;
}

const root = document.getElementById('app');
root.textContent = '';
render(html`<${App} />`, root);
