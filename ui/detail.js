// One key: every field, the lifecycle actions its status allows, an hourly
// usage chart of the last 7 days, and the key's audit events.

import { api, session, withQuery } from './api.js';
import { ago, dialog, field, h, mount, notify, rateLimit, s, scopeChips, select, showSecret, statusBadge, time, words } from './dom.js';
import { metadataBody, rateBody, rateFields } from './keys.js';
import { eventTable } from './pages.js';

const HOURS = 7 * 24;

export async function showKey(main, id) {
  const path = `/v1/keys/${encodeURIComponent(id)}`;
  let key;
  try {
    key = await api('GET', path);
  } catch (e) {
    mount(main, backLink(), h('p', { class: 'empty' }, e.message));
    return;
  }
  const refresh = () => showKey(main, id);
  const usage = h('section', { class: 'card', id: 'usage' }, h('h2', {}, 'Usage, last 7 days'), h('p', { class: 'muted' }, 'Loading…'));
  const events = h('section', { class: 'card', id: 'key-events' }, h('h2', {}, 'Events'));
  mount(main,
    backLink(),
    h('div', { class: 'page-head' },
      h('h1', { id: 'key-name', class: 'wrap' }, key.name),
      statusBadge(key.status, { id: 'key-status' })),
    session.canWrite() ? actions(key, path, refresh, main) : null,
    h('section', { class: 'card' }, h('h2', {}, 'Details'), details(key)),
    usage,
    events);
  loadUsage(usage, path);
  loadEvents(events, id);
}

function backLink() {
  return h('p', { class: 'back' }, h('a', { href: '#/keys' }, '‹ All keys'));
}

function details(k) {
  const row = (label, ...value) => [h('dt', {}, label), h('dd', {}, ...value)];
  const by = (at, who) => (at ? [time(at, { withTime: true }), who ? ` by ${who}` : ''] : [h('span', { class: 'muted' }, '—')]);
  return h('dl', { class: 'fields' },
    row('Id', h('code', {}, k.id)),
    row('Description', k.description || h('span', { class: 'muted' }, '—')),
    row('Owner', k.owner),
    row('Hint', h('code', {}, k.hint)),
    row('Scopes', scopeChips(k.scopes)),
    row('Access', k.access === 'read_only' ? 'read only (GET, HEAD, OPTIONS)' : 'full'),
    row('Rate limit', rateLimit(k.rate_limit)),
    row('Created', ...by(k.created_at, k.created_by)),
    row('Updated', time(k.updated_at, { withTime: true })),
    row('Expires', time(k.expires_at, { withTime: true, empty: 'never' })),
    row('Last used', ago(k.last_used_at)),
    k.suspended_at ? row('Suspended', ...by(k.suspended_at, k.suspended_by)) : null,
    k.revoked_at ? row('Revoked', ...by(k.revoked_at, k.revoked_by)) : null,
    k.revoked_at ? row('Reason', k.revocation_reason || h('span', { class: 'muted' }, 'none given')) : null,
    row('Metadata', Object.keys(k.metadata).length
      ? h('pre', { class: 'json' }, JSON.stringify(k.metadata, null, 2))
      : h('span', { class: 'muted' }, 'none')));
}

// ---------------------------------------------------------------- actions

function actions(key, path, refresh, main) {
  const revoked = key.status === 'revoked';
  const button = (id, label, onclick, cls) => h('button', { type: 'button', id: `action-${id}`, class: cls, onclick }, label);
  // Runs one call; on success reloads the key and says `done`.
  const run = async (call, done) => {
    try {
      await call();
      notify(done, 'info');
    } catch (e) {
      notify(e);
    }
    await refresh();
  };
  return h('div', { class: 'actions' },
    revoked ? null : button('edit', 'Edit', () => edit(key, path, refresh)),
    revoked ? null : button('rotate', 'Rotate…', () => rotate(key, path, refresh)),
    key.status === 'suspended'
      ? button('reinstate', 'Reinstate', () => run(() => api('POST', `${path}/reinstate`), 'Key reinstated.'))
      : revoked ? null : button('suspend', 'Suspend', () => run(() => api('POST', `${path}/suspend`), 'Key suspended: its secret is refused until reinstated.')),
    revoked ? null : button('revoke', 'Revoke…', () => revoke(key, path, refresh), 'danger'),
    button('delete', 'Delete…', () => remove(key, path, main), 'danger'));
}

async function edit(key, path, refresh) {
  const saved = await dialog({
    title: 'Edit key',
    intro: 'Access and expiry are fixed at creation; changing them means a new key.',
    fields: [
      field('Name', h('input', { name: 'name', required: true, maxlength: 200, value: key.name })),
      field('Description', h('textarea', { name: 'description', rows: 2, maxlength: 2000 }, key.description)),
      field('Scopes', h('input', { name: 'scopes', value: key.scopes.join(' ') }), 'Separated by spaces or commas.'),
      rateFields(key.rate_limit),
      field('Metadata (JSON object)', h('textarea', { name: 'metadata', rows: 4 },
        Object.keys(key.metadata).length ? JSON.stringify(key.metadata, null, 2) : '')),
    ],
    confirm: 'Save',
    submit: (form) => {
      const data = new FormData(form);
      return api('PATCH', path, {
        name: data.get('name').trim(),
        description: data.get('description'),
        scopes: words(data.get('scopes')),
        rate_limit: rateBody(data),
        metadata: metadataBody(data) || {},
      });
    },
  });
  if (saved) {
    notify('Key saved.', 'info');
    await refresh();
  }
}

async function revoke(key, path, refresh) {
  const done = await dialog({
    title: `Revoke “${key.name}”?`,
    intro: 'Revocation is permanent: the secret stops working on every instance and the key can never be reinstated.',
    fields: [field('Reason (optional, recorded in the audit log)', h('textarea', { name: 'reason', id: 'revoke-reason', rows: 2, maxlength: 1000 }))],
    confirm: 'Revoke key',
    danger: true,
    submit: (form) => {
      const reason = new FormData(form).get('reason').trim();
      return api('POST', `${path}/revoke`, reason ? { reason } : {});
    },
  });
  if (done) {
    notify('Key revoked.', 'info');
    await refresh();
  }
}

async function rotate(key, path, refresh) {
  const grace = select({ name: 'grace', id: 'rotate-grace', value: '0s' },
    [['0s', 'None: the old secret stops now'], ['1h', '1 hour'], ['24h', '24 hours'], ['7d', '7 days'], ['30d', '30 days']]);
  const rotated = await dialog({
    title: `Rotate “${key.name}”?`,
    intro: 'A new secret replaces the current one. During the grace period both work; then the old one is refused as rotated.',
    fields: [field('Grace period', grace)],
    confirm: 'Rotate',
    submit: (form) => api('POST', `${path}/rotate`, { grace: new FormData(form).get('grace') }),
  });
  if (!rotated) return;
  await refresh();
  await showSecret({ title: 'New secret', secret: rotated.secret, note: `Key “${rotated.key.name}” has a new secret.` });
}

async function remove(key, path, main) {
  const done = await dialog({
    title: `Delete “${key.name}”?`,
    intro: 'The key is removed for good; its secret becomes unknown. Its audit events stay.',
    confirm: 'Delete key',
    danger: true,
    submit: () => api('DELETE', path),
  });
  if (done) {
    notify('Key deleted.', 'info');
    mount(main);
    location.hash = '#/keys';
  }
}

// ---------------------------------------------------------------- usage chart

async function loadUsage(section, path) {
  let usage;
  try {
    usage = await api('GET', `${path}/usage`);
  } catch (e) {
    mount(section, h('h2', {}, 'Usage, last 7 days'), h('p', { class: 'empty' }, e.message));
    return;
  }
  mount(section, h('h2', {}, 'Usage, last 7 days'), chart(usage.hourly));
}

// Stacked hourly bars (allowed, denied, rate limited) for the last 168 hours,
// ending with the current hour.
function chart(hourly) {
  const byHour = new Map(hourly.map((u) => [new Date(u.hour).getTime(), u]));
  const last = Math.floor(Date.now() / 3600e3) * 3600e3;
  const slots = Array.from({ length: HOURS }, (_, i) => {
    const at = last - (HOURS - 1 - i) * 3600e3;
    const u = byHour.get(at) || { allowed: 0, denied: 0, rate_limited: 0 };
    return { at, ...u };
  });
  const totals = { allowed: 0, denied: 0, rate_limited: 0 };
  for (const u of hourly) for (const k in totals) totals[k] += u[k] || 0;
  const peak = Math.max(1, ...slots.map((u) => u.allowed + u.denied + u.rate_limited));
  const W = HOURS * 4, H = 100;
  const bars = [];
  slots.forEach((u, i) => {
    let y = H;
    for (const k of ['allowed', 'denied', 'rate_limited']) {
      if (!u[k]) continue;
      const height = (u[k] / peak) * H;
      y -= height;
      bars.push(s('rect', { x: i * 4 + 0.5, y, width: 3, height, class: `bar-${k}` },
        s('title', {}, `${new Date(u.at).toLocaleString()}: ${u[k]} ${k.replace('_', ' ')}`)));
    }
  });
  const days = [];
  for (let i = 0; i < 7; i++) {
    const d = new Date(last - (6 - i) * 86400e3);
    days.push(h('span', {}, d.toLocaleDateString(undefined, { weekday: 'short', day: 'numeric' })));
  }
  const legend = (k, label) => h('span', { class: 'legend-item' }, h('span', { class: `swatch bar-${k}` }), `${label}: ${totals[k]}`);
  return h('div', { class: 'chart' },
    h('div', { class: 'legend' }, legend('allowed', 'Allowed'), legend('denied', 'Denied'), legend('rate_limited', 'Rate limited'),
      h('span', { class: 'muted' }, `Peak ${hourly.length ? peak : 0} per hour`)),
    s('svg', { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: 'none', role: 'img', 'aria-label': 'Requests per hour' },
      s('line', { x1: 0, y1: H - 0.5, x2: W, y2: H - 0.5, class: 'axis' }),
      bars),
    h('div', { class: 'days' }, days),
    hourly.length ? null : h('p', { class: 'muted' }, 'No traffic in the last 7 days.'));
}

// ---------------------------------------------------------------- events

async function loadEvents(section, id) {
  const list = h('div');
  const more = h('div', { class: 'pager' });
  mount(section, h('h2', {}, 'Events'), list, more);
  const items = [];
  const page = async (cursor) => {
    try {
      const p = await api('GET', withQuery('/v1/events', { key_id: id, limit: 50, cursor }));
      items.push(...p.items);
      mount(list, eventTable(items, { showKey: false }));
      mount(more, p.next_cursor ? h('button', { type: 'button', onclick: () => page(p.next_cursor) }, 'Load more') : null);
    } catch (e) {
      mount(list, h('p', { class: 'empty' }, e.message));
    }
  };
  await page(null);
}
