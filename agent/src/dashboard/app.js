// The rba dashboard: fills <main> from the node's read API (agent/src/http.rs) and follows a
// build's log over its WebSocket. No framework, no innerHTML: every text goes in as text.
'use strict';
const main = document.getElementById('main');
const page = document.body.dataset.page;
const id = document.body.dataset.id;

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === 'text') e.textContent = v; else if (v != null) e.setAttribute(k, v);
  }
  for (const kid of kids) if (kid != null) e.append(kid);
  return e;
}

async function api(path) {
  const r = await fetch(path, { headers: { Accept: 'application/json' } });
  if (r.status === 401) {
    location.href = '/login?next=' + encodeURIComponent(location.pathname + location.search);
    throw new Error('login');
  }
  if (!r.ok) throw new Error(path + ': ' + r.status);
  return { json: await r.json(), link: r.headers.get('Link') };
}

function bytes(n) {
  const u = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + ' ' + u[i];
}

function dur(ms) {
  if (ms == null) return '';
  if (ms < 1000) return ms + ' ms';
  const s = ms / 1000;
  return s < 60 ? s.toFixed(1) + ' s' : Math.floor(s / 60) + ' min ' + Math.round(s % 60) + ' s';
}

const when = (ms) => new Date(ms).toISOString().replace('T', ' ').slice(0, 19);
const active = (b) => b.status === 'queued' || b.status === 'running';

function badge(b) {
  const label = b.status === 'success' && b.cache_hit ? 'cache hit' : b.status;
  const text = b.status === 'queued' ? 'queued #' + (b.queue_position + 1) : label;
  return el('span', { class: 'badge s-' + label.replace(' ', '-'), text });
}

function progress(b) {
  if (!b.progress) return null;
  const { done, total } = b.progress;
  const bar = el('span', { class: 'bar' }, el('span'));
  bar.firstChild.style.width = (total ? Math.min(100, (100 * done) / total) : 0) + '%';
  return el('span', { class: 'progress' }, bar, el('span', { text: total ? done + '/' + total + ' units' : done + ' units' }));
}

function row(b) {
  return el('tr', { 'data-id': b.id },
    el('td', {}, el('a', { href: '/ui/builds/' + encodeURIComponent(b.id) }, badge(b))),
    el('td', { text: b.kind + (b.release ? ' --release' : '') }),
    el('td', { text: b.workspace || '' }),
    el('td', { class: 'who', text: b.tenant || '' }),
    el('td', { text: when(b.submitted_at_ms) }),
    el('td', { text: dur(b.duration_ms != null ? b.duration_ms : b.elapsed_ms) }),
    el('td', {}, progress(b)));
}

function select(name, values, current) {
  const s = el('select', { name }, el('option', { value: '', text: 'any ' + name }));
  for (const v of values) s.append(el('option', { value: v, text: v }));
  s.value = current || '';
  s.addEventListener('change', () => s.form.submit());
  return s;
}

async function buildsPage() {
  const q = new URLSearchParams(location.search);
  const filters = el('form', { class: 'filters', method: 'get', action: '/' },
    select('status', document.body.dataset.statuses.split(' '), q.get('status')),
    select('kind', document.body.dataset.kinds.split(' '), q.get('kind')));
  const body = el('tbody');
  const table = el('table', { class: 'builds' },
    el('thead', {}, el('tr', {}, ...['Status', 'Kind', 'Workspace', 'Submitter', 'Submitted (UTC)', 'Duration', 'Progress'].map((h) => el('th', { text: h })))),
    body);
  const nav = el('p', { class: 'pager' });
  main.replaceChildren(el('h1', { text: 'Builds' }), filters, table, nav);
  const path = '/builds?' + q.toString();
  let first = true;
  for (;;) {
    let busy = false;
    try {
      const { json, link } = await api(path);
      body.replaceChildren(...json.map(row));
      if (!json.length) body.append(el('tr', {}, el('td', { colspan: 7, class: 'empty', text: 'No builds.' })));
      busy = json.some(active);
      const next = link && /<\/builds\?([^>]*)>;\s*rel="next"/.exec(link);
      nav.replaceChildren(...[
        q.has('cursor') && el('a', { href: '/?' + without(q, 'cursor'), text: '« Newest' }),
        next && el('a', { href: '/?' + next[1], text: 'Older »' })].filter(Boolean));
      if (first) { first = false; performance.mark('rba-builds-rendered'); document.body.dataset.ready = '1'; }
    } catch (e) {
      if (e.message === 'login') return;
      nav.replaceChildren(el('span', { class: 'error', text: String(e.message) }));
    }
    await new Promise((r) => setTimeout(r, busy ? 1000 : 3000));
  }
}

function without(q, key) {
  const c = new URLSearchParams(q);
  c.delete(key);
  return c.toString();
}

// Cargo's SGR colours as classes: f30..f37, f90..f97 (foreground), b (bold). `st` carries the
// colour from one line to the next, as a terminal would.
function ansi(line, into, st) {
  const re = /\x1b\[([0-9;]*)m/g;
  let at = 0;
  let m;
  const put = (text) => {
    if (!text) return;
    if (!st.fg && !st.bold) { into.append(text); return; }
    into.append(el('span', { class: [st.fg && 'f' + st.fg, st.bold && 'b'].filter(Boolean).join(' '), text }));
  };
  while ((m = re.exec(line))) {
    put(line.slice(at, m.index));
    at = re.lastIndex;
    const codes = m[1] === '' ? [0] : m[1].split(';').map(Number);
    for (let i = 0; i < codes.length; i++) {
      const c = codes[i];
      if (c === 0) { st.fg = 0; st.bold = false; }
      else if (c === 1) st.bold = true;
      else if (c === 22) st.bold = false;
      else if ((c >= 30 && c <= 37) || (c >= 90 && c <= 97)) st.fg = c;
      else if (c === 39) st.fg = 0;
      else if (c === 38 && codes[i + 1] === 5) { const n = codes[i + 2]; st.fg = n < 8 ? 30 + n : n < 16 ? 82 + n : 0; i += 2; }
    }
  }
  put(line.slice(at));
  into.append('\n');
}

function summary(b) {
  const items = [
    ['Status', badge(b)], ['Kind', b.kind + (b.release ? ' (release)' : '')], ['Workspace', b.workspace || ''],
    ['Submitter', b.tenant || ''], ['Submitted (UTC)', when(b.submitted_at_ms)],
    ['Duration', dur(b.duration_ms != null ? b.duration_ms : b.elapsed_ms)], ['Progress', progress(b)],
    ['Cache hit', b.cache_hit ? 'yes' : 'no'], ['Action digest', el('code', { text: b.action_digest })],
    ['Input root', el('code', { text: b.input_root })], ['Exit code', b.exit_code == null ? '' : String(b.exit_code)],
    ['Error', b.error || null]];
  const dl = el('dl', { class: 'summary' });
  for (const [k, v] of items) if (v != null && v !== '') dl.append(el('dt', { text: k }), el('dd', {}, v));
  return dl;
}

// Each step with its duration and, where the node located it in the log, its own lines
// (`lines` is the log received so far, by seq), shown on demand.
function steps(b, lines) {
  if (!b.steps.length) return el('p', { class: 'empty', text: active(b) ? 'Steps are listed when the build ends.' : 'No steps recorded.' });
  const total = b.steps.reduce((s, x) => s + x.ms, 0) || 1;
  return el('table', { class: 'steps' }, ...b.steps.flatMap((s) => {
    const bar = el('span', { class: 'bar' }, el('span'));
    bar.firstChild.style.width = (100 * s.ms) / total + '%';
    const n = s.end_line != null ? s.end_line - s.first_line : 0;
    const label = () => (logRow.hidden ? '▸ ' : '▾ ') + n + (n === 1 ? ' line' : ' lines');
    const log = el('pre', { class: 'log' });
    const logRow = el('tr', { class: 'steplog', hidden: '' }, el('td', { colspan: 4 }, log));
    const toggle = n > 0 ? el('button', { type: 'button', class: 'toggle', 'data-step': s.name, text: label() }) : null;
    if (toggle) toggle.addEventListener('click', () => {
      if (logRow.hidden) {
        const st = { fg: 0, bold: false };
        log.replaceChildren();
        for (let i = s.first_line; i < s.end_line && i < lines.length; i++) ansi(lines[i], log, st);
      }
      logRow.hidden = !logRow.hidden;
      toggle.textContent = label();
    });
    return [el('tr', {}, el('td', { text: s.name }), el('td', { class: 'num', text: dur(s.ms) }), el('td', {}, bar), el('td', {}, toggle)), logRow];
  }));
}

function artifacts(b) {
  if (!b.artifacts.length) return el('p', { class: 'empty', text: 'No artifacts.' });
  return el('table', { class: 'artifacts' },
    el('thead', {}, el('tr', {}, ...['Path', 'Size', 'Digest', ''].map((h) => el('th', { text: h })))),
    el('tbody', {}, ...b.artifacts.map((a) => el('tr', {},
      el('td', { text: a.path + (a.executable ? ' *' : '') }), el('td', { class: 'num', text: bytes(a.size) }),
      el('td', {}, el('code', { text: a.digest })), el('td', {}, el('a', { href: a.download, download: '', text: 'download' }))))));
}

async function buildPage() {
  const head = el('div');
  const stepsBox = el('div');
  const artBox = el('div');
  const log = el('pre', { class: 'log', id: 'log' });
  const state = el('p', { class: 'logstate', id: 'logstate', text: 'connecting…' });
  main.replaceChildren(el('h1', {}, 'Build ', el('code', { text: id })), head,
    el('h2', { text: 'Steps' }), stepsBox, el('h2', { text: 'Artifacts' }), artBox,
    el('h2', { text: 'Log' }), state, log);
  let ended = false;
  const raw = [];
  const st = { fg: 0, bold: false };
  let pending = document.createDocumentFragment();
  let queued = false;
  const flush = () => {
    queued = false;
    const stick = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
    log.append(pending);
    pending = document.createDocumentFragment();
    log.dataset.lines = String(raw.length);
    if (stick) log.scrollTop = log.scrollHeight;
  };
  const ws = new WebSocket((location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/v1/sessions/' + encodeURIComponent(id) + '/events');
  ws.onopen = () => { state.textContent = 'following live'; };
  ws.onmessage = (ev) => {
    const m = JSON.parse(ev.data);
    if (m.type === 'log') {
      raw.push(m.line);
      ansi(m.line, pending, st);
      if (!queued) { queued = true; requestAnimationFrame(flush); }
    } else {
      ended = true;
      state.textContent = m.type === 'end' ? 'ended: ' + m.status + ' in ' + dur(m.duration_ms) : 'ended: ' + m.message;
      state.dataset.ended = '1';
    }
  };
  ws.onclose = () => { if (!ended) state.textContent = 'the log stream closed'; };
  for (;;) {
    let b;
    try {
      b = (await api('/builds/' + encodeURIComponent(id))).json;
    } catch (e) {
      if (e.message === 'login') return;
      head.replaceChildren(el('p', { class: 'error', text: String(e.message) }));
      return;
    }
    head.replaceChildren(summary(b));
    // Steps and artifacts only change once, at the end: keep an opened step open.
    const shown = JSON.stringify([b.steps, b.artifacts]);
    if (shown !== stepsBox.dataset.shown) {
      stepsBox.dataset.shown = shown;
      stepsBox.replaceChildren(steps(b, raw));
      artBox.replaceChildren(artifacts(b));
    }
    if (!active(b) && ended) { document.body.dataset.ready = '1'; return; }
    document.body.dataset.ready = '1';
    await new Promise((r) => setTimeout(r, 1000));
  }
}

async function cachePage() {
  for (;;) {
    try {
      const c = (await api('/cache/stats')).json;
      const rows = [
        ['Store size', bytes(c.total_bytes) + ' of ' + bytes(c.max_bytes)], ['Blobs', c.blob_count],
        ['Hit rate', (100 * c.hit_rate).toFixed(1) + '% (' + c.cache_hits + ' of ' + c.jobs_finished + ' jobs since start)'],
        ['Evictions', c.evictions + ' (' + bytes(c.evicted_bytes) + ')'], ['Action cache entries', c.action_cache_entries],
        ['Slots', c.slots], ['Shared registry cache', bytes(c.registry_cache_bytes)],
        ['Workers', c.workers], ['Queued jobs', c.queued], ['Builds recorded', c.builds]];
      const dl = el('dl', { class: 'summary' });
      for (const [k, v] of rows) dl.append(el('dt', { text: k }), el('dd', { text: String(v) }));
      main.replaceChildren(el('h1', { text: 'Cache' }), dl);
      document.body.dataset.ready = '1';
    } catch (e) {
      if (e.message === 'login') return;
      main.replaceChildren(el('p', { class: 'error', text: String(e.message) }));
    }
    await new Promise((r) => setTimeout(r, 5000));
  }
}

if (page === 'builds') buildsPage();
else if (page === 'build') buildPage();
else if (page === 'cache') cachePage();
