// The keys page: search and filters (sent to GET /v1/keys), cursor paging,
// sorting of the shown page, bulk actions, and the create dialog.

import { api, session, withQuery } from './api.js';
import { ago, dialog, field, h, mount, notify, scopeChips, select, showSecret, statusBadge, time, words } from './dom.js';

// Kept while the console is open, so coming back from a key keeps the view.
const view = {
  filters: { q: '', status: '', owner: '', scope: '', expiring_within: '' },
  limit: 50,
  cursors: [null], // cursor of each page seen so far; the last is the current one
  sort: { column: null, dir: 1 },
  selected: new Set(),
};

const COLUMNS = [
  ['name', 'Name', (k) => k.name.toLowerCase()],
  ['hint', 'Hint', (k) => k.hint],
  ['owner', 'Owner', (k) => k.owner.toLowerCase()],
  ['scopes', 'Scopes', (k) => k.scopes.join(' ')],
  ['access', 'Access', (k) => k.access],
  ['status', 'Status', (k) => k.status],
  ['created_at', 'Created', (k) => k.created_at],
  ['expires_at', 'Expires', (k) => k.expires_at],
  ['last_used_at', 'Last used', (k) => k.last_used_at],
];

export async function showKeys(main) {
  const table = h('div', { class: 'table-wrap' });
  const pager = h('div', { class: 'pager' });
  const bulkBar = h('div', { class: 'bulk', id: 'bulk-bar' });
  const reload = () => load(table, pager, bulkBar);
  mount(main,
    h('div', { class: 'page-head' },
      h('h1', {}, 'API keys'),
      session.canWrite() ? h('button', { type: 'button', id: 'new-key', class: 'primary', onclick: () => createKey(reload) }, 'New key') : null),
    filterForm(() => { view.cursors = [null]; reload(); }),
    session.canWrite() ? bulkBar : null,
    table,
    pager);
  await reload();
}

function filterForm(apply) {
  const f = view.filters;
  let timer = 0;
  const onInput = () => { clearTimeout(timer); timer = setTimeout(() => form.requestSubmit(), 350); };
  const form = h('form', { class: 'filters', role: 'search', id: 'filters' },
    field('Search', h('input', { type: 'search', name: 'q', id: 'search', value: f.q, placeholder: 'Name, id or owner', oninput: onInput })),
    field('Status', select({ name: 'status', value: f.status },
      [['', 'Any'], ['active', 'Active'], ['suspended', 'Suspended'], ['expired', 'Expired'], ['revoked', 'Revoked']])),
    session.role === 'developer' ? null : field('Owner', h('input', { name: 'owner', value: f.owner, oninput: onInput })),
    field('Scope', h('input', { name: 'scope', value: f.scope, oninput: onInput })),
    field('Expiring within', select({ name: 'expiring_within', value: f.expiring_within },
      [['', 'Any time'], ['1d', '1 day'], ['7d', '7 days'], ['30d', '30 days'], ['90d', '90 days']])),
    h('div', { class: 'filter-actions' },
      h('button', { type: 'submit' }, 'Apply'),
      h('button', { type: 'button', class: 'link', onclick: () => { form.reset(); for (const k in f) f[k] = ''; apply(); } }, 'Clear')));
  form.addEventListener('change', (ev) => { if (ev.target.tagName === 'SELECT') form.requestSubmit(); });
  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    clearTimeout(timer);
    const data = new FormData(form);
    for (const k in f) f[k] = (data.get(k) || '').trim();
    apply();
  });
  return form;
}

async function load(table, pager, bulkBar) {
  const cursor = view.cursors[view.cursors.length - 1];
  let page;
  try {
    page = await api('GET', withQuery('/v1/keys', { ...view.filters, limit: view.limit, cursor }));
  } catch (e) {
    notify(e);
    mount(table, h('p', { class: 'empty' }, 'The keys could not be loaded.'));
    return;
  }
  const reload = () => load(table, pager, bulkBar);
  const shown = new Set(page.items.map((k) => k.id));
  for (const id of view.selected) if (!shown.has(id)) view.selected.delete(id);
  renderTable(table, page.items, () => renderBulk(bulkBar, reload));
  renderBulk(bulkBar, reload);
  renderPager(pager, page.next_cursor, reload);
}

function sorted(items) {
  const { column, dir } = view.sort;
  const col = COLUMNS.find(([name]) => name === column);
  if (!col) return items;
  const key = col[2];
  // Empty values (never expires, never used) go last either way.
  return [...items].sort((a, b) => {
    const x = key(a), y = key(b);
    if (x == null || y == null) return x == null ? (y == null ? 0 : 1) : -1;
    return x < y ? -dir : x > y ? dir : 0;
  });
}

function renderTable(wrap, items, selectionChanged) {
  if (!items.length) {
    mount(wrap, h('p', { class: 'empty' }, 'No keys match.'));
    return;
  }
  const write = session.canWrite();
  const rows = sorted(items);
  const boxes = [];
  const all = h('input', { type: 'checkbox', id: 'select-all', 'aria-label': 'Select all keys on this page' });
  const sync = () => {
    all.checked = boxes.length > 0 && boxes.every((b) => b.checked);
    selectionChanged();
  };
  all.addEventListener('change', () => {
    for (const b of boxes) {
      b.checked = all.checked;
      if (all.checked) view.selected.add(b.dataset.id); else view.selected.delete(b.dataset.id);
    }
    sync();
  });
  const head = h('tr', {},
    write ? h('th', { class: 'check' }, all) : null,
    COLUMNS.map(([name, label]) => {
      const active = view.sort.column === name;
      const sortState = active ? (view.sort.dir > 0 ? 'ascending' : 'descending') : 'none';
      return h('th', { 'aria-sort': sortState },
        h('button', {
          type: 'button', class: 'sort', 'data-sort': name,
          title: 'Sort the keys on this page',
          onclick: () => {
            view.sort = { column: name, dir: active ? -view.sort.dir : 1 };
            renderTable(wrap, items, selectionChanged);
          },
        }, label, h('span', { class: 'arrow', 'aria-hidden': 'true' }, active ? (view.sort.dir > 0 ? '▲' : '▼') : '')));
    }));
  const body = rows.map((k) => {
    const box = h('input', {
      type: 'checkbox', class: 'select', 'data-id': k.id, checked: view.selected.has(k.id),
      'aria-label': `Select ${k.name}`,
      onchange: (ev) => {
        if (ev.target.checked) view.selected.add(k.id); else view.selected.delete(k.id);
        sync();
      },
    });
    boxes.push(box);
    return h('tr', { 'data-id': k.id },
      write ? h('td', { class: 'check' }, box) : null,
      h('td', { class: 'name' }, h('a', { href: `#/keys/${encodeURIComponent(k.id)}`, title: k.id }, k.name)),
      h('td', {}, h('code', {}, k.hint)),
      h('td', { class: 'owner' }, k.owner),
      h('td', {}, scopeChips(k.scopes)),
      h('td', {}, k.access === 'read_only' ? 'read only' : 'full'),
      h('td', {}, statusBadge(k.status)),
      h('td', {}, time(k.created_at)),
      h('td', {}, time(k.expires_at, { empty: 'never' })),
      h('td', {}, ago(k.last_used_at)));
  });
  mount(wrap, h('table', { id: 'keys-table' }, h('thead', {}, head), h('tbody', {}, body)));
  all.checked = boxes.length > 0 && boxes.every((b) => b.checked);
}

function renderPager(pager, next, reload) {
  const n = view.cursors.length;
  mount(pager,
    h('button', { type: 'button', id: 'prev-page', disabled: n === 1, onclick: () => { view.cursors.pop(); reload(); } }, '‹ Previous'),
    h('span', { class: 'muted' }, `Page ${n}`),
    h('button', { type: 'button', id: 'next-page', disabled: !next, onclick: () => { view.cursors.push(next); reload(); } }, 'Next ›'),
    h('label', { class: 'per-page' }, 'Per page ',
      select({ value: String(view.limit), onchange: (ev) => { view.limit = Number(ev.target.value); view.cursors = [null]; reload(); } },
        [['25', '25'], ['50', '50'], ['100', '100'], ['250', '250']])));
}

// ---------------------------------------------------------------- bulk actions

function renderBulk(bar, reload) {
  const ids = [...view.selected];
  const none = ids.length === 0;
  const act = (action, label) => h('button', {
    type: 'button', id: `bulk-${action}`, disabled: none,
    class: action === 'revoke' || action === 'delete' ? 'danger' : null,
    onclick: () => bulk(action, ids, reload),
  }, label);
  mount(bar,
    h('span', { class: 'muted', id: 'selected-count' }, none ? 'Select keys for bulk actions' : `${ids.length} selected`),
    act('suspend', 'Suspend'),
    act('reinstate', 'Reinstate'),
    act('revoke', 'Revoke…'),
    act('delete', 'Delete…'),
    h('button', { type: 'button', id: 'delete-revoked', class: 'link danger', onclick: () => deleteRevoked(reload) }, 'Delete all revoked…'));
}

async function bulk(action, ids, reload) {
  const body = { action, ids };
  if (action === 'revoke' || action === 'delete') {
    const reason = h('textarea', { name: 'reason', rows: 2, maxlength: 1000 });
    const ok = await dialog({
      title: action === 'revoke' ? `Revoke ${ids.length} keys?` : `Delete ${ids.length} keys?`,
      intro: action === 'revoke'
        ? 'Revocation is permanent: their secrets stop working on every instance.'
        : 'Deleted keys are gone for good; their secrets become unknown.',
      fields: action === 'revoke' ? [field('Reason (optional, recorded in the audit log)', reason)] : [],
      confirm: action === 'revoke' ? 'Revoke' : 'Delete',
      danger: true,
    });
    if (!ok) return;
    if (action === 'revoke' && reason.value.trim()) body.reason = reason.value.trim();
  }
  await runBulk(body, reload);
}

async function deleteRevoked(reload) {
  const ok = await dialog({
    title: 'Delete all revoked keys?',
    intro: session.isAdmin()
      ? 'Every revoked key is deleted, with a key.deleted event each.'
      : 'Every revoked key you own is deleted, with a key.deleted event each.',
    confirm: 'Delete revoked keys',
    danger: true,
  });
  if (ok) await runBulk({ action: 'delete', filter: { status: 'revoked' } }, reload);
}

async function runBulk(body, reload) {
  try {
    const { results } = await api('POST', '/v1/keys/bulk', body);
    const failed = results.filter((r) => !r.ok);
    const done = results.length - failed.length;
    const verb = { revoke: 'revoked', suspend: 'suspended', reinstate: 'reinstated', delete: 'deleted' }[body.action];
    if (failed.length) {
      const why = failed.slice(0, 5).map((r) => `${r.id}: ${r.error}`).join(', ');
      notify(`${done} ${verb}, ${failed.length} failed (${why}${failed.length > 5 ? ', …' : ''}).`);
    } else {
      notify(`${done} ${done === 1 ? 'key' : 'keys'} ${verb}.`, 'info');
    }
    view.selected.clear();
  } catch (e) {
    notify(e);
  }
  await reload();
}

// ---------------------------------------------------------------- create

async function policy() {
  try {
    return (await api('GET', '/v1/settings')).key_policy;
  } catch {
    return null;
  }
}

async function createKey(reload) {
  const p = await policy();
  const max = p && p.max_ttl ? `at most ${p.max_ttl}` : 'no maximum';
  const expiryHint = p ? `Default ${p.default_ttl}; ${max}. A duration such as 90d, or a date.` : 'A duration such as 90d, or a date.';
  const fields = [
    field('Name', h('input', { name: 'name', required: true, maxlength: 200, autocomplete: 'off' })),
    field('Description', h('textarea', { name: 'description', rows: 2, maxlength: 2000 })),
    session.isAdmin() ? field('Owner', h('input', { name: 'owner', maxlength: 200, autocomplete: 'off' }), 'Empty: yourself.') : null,
    field('Scopes', h('input', { name: 'scopes', autocomplete: 'off', placeholder: 'orders:read billing' }), 'Separated by spaces or commas.'),
    field('Access', select({ name: 'access', value: 'read_only' }, [['read_only', 'Read only (GET, HEAD, OPTIONS)'], ['full', 'Full']])),
    field('Expires in', h('input', { name: 'expires_in', autocomplete: 'off', placeholder: p ? p.default_ttl : '365d' }), expiryHint),
    field('…or expires on', h('input', { name: 'expires_on', type: 'date' })),
    rateFields(null),
    field('Metadata (JSON object)', h('textarea', { name: 'metadata', rows: 3, placeholder: '{"team": "payments"}' })),
  ];
  const created = await dialog({
    title: 'New API key',
    fields,
    confirm: 'Create key',
    submit: (form) => api('POST', '/v1/keys', createBody(new FormData(form))),
  });
  if (!created) return;
  await reload();
  await showSecret({ title: `Key “${created.key.name}” created`, secret: created.secret });
}

function createBody(data) {
  const text = (name) => (data.get(name) || '').trim();
  const body = { name: text('name'), access: data.get('access'), scopes: words(text('scopes')) };
  if (text('description')) body.description = text('description');
  if (text('owner')) body.owner = text('owner');
  if (text('expires_in') && text('expires_on')) throw new Error('Give an expiry duration or a date, not both.');
  if (text('expires_in')) body.expires_in = text('expires_in');
  if (text('expires_on')) body.expires_at = new Date(`${text('expires_on')}T23:59:59`).toISOString();
  const rl = rateBody(data);
  if (rl) body.rate_limit = rl;
  const md = metadataBody(data);
  if (md) body.metadata = md;
  return body;
}

// The per-second and burst inputs of a key's own rate limit.
export function rateFields(rl) {
  return h('fieldset', { class: 'pair' },
    h('legend', {}, 'Rate limit (empty: the gateway default)'),
    field('Per second', h('input', { name: 'per_second', type: 'number', min: 1, step: 1, value: rl ? rl.per_second : '' })),
    field('Burst', h('input', { name: 'burst', type: 'number', min: 1, step: 1, value: rl ? rl.burst : '' })));
}

// `{per_second, burst}`, or null when both are empty.
export function rateBody(data) {
  const ps = (data.get('per_second') || '').trim();
  const burst = (data.get('burst') || '').trim();
  if (!ps && !burst) return null;
  if (!ps || !burst) throw new Error('Give both the rate per second and the burst, or neither.');
  return { per_second: Number(ps), burst: Number(burst) };
}

// The metadata textarea as an object, or null when empty.
export function metadataBody(data) {
  const text = (data.get('metadata') || '').trim();
  if (!text) return null;
  let md;
  try {
    md = JSON.parse(text);
  } catch (e) {
    throw new Error(`Metadata is not valid JSON: ${e.message}`);
  }
  if (!md || typeof md !== 'object' || Array.isArray(md)) throw new Error('Metadata must be a JSON object, such as {"team": "payments"}.');
  return md;
}
