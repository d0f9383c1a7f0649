// IST Mesh web console: plain JavaScript, no build step, no third-party
// request. Data comes from the keyserver's admin API through /ui/api/...
// (the session's token stays on the server); live changes from
// /ui/events (Server-Sent Events fed by the pushes members get).
//
// Every piece of data reaches the page as a text node or an attribute
// value (never as HTML), and control, bidi and invisible characters are
// shown as \u{...} escapes (visible()).
'use strict';

const S = {
  csrf: null, canAct: false, role: null,
  events: null, eventsNet: null,
  refresh: null, pending: null, route: null, poll: null,
};

// Control, bidi and invisible characters (the keyserver's own list of
// unsafe characters, plus C0/C1 controls).
const INVISIBLE = /[\u0000-\u001f\u007f-\u009f\u00ad\u034f\u061c\u0600-\u0605\u06dd\u070f\u08e2\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u2028-\u202e\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufffb\u{110bd}\u{110cd}\u{1bca0}-\u{1bca3}\u{1d173}-\u{1d17a}\u{e0000}-\u{e0fff}]/gu;

/** Text with every invisible character written as a \u{...} escape. */
function visible(s) {
  return String(s ?? '').replace(INVISIBLE, (c) => '\\u{' + c.codePointAt(0).toString(16) + '}');
}

/** An element; strings and numbers among `kids` become text nodes. */
function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === false || v == null) continue;
    if (k === 'class') e.className = v;
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? '' : String(v));
  }
  for (const k of kids.flat()) {
    if (k == null || k === false) continue;
    e.append(k instanceof Node ? k : document.createTextNode(visible(k)));
  }
  return e;
}

const enc = encodeURIComponent;
const $ = (id) => document.getElementById(id);
const v1 = (p) => '/ui/api/v1' + p;

/** A call to the console's server; actions carry the CSRF token. */
async function call(method, path, body) {
  const opts = { method, headers: {}, credentials: 'same-origin', cache: 'no-store' };
  if (method !== 'GET') opts.headers['X-CSRF-Token'] = S.csrf || '';
  if (body !== undefined) {
    opts.headers['Content-Type'] = 'application/json';
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(path, opts);
  let data = null;
  try { data = await r.json(); } catch (_) { /* empty body */ }
  if (r.status === 401 && path !== '/ui/session') {
    showSignIn('Your session ended; sign in again.');
  }
  if (!r.ok) {
    const e = new Error((data && data.error) || r.statusText || String(r.status));
    e.status = r.status;
    throw e;
  }
  return data;
}

function say(text, error) {
  const box = el('div', { class: error ? 'error' : '' }, text);
  $('status').append(box);
  setTimeout(() => box.remove(), error ? 8000 : 4000);
}

/** Asks before an action; resolves true on Confirm. */
function confirmAction(text) {
  return new Promise((resolve) => {
    const d = $('dialog');
    $('dialog-text').textContent = visible(text);
    d.hidden = false;
    const done = (ok) => {
      d.hidden = true;
      $('dialog-ok').onclick = null;
      $('dialog-cancel').onclick = null;
      resolve(ok);
    };
    $('dialog-ok').onclick = () => done(true);
    $('dialog-cancel').onclick = () => done(false);
    $('dialog-ok').focus();
  });
}

/** Runs an action after confirmation, then refreshes the view. */
async function act(question, f, doneText) {
  if (!(await confirmAction(question))) return;
  try {
    const r = await f();
    if (doneText) say(doneText);
    schedule(0);
    return r;
  } catch (e) {
    say(e.message, true);
  }
}

function ago(unix) {
  if (!unix) return '';
  const s = Math.max(0, Math.round(Date.now() / 1000 - unix));
  if (s < 60) return s + ' s ago';
  if (s < 3600) return Math.floor(s / 60) + ' min ago';
  if (s < 86400) return Math.floor(s / 3600) + ' h ago';
  return Math.floor(s / 86400) + ' d ago';
}

function when(unix) {
  return unix ? new Date(unix * 1000).toISOString().replace('.000Z', 'Z') : '';
}

function bytes(n) {
  const u = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  n = Number(n) || 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + ' ' + u[i];
}

// ---- sign-in and session ------------------------------------------------

function showSignIn(message) {
  closeEvents();
  S.csrf = null;
  $('signout').hidden = true;
  $('who').textContent = '';
  $('nav').replaceChildren();
  const input = el('input', { id: 'token', type: 'password', autocomplete: 'off', placeholder: 'API token' });
  const form = el('form', { class: 'signin', id: 'signin' },
    el('h1', {}, 'Sign in'),
    el('p', { class: 'muted' }, 'Paste an API token of this keyserver. It stays on the server; the browser gets a session cookie.'),
    message ? el('p', { class: 'state-offline' }, message) : null,
    input,
    el('button', { type: 'submit', class: 'primary', id: 'signin-button' }, 'Sign in'));
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    try {
      const s = await call('POST', '/ui/session', { token: input.value });
      input.value = '';
      signedIn(s);
    } catch (e) {
      say('Sign-in refused: ' + e.message, true);
    }
  });
  $('main').replaceChildren(form);
  rendered('signin', 0);
  input.focus();
}

function signedIn(s) {
  S.csrf = s.csrf;
  S.canAct = !!s.can_act;
  S.role = s.role;
  $('who').textContent = visible('role: ' + s.role);
  $('signout').hidden = false;
  route();
}

async function signOut() {
  try { await call('DELETE', '/ui/session'); } catch (_) { /* gone already */ }
  showSignIn();
}

// ---- routing -------------------------------------------------------------

/** #/networks, #/audit, #/n/<network>/<members|groups|tokens|traffic>. */
function parseHash() {
  const parts = location.hash.replace(/^#\/?/, '').split('/').filter(Boolean).map((p) => {
    try { return decodeURIComponent(p); } catch (_) { return p; }
  });
  if (parts[0] === 'n' && parts[1]) return { view: parts[2] || 'members', net: parts[1] };
  if (parts[0] === 'audit') return { view: 'audit', net: null };
  return { view: 'networks', net: null };
}

const VIEWS = {
  networks: { title: 'Networks', render: networksView },
  members: { title: 'Members', render: membersView },
  groups: { title: 'Service groups', render: groupsView },
  tokens: { title: 'Tokens', render: tokensView },
  traffic: { title: 'Traffic', render: trafficView },
  audit: { title: 'Audit trail', render: auditView },
};

function nav(r) {
  const link = (href, text, current) => el('a', { href, class: current ? 'current' : '' }, text);
  const items = [link('#/networks', 'Networks', r.view === 'networks')];
  if (r.net) {
    for (const v of ['members', 'groups', 'tokens', 'traffic']) {
      items.push(link('#/n/' + enc(r.net) + '/' + v, VIEWS[v].title, r.view === v));
    }
  }
  items.push(link('#/audit', 'Audit trail', r.view === 'audit'));
  $('nav').replaceChildren(...items);
}

async function route() {
  if (!S.csrf) return;
  const r = parseHash();
  S.route = r;
  nav(r);
  if (r.net) await openEvents(r.net); else closeEvents();
  if (S.route !== r) return;
  clearInterval(S.poll);
  // Views without a network's event stream refresh every 5 s.
  if (!r.net) S.poll = setInterval(() => schedule(0), 5000);
  const view = VIEWS[r.view];
  const page = el('section', { id: 'page-' + r.view },
    el('h1', {}, view.title, r.net ? el('span', { class: 'muted' }, ' — ', r.net) : null));
  const live = el('div', { id: 'live' }, el('p', { class: 'muted' }, 'Loading…'));
  $('main').replaceChildren(page);
  S.refresh = view.render(r, page, live);
  page.append(live);
  schedule(0);
}

/** Re-renders the live part of the view after `ms` (coalesced). */
function schedule(ms) {
  if (S.pending) return;
  S.pending = setTimeout(async () => {
    S.pending = null;
    const f = S.refresh;
    if (!f) return;
    try {
      await f();
    } catch (e) {
      if (e.status !== 401) say(e.message, true);
    }
  }, ms);
}

/** Notes a finished render (the browser test reads it). */
function rendered(view, rows, started, fetched) {
  const now = performance.now();
  window.__istRender = {
    view, rows, at: Date.now(), ms: now,
    fetchMs: started != null ? fetched - started : null,
    renderMs: fetched != null ? now - fetched : null,
  };
  document.body.dataset.rendered = view;
}

function replaceLive(...kids) {
  const live = $('live');
  if (live) live.replaceChildren(...kids);
}

// ---- live events -----------------------------------------------------------

/** Subscribes to a network's changes; resolves once the stream is open
 * (its `hello`), so that the first fetch comes after the subscription
 * and misses no change (or after 1 s, or at once when already open). */
function openEvents(net) {
  if (S.events && S.eventsNet === net) return Promise.resolve();
  closeEvents();
  const es = new EventSource('/ui/events?network=' + enc(net));
  const opened = new Promise((resolve) => {
    es.addEventListener('hello', resolve, { once: true });
    es.addEventListener('error', resolve, { once: true });
    setTimeout(resolve, 1000);
  });
  es.addEventListener('change', () => schedule(20));
  es.addEventListener('tick', () => {
    if (S.route && S.route.view === 'members') schedule(0);
  });
  es.addEventListener('error', () => {
    // The browser reconnects by itself (retry: 1 s); a 401 closes it.
    if (es.readyState === EventSource.CLOSED) {
      call('GET', '/ui/session').catch(() => {});
    }
  });
  S.events = es;
  S.eventsNet = net;
  return opened;
}

function closeEvents() {
  if (S.events) S.events.close();
  S.events = null;
  S.eventsNet = null;
}

// ---- views -----------------------------------------------------------------

function networksView() {
  return async () => {
    const nets = await call('GET', v1('/networks'));
    const rows = nets.map((n) => el('tr', { 'data-network': n.id },
      el('td', {}, el('a', { href: '#/n/' + enc(n.id) + '/members' }, n.name)),
      el('td', { class: 'mono' }, n.id),
      el('td', { class: 'mono' }, n.range),
      el('td', {}, n.members),
      el('td', {}, n.generation ?? '')));
    replaceLive(el('table', { id: 'networks' },
      el('thead', {}, el('tr', {}, ['Name', 'Id', 'Range', 'Members', 'Generation'].map((h) => el('th', {}, h)))),
      el('tbody', {}, rows)));
    rendered('networks', rows.length);
  };
}

/** The path and round-trip cells of a member's reported paths (the
 * listing's `path` summary; the same text as `keyserver member list`). */
function pathCells(p) {
  if (!p) return { path: '', rtt: '', title: '' };
  const parts = [];
  if (p.direct) parts.push('direct ' + p.direct);
  if (p.relay) parts.push('relay ' + p.relay);
  if (p.none) parts.push('no path ' + p.none);
  const rtt = p.rtt_micros != null ? (p.rtt_micros / 1000).toFixed(2) + ' ms' : '';
  return {
    path: parts.join(', ') || '-',
    rtt,
    title: 'median round trip to its peers; reported ' + ago(p.reported) + ' (every peer: keyserver member get)',
  };
}

function membersView(r) {
  const net = r.net;
  return async () => {
    const started = performance.now();
    // One call: each member comes with its names and reported paths.
    const members = await call('GET', v1('/networks/' + enc(net) + '/members'));
    const fetched = performance.now();
    members.sort((a, b) => String(a.instance).localeCompare(String(b.instance)));
    const head = ['Instance', 'Service', 'Type', 'State', 'Address', 'Names', 'Runner', 'Last seen', 'Path', 'Round trip'];
    if (S.canAct) head.push('');
    const rows = members.map((m) => {
      const p = pathCells(m.path);
      const own = m.dns_names || [];
      return el('tr', { 'data-key': m.public_key, 'data-instance': m.instance, 'data-state': m.state },
        el('td', { class: 'instance' }, m.instance, el('div', { class: 'mono muted' }, m.public_key)),
        el('td', { class: 'service' }, m.service),
        el('td', {}, m.process_type, ' #', m.index),
        el('td', { class: 'state state-' + m.state }, m.state),
        el('td', { class: 'mono' }, m.ip),
        el('td', { class: 'names mono' }, own.slice(0, 4).map((n) => el('div', {}, n)),
          own.length > 4 ? el('div', { class: 'muted' }, '+', own.length - 4, ' more') : null),
        el('td', { class: 'runner' }, m.runner),
        el('td', { title: when(m.last_seen) }, ago(m.last_seen)),
        el('td', { class: 'path', title: p.title }, p.path),
        el('td', { class: 'rtt' }, p.rtt),
        S.canAct ? el('td', {}, el('button', {
          class: 'danger remove', type: 'button',
          onclick: () => act('Remove member ' + m.instance + ' (' + m.public_key + ')? Its peers drop it within a second and its names stop answering.',
            () => call('DELETE', v1('/networks/' + enc(net) + '/members/' + enc(m.public_key))),
            'Removed ' + visible(m.instance)),
        }, 'Remove')) : null);
    });
    replaceLive(
      el('p', { class: 'muted' }, members.length, ' members; live (updates as members change).'),
      el('table', { id: 'members' },
        el('thead', {}, el('tr', {}, head.map((h) => el('th', {}, h)))),
        el('tbody', {}, rows)));
    rendered('members', rows.length, started, fetched);
  };
}

function groupsView(r, page) {
  const net = r.net;
  if (S.canAct) {
    const f = {
      name: el('input', { name: 'name', required: true, placeholder: 'web' }),
      port: el('input', { name: 'port', type: 'number', min: 1, max: 65535, value: 443 }),
      dest: el('input', { name: 'destination_port', type: 'number', min: 1, max: 65535, value: 8080 }),
      handlers: el('input', { name: 'handlers', placeholder: 'tls,http', value: 'tls,http' }),
      soft: el('input', { name: 'soft_limit', type: 'number', min: 0, placeholder: 'default' }),
      hard: el('input', { name: 'hard_limit', type: 'number', min: 0, placeholder: 'default' }),
    };
    const form = el('form', { class: 'inline', id: 'create-group' },
      el('label', {}, 'Name', f.name), el('label', {}, 'Port', f.port),
      el('label', {}, 'Destination port', f.dest), el('label', {}, 'Handlers', f.handlers),
      el('label', {}, 'Soft limit', f.soft), el('label', {}, 'Hard limit', f.hard),
      el('button', { type: 'submit', class: 'primary' }, 'Create service group'));
    form.addEventListener('submit', (ev) => {
      ev.preventDefault();
      const spec = {
        name: f.name.value,
        ports: [{
          port: Number(f.port.value),
          destination_port: Number(f.dest.value),
          handlers: f.handlers.value.split(',').map((h) => h.trim()).filter(Boolean),
        }],
      };
      if (f.soft.value !== '') spec.soft_limit = Number(f.soft.value);
      if (f.hard.value !== '') spec.hard_limit = Number(f.hard.value);
      act('Create service group ' + spec.name + ' publishing port ' + spec.ports[0].port + '?',
        () => call('POST', v1('/networks/' + enc(net) + '/services'), spec),
        'Created service group ' + visible(spec.name));
    });
    page.append(form);
  }
  return async () => {
    const [groups, graph] = await Promise.all([
      call('GET', v1('/networks/' + enc(net) + '/services')),
      call('GET', v1('/networks/' + enc(net) + '/traffic')).catch(() => null),
    ]);
    // Live flows into each service, from members' traffic reports.
    const active = new Map();
    for (const e of (graph && graph.edges) || []) {
      active.set(e.destination, (active.get(e.destination) || 0) + (e.active || 0));
    }
    const byInstance = new Map();
    for (const s of (graph && graph.services) || []) {
      for (const i of s.instances) byInstance.set(i, s.service);
    }
    const head = ['Name', 'FQDN', 'Ports', 'Limits (soft / hard)', 'Instances', 'Live connections', 'Live flows', 'Owner'];
    if (S.canAct) head.push('');
    const rows = groups.map((g) => {
      const services = new Set(g.instances.map((i) => byInstance.get(i.instance)).filter(Boolean));
      let flows = 0;
      for (const s of services) flows += active.get(s) || 0;
      return el('tr', { 'data-group': g.name },
        el('td', {}, g.name),
        el('td', { class: 'mono' }, g.fqdn,
          (g.names || []).map((n) => el('div', { class: 'muted' }, n))),
        el('td', {}, g.ports.map((p) => el('div', {}, p.port, ' → ', p.destination_port, ' ', p.protocol || '',
          p.handlers && p.handlers.length ? ' [' + p.handlers.join(', ') + ']' : ''))),
        el('td', {}, g.soft_limit, ' / ', g.hard_limit),
        el('td', {}, g.instances.length ? g.instances.map((i) => el('div', {},
          i.instance, ' ', el('span', { class: 'state-' + i.state }, i.state))) : el('span', { class: 'muted' }, 'none')),
        // Connections the gateways hold open for the group (their reports).
        el('td', { class: 'live' },
          el('span', { class: 'live-total' }, g.live_connections || 0),
          g.queued_connections ? ' (' + g.queued_connections + ' queued)' : '',
          (g.gateways || []).map((l) => el('div', { class: 'muted' },
            l.instance, ': ', l.open, l.queued ? ' + ' + l.queued + ' queued' : ''))),
        el('td', {}, flows),
        el('td', {}, g.persistent ? 'persistent' : (g.owner || '')),
        S.canAct ? el('td', {}, el('button', {
          class: 'danger', type: 'button',
          onclick: () => act('Delete service group ' + g.name + '? Gateways stop publishing its ports.',
            () => call('DELETE', v1('/networks/' + enc(net) + '/services/' + enc(g.name))),
            'Deleted ' + visible(g.name)),
        }, 'Delete')) : null);
    });
    replaceLive(rows.length ? el('table', { id: 'groups' },
      el('thead', {}, el('tr', {}, head.map((h) => el('th', {}, h)))),
      el('tbody', {}, rows)) : el('p', { class: 'muted' }, 'No service groups.'));
    rendered('groups', rows.length);
  };
}

function tokensView(r, page) {
  const net = r.net;
  const shown = el('div', { id: 'new-token' });
  if (S.canAct) {
    const f = {
      uses: el('input', { name: 'uses', type: 'number', min: 1, value: 1 }),
      expires: el('input', { name: 'expires', value: '1h' }),
      service: el('input', { name: 'service', placeholder: 'any' }),
    };
    const form = el('form', { class: 'inline', id: 'create-token' },
      el('label', {}, 'Uses', f.uses), el('label', {}, 'Expires in', f.expires),
      el('label', {}, 'Service (binding)', f.service),
      el('button', { type: 'submit', class: 'primary' }, 'Create join token'));
    form.addEventListener('submit', async (ev) => {
      ev.preventDefault();
      const body = { uses: Number(f.uses.value), expires: f.expires.value };
      if (f.service.value) body.service = f.service.value;
      const t = await act('Create a join token for ' + net + ' (' + body.uses + ' uses, expires in ' + body.expires + ')?',
        () => call('POST', v1('/networks/' + enc(net) + '/tokens'), body), 'Token created');
      if (t && t.token) {
        shown.replaceChildren(el('div', { class: 'secret' },
          el('strong', {}, 'New join token (shown once): '), el('span', { class: 'mono', id: 'token-value' }, t.token)));
      }
    });
    page.append(form);
  }
  page.append(shown);
  return async () => {
    const [tokens, apiTokens] = await Promise.all([
      call('GET', v1('/networks/' + enc(net) + '/tokens')),
      // A viewer or operator may not list API tokens (403): shown as such.
      call('GET', v1('/api-tokens')).catch((e) => (e.status === 404 || e.status === 403 ? null : [])),
    ]);
    const head = ['Id', 'Uses left', 'Expires', 'Service', 'Type', 'Service group', 'Ephemeral'];
    if (S.canAct) head.push('');
    const rows = tokens.map((t) => el('tr', { 'data-token': t.id },
      el('td', { class: 'mono' }, t.id),
      el('td', {}, t.uses_left),
      el('td', { title: when(t.expires) }, when(t.expires)),
      el('td', {}, t.service ?? el('span', { class: 'muted' }, 'any')),
      el('td', {}, t.process_type ?? ''),
      el('td', {}, t.service_group ?? ''),
      el('td', {}, t.ephemeral ? 'yes' : 'no'),
      S.canAct ? el('td', {}, el('button', {
        class: 'danger revoke', type: 'button',
        onclick: () => act('Revoke join token ' + t.id + '? Members that joined with it stay.',
          () => call('DELETE', v1('/networks/' + enc(net) + '/tokens/' + enc(t.id))), 'Token revoked'),
      }, 'Revoke')) : null));
    const apiRows = (apiTokens || []).map((t) => el('tr', { 'data-api-token': t.id },
      el('td', { class: 'mono' }, t.id),
      el('td', {}, t.name),
      el('td', {}, t.role),
      el('td', {}, t.tenant ?? el('span', { class: 'muted' }, 'every network')),
      el('td', { title: when(t.created) }, when(t.created)),
      el('td', {}, t.expires ? when(t.expires) : el('span', { class: 'muted' }, 'until revoked')),
      el('td', { class: 'mono' }, t.created_by),
      S.canAct ? el('td', {}, el('button', {
        class: 'danger revoke-api', type: 'button',
        onclick: () => act('Revoke API token ' + t.id + ' (' + t.name + ')? Everything signed in with it stops at once.',
          () => call('DELETE', v1('/api-tokens/' + enc(t.id))), 'API token revoked'),
      }, 'Revoke')) : null));
    const apiHead = ['Id', 'Name', 'Role', 'Tenant', 'Created', 'Expires', 'Created by'];
    if (S.canAct) apiHead.push('');
    const api = apiTokens === null
      ? el('p', { class: 'muted', id: 'api-tokens' }, 'API tokens: not visible to this token.')
      : apiRows.length ? el('table', { id: 'api-tokens' },
        el('thead', {}, el('tr', {}, apiHead.map((h) => el('th', {}, h)))),
        el('tbody', {}, apiRows)) : el('p', { class: 'muted', id: 'api-tokens' }, 'No API tokens.');
    replaceLive(
      el('h2', {}, 'Join tokens'),
      rows.length ? el('table', { id: 'tokens' },
        el('thead', {}, el('tr', {}, head.map((h) => el('th', {}, h)))),
        el('tbody', {}, rows)) : el('p', { class: 'muted' }, 'No join tokens.'),
      el('h2', {}, 'API tokens'), api);
    rendered('tokens', rows.length);
  };
}

const SVG = 'http://www.w3.org/2000/svg';
function svg(tag, attrs, ...kids) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  for (const k of kids) e.append(k instanceof Node ? k : document.createTextNode(visible(k)));
  return e;
}

/** The service graph as an SVG picture: services on a circle, an arrow per
 * reported pair labelled with its flows and bytes. */
function drawGraph(g) {
  const n = g.services.length;
  const W = 900, H = Math.max(420, 60 * Math.min(n, 12));
  const cx = W / 2, cy = H / 2, R = Math.min(W, H) / 2 - 70;
  const at = new Map();
  g.services.forEach((s, i) => {
    const a = (2 * Math.PI * i) / Math.max(n, 1) - Math.PI / 2;
    at.set(s.service, { x: cx + R * Math.cos(a), y: cy + R * Math.sin(a) });
  });
  const pic = svg('svg', { class: 'graph', id: 'graph', viewBox: `0 0 ${W} ${H}`, role: 'img' });
  pic.append(svg('defs', {}, svg('marker', { id: 'arrow', viewBox: '0 0 10 10', refX: 10, refY: 5, markerWidth: 8, markerHeight: 8, orient: 'auto-start-reverse' },
    svg('path', { d: 'M0,0 L10,5 L0,10 z', class: 'arrow' }))));
  for (const e of g.edges) {
    const a = at.get(e.source), b = at.get(e.destination);
    if (!a || !b) continue;
    const dx = b.x - a.x, dy = b.y - a.y, len = Math.hypot(dx, dy) || 1;
    const r = 34;
    const x1 = a.x + (dx / len) * r, y1 = a.y + (dy / len) * r;
    const x2 = b.x - (dx / len) * r, y2 = b.y - (dy / len) * r;
    const width = 1 + Math.min(6, Math.log10(1 + (e.opened || 0)));
    pic.append(svg('line', { x1, y1, x2, y2, class: 'edge', 'stroke-width': width.toFixed(1), 'marker-end': 'url(#arrow)' }));
    pic.append(svg('text', { x: (x1 + x2) / 2, y: (y1 + y2) / 2 - 4, 'text-anchor': 'middle', class: 'label' },
      `${e.opened} flows (${e.active} live), ${bytes((e.bytes_sent || 0) + (e.bytes_received || 0))}`));
  }
  for (const s of g.services) {
    const p = at.get(s.service);
    const node = svg('g', { 'data-service': s.service });
    node.append(svg('title', {}, `${s.service}: ${s.instances.length} online instance(s)${s.address ? ', address ' + s.address : ''}`));
    node.append(svg('circle', { cx: p.x, cy: p.y, r: 30, class: 'node' + (s.idle ? ' idle' : '') }));
    node.append(svg('text', { x: p.x, y: p.y + 4, 'text-anchor': 'middle' }, s.service.length > 18 ? s.service.slice(0, 17) + '…' : s.service));
    node.append(svg('text', { x: p.x, y: p.y + 46, 'text-anchor': 'middle', class: 'label' }, `${s.instances.length} up${s.idle ? ', idle' : ''}`));
    pic.append(node);
  }
  return pic;
}

function trafficView(r) {
  const net = r.net;
  return async () => {
    const g = await call('GET', v1('/networks/' + enc(net) + '/traffic'));
    replaceLive(
      el('p', { class: 'muted' }, g.services.length, ' services, ', g.edges.length, ' pairs, from ', g.reporters, ' reporting members (generation ', g.generation, ').'),
      g.services.length ? drawGraph(g) : el('p', { class: 'muted' }, 'No services yet.'));
    rendered('traffic', g.edges.length);
  };
}

function auditView() {
  return async () => {
    let entries;
    try {
      entries = await call('GET', v1('/audit'));
    } catch (e) {
      if (e.status === 404) {
        replaceLive(el('p', { class: 'muted', id: 'audit-unavailable' }, 'The audit trail is not available on this keyserver.'));
        rendered('audit', 0);
        return;
      }
      throw e;
    }
    const list = Array.isArray(entries) ? entries : (entries.entries || entries.items || []);
    const cols = [];
    for (const e of list.slice(0, 50)) for (const k of Object.keys(e)) if (!cols.includes(k)) cols.push(k);
    const cell = (v) => (v == null ? '' : typeof v === 'object' ? JSON.stringify(v) : v);
    const rows = list.map((e) => el('tr', {}, cols.map((c) => el('td', {}, cell(e[c])))));
    replaceLive(el('table', { id: 'audit' },
      el('thead', {}, el('tr', {}, cols.map((c) => el('th', {}, c)))),
      el('tbody', {}, rows)));
    rendered('audit', rows.length);
  };
}

// ---- start -----------------------------------------------------------------

window.addEventListener('hashchange', route);
document.addEventListener('DOMContentLoaded', async () => {
  $('signout').addEventListener('click', signOut);
  try {
    signedIn(await call('GET', '/ui/session'));
  } catch (_) {
    showSignIn();
  }
});
