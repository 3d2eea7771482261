// The console's entry point: sign in and out, the signed-in header, and the
// hash router (#/keys, #/keys/<id>, #/events, #/settings).

import { probeRole, session } from './api.js';
import { clearNotice, h, mount, notify } from './dom.js';
import { showKeys } from './keys.js';
import { showKey } from './detail.js';
import { showEvents, showSettings } from './pages.js';

const ROUTES = [
  [/^#\/keys\/([A-Za-z0-9_]+)$/, (main, m) => showKey(main, m[1])],
  [/^#\/events$/, showEvents],
  [/^#\/settings$/, showSettings],
  [/^(#\/keys)?$/, showKeys],
];

const main = document.getElementById('main');

async function start() {
  session.onUnauthorized = (err) => signOut(`Signed out: ${err.message}`);
  document.getElementById('sign-out').addEventListener('click', () => signOut('Signed out.'));
  window.addEventListener('hashchange', route);
  if (!session.token()) return signInPage();
  try {
    session.role = await probeRole();
  } catch (e) {
    if (e.status === 401) session.signOut();
    return signInPage(e.message);
  }
  return signedIn();
}

function signInPage(message) {
  header(false);
  const error = h('p', { class: 'dialog-error', id: 'sign-in-error', role: 'alert', hidden: !message }, message || '');
  const input = h('input', { type: 'password', id: 'token', name: 'token', required: true, autocomplete: 'off', spellcheck: 'false' });
  const form = h('form', { class: 'card sign-in', id: 'sign-in' },
    h('h1', {}, 'Sign in'),
    h('p', {}, 'Paste an admin token (one of admin.tokens in the config). It stays in this tab only and is sent to this server’s admin API.'),
    h('label', { class: 'field' }, h('span', { class: 'label' }, 'Admin token'), input),
    error,
    h('div', { class: 'dialog-actions' }, h('button', { type: 'submit', class: 'primary' }, 'Sign in')));
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const token = input.value.trim();
    if (!token) return;
    session.signIn(token);
    try {
      session.role = await probeRole();
    } catch (e) {
      session.signOut();
      mount(error, e.message);
      error.hidden = false;
      return;
    }
    signedIn();
  });
  mount(main, form);
  input.focus();
}

function signedIn() {
  clearNotice();
  header(true);
  route();
}

function signOut(message) {
  session.signOut();
  // The next session starts on the keys page (without firing hashchange).
  history.replaceState(null, '', location.pathname);
  const dlg = document.getElementById('dialog');
  if (dlg.open) dlg.close();
  signInPage();
  notify(message, 'info');
}

function header(signed) {
  document.getElementById('nav').hidden = !signed;
  document.getElementById('who').hidden = !signed;
  if (signed) mount(document.getElementById('who-role'), session.role);
}

async function route() {
  if (!session.role) return;
  const hash = location.hash;
  for (const [re, show] of ROUTES) {
    const m = re.exec(hash);
    if (!m) continue;
    for (const a of document.querySelectorAll('#nav a')) {
      a.classList.toggle('current', hash.startsWith(a.getAttribute('href')) || (a.getAttribute('href') === '#/keys' && !hash));
    }
    main.setAttribute('aria-busy', 'true');
    try {
      await show(main, m);
    } catch (e) {
      notify(e);
    } finally {
      main.removeAttribute('aria-busy');
    }
    return;
  }
  location.hash = '#/keys';
}

start();
