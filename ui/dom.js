// DOM helpers: elements are built with createElement and text nodes only, so
// a string from the API (a key name is user input) can never become markup.

const SVG_NS = 'http://www.w3.org/2000/svg';

// h('a', {href: '#/x', onclick: fn}, 'text', child, [more]) builds an element.
// Attributes named on* become listeners; `value`, `checked` and `disabled` are
// set as properties; null, undefined and false attributes are left out.
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  setAttrs(el, attrs);
  append(el, children);
  if (attrs && 'value' in attrs && attrs.value != null) el.value = attrs.value;
  return el;
}

// The same for SVG elements.
export function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  setAttrs(el, attrs);
  append(el, children);
  return el;
}

function setAttrs(el, attrs) {
  for (const [name, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false || name === 'value') continue;
    if (name.startsWith('on')) el.addEventListener(name.slice(2), v);
    else if (name === 'checked' || name === 'disabled') el[name] = Boolean(v);
    else el.setAttribute(name, v === true ? '' : String(v));
  }
}

// Appends strings (as text), nodes and nested arrays; skips null and false.
export function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

// Replaces the children of `el`.
export function mount(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

// ---------------------------------------------------------------- formatting

const dateTime = new Intl.DateTimeFormat(undefined, { dateStyle: 'medium', timeStyle: 'medium' });
const dateOnly = new Intl.DateTimeFormat(undefined, { dateStyle: 'medium' });

// A <time> element: the short local form, the exact instant on hover.
export function time(iso, { withTime = false, empty = '—' } = {}) {
  if (!iso) return h('span', { class: 'muted' }, empty);
  const d = new Date(iso);
  const shown = (withTime ? dateTime : dateOnly).format(d);
  return h('time', { datetime: iso, title: d.toISOString() }, shown);
}

// "3 min ago", "2 days ago", or a date further back.
export function ago(iso, empty = 'never') {
  if (!iso) return h('span', { class: 'muted' }, empty);
  const secs = (Date.now() - new Date(iso).getTime()) / 1000;
  const [n, unit] =
    secs < 60 ? [0, ''] :
    secs < 3600 ? [Math.floor(secs / 60), 'min'] :
    secs < 86400 ? [Math.floor(secs / 3600), 'h'] :
    secs < 30 * 86400 ? [Math.floor(secs / 86400), 'd'] : [-1, ''];
  if (n < 0) return time(iso);
  const text = n === 0 ? 'just now' : `${n} ${unit} ago`;
  return h('time', { datetime: iso, title: new Date(iso).toISOString() }, text);
}

export function statusBadge(status, attrs = {}) {
  return h('span', { class: `badge status-${status}`, ...attrs }, status);
}

export function scopeChips(scopes) {
  if (!scopes.length) return h('span', { class: 'muted' }, 'none');
  return h('span', { class: 'chips' }, scopes.map((sc) => h('span', { class: 'chip' }, sc)));
}

export function rateLimit(rl) {
  return rl ? `${rl.per_second}/s, burst ${rl.burst}` : 'default';
}

// Splits "a, b c" into ["a", "b", "c"].
export function words(text) {
  return text.split(/[\s,]+/).filter(Boolean);
}

// ---------------------------------------------------------------- notices

let noticeTimer = 0;

// Shows an error (an ApiError or any Error) until dismissed, or an info
// message for a few seconds.
export function notify(what, kind = 'error') {
  const box = document.getElementById('notice');
  clearTimeout(noticeTimer);
  const text = what instanceof Error ? what.message : String(what);
  mount(box,
    h('span', { class: 'notice-text' }, text),
    h('button', { type: 'button', class: 'link', 'aria-label': 'Dismiss', onclick: () => { box.hidden = true; } }, '×'));
  box.className = `notice ${kind}`;
  box.hidden = false;
  if (kind !== 'error') noticeTimer = setTimeout(() => { box.hidden = true; }, 5000);
}

export function clearNotice() {
  document.getElementById('notice').hidden = true;
}

// ---------------------------------------------------------------- dialogs

// Opens the page's single <dialog> with a form. `fields` are nodes placed in
// the form; `submit(form)` runs on confirm and may return a promise: while it
// runs the buttons are disabled, an error it throws is shown in the dialog,
// and a truthy result (or undefined) closes it. Resolves with the result, or
// null when cancelled.
export function dialog({ title, intro, fields = [], confirm = 'OK', danger = false, submit = () => true, cancel = 'Cancel' }) {
  const dlg = document.getElementById('dialog');
  const error = h('p', { class: 'dialog-error', role: 'alert', hidden: true });
  const ok = h('button', { type: 'submit', id: 'dialog-confirm', class: danger ? 'danger' : 'primary' }, confirm);
  const no = h('button', { type: 'button', id: 'dialog-cancel' }, cancel);
  const form = h('form', { class: 'dialog-form' },
    h('h2', {}, title),
    intro ? h('p', { class: 'intro' }, intro) : null,
    fields,
    error,
    h('div', { class: 'dialog-actions' }, cancel ? no : null, ok));
  mount(dlg, form);
  return new Promise((resolve) => {
    let result = null;
    no.addEventListener('click', () => dlg.close());
    dlg.addEventListener('close', () => resolve(result), { once: true });
    form.addEventListener('submit', async (ev) => {
      ev.preventDefault();
      error.hidden = true;
      ok.disabled = no.disabled = true;
      try {
        const r = await submit(form);
        if (r !== false) {
          result = r === undefined ? true : r;
          dlg.close();
        }
      } catch (e) {
        mount(error, e.message);
        error.hidden = false;
      } finally {
        ok.disabled = no.disabled = false;
      }
    });
    dlg.showModal();
    const first = form.querySelector('input:not([type=hidden]):not([readonly]), textarea, select');
    (first || ok).focus();
  });
}

// Replaces the open dialog's content with a secret that is shown only once.
export function showSecret({ title, secret, note }) {
  const dlg = document.getElementById('dialog');
  const status = h('span', { class: 'copy-status', role: 'status' });
  const copy = async () => {
    try {
      await navigator.clipboard.writeText(secret);
      mount(status, 'Copied.');
    } catch {
      window.getSelection().selectAllChildren(code);
      mount(status, 'Copy failed: the text is selected, press Ctrl+C.');
    }
  };
  const code = h('code', { id: 'secret', class: 'secret' }, secret);
  const done = h('button', { type: 'button', id: 'secret-done', class: 'primary', onclick: () => dlg.close() }, 'I have stored it');
  mount(dlg, h('div', { class: 'dialog-form' },
    h('h2', {}, title),
    note ? h('p', {}, note) : null,
    h('p', { class: 'warning' }, 'Copy this secret now. It will not be shown again: keygate keeps only its hash.'),
    code,
    h('div', { class: 'dialog-actions' },
      status,
      h('button', { type: 'button', id: 'copy-secret', onclick: copy }, 'Copy'),
      done)));
  if (!dlg.open) dlg.showModal();
  done.focus();
  return new Promise((resolve) => dlg.addEventListener('close', resolve, { once: true }));
}

// A labelled form control. `control` is an input, select or textarea.
export function field(label, control, hint) {
  return h('label', { class: 'field' },
    h('span', { class: 'label' }, label),
    control,
    hint ? h('span', { class: 'hint' }, hint) : null);
}

// A <select> from [value, label] pairs.
export function select(attrs, options) {
  return h('select', attrs, options.map(([v, label]) => h('option', { value: v }, label)));
}
