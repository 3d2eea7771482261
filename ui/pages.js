// The events page (the audit log, oldest first within the chosen period) and
// the settings page (the API-keys kill switch and the key policy).

import { api, session, withQuery } from './api.js';
import { dialog, field, h, mount, notify, select, time } from './dom.js';

const TYPES = ['key.created', 'key.updated', 'key.revoked', 'key.suspended', 'key.reinstated', 'key.rotated',
  'key.deleted', 'key.expiring', 'key.expired', 'key.purged', 'settings.updated'];

const SINCE = [['1d', 'Last 24 hours'], ['7d', 'Last 7 days'], ['30d', 'Last 30 days'], ['', 'All time']];
const DAYS = { '1d': 1, '7d': 7, '30d': 30 };

const filters = { type: '', key_id: '', since: '7d' };

// A table of events; `showKey` adds a column linking to each event's key.
export function eventTable(items, { showKey = true } = {}) {
  if (!items.length) return h('p', { class: 'empty' }, 'No events.');
  const details = (d) => {
    const text = d && Object.keys(d).length ? JSON.stringify(d) : '';
    return text ? h('code', { class: 'details' }, text) : h('span', { class: 'muted' }, '—');
  };
  return h('div', { class: 'table-wrap' }, h('table', { class: 'events' },
    h('thead', {}, h('tr', {},
      h('th', {}, 'Time'), h('th', {}, 'Type'), showKey ? h('th', {}, 'Key') : null, h('th', {}, 'Actor'), h('th', {}, 'Details'))),
    h('tbody', {}, items.map((ev) => h('tr', { 'data-type': ev.type },
      h('td', {}, time(ev.at, { withTime: true })),
      h('td', {}, h('span', { class: `event-type ${ev.type.replace('.', '-')}` }, ev.type)),
      showKey ? h('td', {}, ev.key_id ? h('a', { href: `#/keys/${encodeURIComponent(ev.key_id)}` }, h('code', {}, ev.key_id)) : h('span', { class: 'muted' }, '—')) : null,
      h('td', {}, ev.actor),
      h('td', { class: 'wrap' }, details(ev.details)))))));
}

export async function showEvents(main) {
  const list = h('div');
  const more = h('div', { class: 'pager' });
  const form = h('form', { class: 'filters', role: 'search' },
    field('Type', select({ name: 'type', value: filters.type }, [['', 'Any'], ...TYPES.map((t) => [t, t])])),
    field('Key id', h('input', { name: 'key_id', value: filters.key_id, placeholder: 'key_…', autocomplete: 'off' })),
    field('Period', select({ name: 'since', value: filters.since }, SINCE)),
    h('div', { class: 'filter-actions' }, h('button', { type: 'submit' }, 'Apply')));
  const load = async () => {
    const days = DAYS[filters.since];
    const after = days ? new Date(Date.now() - days * 86400e3).toISOString() : '';
    const items = [];
    const page = async (cursor) => {
      try {
        const p = await api('GET', withQuery('/v1/events', { type: filters.type, key_id: filters.key_id, after, cursor, limit: 100 }));
        items.push(...p.items);
        mount(list, eventTable(items));
        mount(more, p.next_cursor ? h('button', { type: 'button', id: 'more-events', onclick: () => page(p.next_cursor) }, 'Load more') : null);
      } catch (e) {
        notify(e);
        mount(list, h('p', { class: 'empty' }, 'The events could not be loaded.'));
        mount(more);
      }
    };
    await page(null);
  };
  form.addEventListener('change', (ev) => { if (ev.target.tagName === 'SELECT') form.requestSubmit(); });
  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const data = new FormData(form);
    for (const k in filters) filters[k] = (data.get(k) || '').trim();
    load();
  });
  mount(main,
    h('div', { class: 'page-head' }, h('h1', {}, 'Events')),
    h('p', { class: 'muted' }, session.role === 'developer'
      ? 'The audit log of your keys, oldest first.'
      : 'The audit log, oldest first.'),
    form, list, more);
  await load();
}

export async function showSettings(main) {
  let settings;
  try {
    settings = await api('GET', '/v1/settings');
  } catch (e) {
    mount(main, h('h1', {}, 'Settings'), h('p', { class: 'empty' }, e.message));
    return;
  }
  const on = settings.api_keys_enabled;
  const flip = async () => {
    const changed = await dialog({
      title: on ? 'Turn API keys off?' : 'Turn API keys back on?',
      intro: on
        ? 'Every key-protected route will answer 403 api_keys_disabled, on every instance, until keys are turned back on. Routes with auth: none keep working.'
        : 'Valid keys will be accepted again on every instance.',
      confirm: on ? 'Turn keys off' : 'Turn keys on',
      danger: on,
      submit: () => api('PATCH', '/v1/settings', { api_keys_enabled: !on }),
    });
    if (changed) {
      notify(on ? 'API keys are off.' : 'API keys are on.', 'info');
      await showSettings(main);
    }
  };
  const p = settings.key_policy;
  const row = (label, value) => [h('dt', {}, label), h('dd', {}, value)];
  mount(main,
    h('div', { class: 'page-head' }, h('h1', {}, 'Settings')),
    h('section', { class: 'card', id: 'kill-switch-card' },
      h('h2', {}, 'API keys'),
      h('p', {},
        h('span', { id: 'api-keys-state', class: `badge ${on ? 'status-active' : 'status-revoked'}` }, on ? 'on' : 'off'),
        ' ',
        on ? 'Keys are accepted on key-protected routes.' : 'Every key-protected route answers 403 api_keys_disabled.'),
      session.isAdmin()
        ? h('button', { type: 'button', id: 'kill-switch', class: on ? 'danger' : 'primary', onclick: flip }, on ? 'Turn API keys off…' : 'Turn API keys on…')
        : h('p', { class: 'muted' }, 'Only the admin role can change this.')),
    h('section', { class: 'card' },
      h('h2', {}, 'Key policy'),
      h('p', { class: 'muted' }, 'From the config file (keys:); applies to keys created from now on.'),
      h('dl', { class: 'fields' },
        row('Prefix', h('code', {}, p.prefix)),
        row('Default lifetime', p.default_ttl),
        row('Longest lifetime', p.max_ttl || 'no maximum'),
        row('Keys per owner', String(p.max_per_owner)),
        row('Expiry notice', p.expiry_notice),
        row('Purge expired after', p.purge_expired_after))));
}
