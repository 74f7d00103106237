// The rws console: plain DOM, no framework, nothing loaded from elsewhere.
'use strict';

// One colour per corruption kind, the same on every page and chart.
const KIND_COLOURS = {
  fog: '#6b7b8c', snow: '#2f8fd8', rain: '#1d4fa0', frost: '#58b4c9',
  contrast: '#b8860b', brightness: '#c9a400', saturate: '#b0588f',
  noise: '#7a3fa0', gaussian_noise: '#7a3fa0', shot_noise: '#8e5cb5', impulse_noise: '#a02f6b', speckle_noise: '#6f3f8f',
  defocus_blur: '#2f7f6f', glass_blur: '#3f8f7f', motion_blur: '#1f6f5f', zoom_blur: '#4f9f8f', gaussian_blur: '#2f6f7f',
  pixelate: '#8b5a2b', jpeg_compression: '#a0522d', elastic_transform: '#6b8e23', spatter: '#556b2f',
  clean: '#333333',
};
const OTHER = ['#d62728', '#17becf', '#bcbd22', '#ff7f0e', '#9467bd', '#8c564b'];

let csrf = null;
let skew = 0; // server clock minus this browser's, ms
let state = null;
let page = 'activations';
let traffic = null;

const $ = (id) => document.getElementById(id);
const text = (tag, value, cls) => {
  const e = document.createElement(tag);
  e.textContent = value;
  if (cls) e.className = cls;
  return e;
};

function say(message, bad) {
  $('message').textContent = message || '';
  $('message').className = bad ? 'bad' : '';
}

async function api(path, body) {
  const opts = { credentials: 'same-origin', headers: {} };
  if (body !== undefined) {
    opts.method = 'POST';
    opts.headers['Content-Type'] = 'application/json';
    if (csrf) opts.headers['X-CSRF-Token'] = csrf;
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(path, opts);
  const data = await r.json().catch(() => ({ error: r.statusText }));
  if (!r.ok) throw Object.assign(new Error(data.error || r.statusText), { status: r.status, data });
  return data;
}

// A corruption kind's colour; a kind not in the table keeps one picked by its name.
function kindColour(kind) {
  if (KIND_COLOURS[kind]) return KIND_COLOURS[kind];
  let h = 0;
  for (const c of kind) h = (h * 31 + c.charCodeAt(0)) >>> 0;
  return OTHER[h % OTHER.length];
}

// The colour of a profile: its first signature's corruption, else its own name's.
function profileColour(name) {
  const p = state && state.profiles.find((x) => x.name === name);
  const first = p && p.signatures[0];
  const sig = first && state.signatures.find((s) => s.name === first.name);
  return kindColour((sig && sig.corruption) || name);
}

function badge(name) {
  const b = text('span', name, 'kind');
  b.style.background = profileColour(name);
  return b;
}

function countdown(untilMs) {
  const left = Math.max(0, untilMs - (Date.now() + skew));
  if (left === 0) return 'ended';
  const s = Math.floor(left / 1000);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
  return (h ? h + 'h ' : '') + String(m).padStart(h ? 2 : 1, '0') + 'm ' + String(r).padStart(2, '0') + 's';
}

function fill(tbody, rows) {
  tbody.replaceChildren(...rows.map((cells) => {
    const tr = document.createElement('tr');
    for (const c of cells) {
      const td = document.createElement('td');
      if (c instanceof Node) td.append(c); else td.textContent = c;
      tr.append(td);
    }
    return tr;
  }));
}

function renderActivations() {
  const rows = state.activations.map((a) => {
    const left = text('span', countdown(a.until_ms), 'countdown');
    left.dataset.until = a.until_ms;
    const actions = document.createElement('span');
    const extend = text('button', '+30 min');
    extend.onclick = () => change('/api/extend', { id: a.id, minutes: 30 }, 'Extended ' + a.id);
    const end = text('button', 'End now');
    end.onclick = () => change('/api/deactivate', { id: a.id }, 'Ended ' + a.id);
    actions.append(extend, ' ', end);
    return [a.scope, badge(a.profile), a.reason, left, a.id, actions];
  });
  fill($('activation-table').tBodies[0], rows);
  $('no-activations').hidden = rows.length > 0;
  $('default-name').textContent = state.default_profile;
  const select = $('profile');
  const chosen = select.value;
  select.replaceChildren(...state.profiles.map((p) => {
    const o = text('option', p.name);
    o.value = p.name;
    return o;
  }));
  if (chosen) select.value = chosen;
}

function renderProfiles() {
  fill($('profile-table').tBodies[0], state.profiles.map((p) => [
    badge(p.name),
    p.signatures.map((s) => s.name + '@' + s.alpha).join(', ') || '(none: the clean weights)',
    p.resident ? 'yes' : 'no',
    p.default ? 'default' : '',
    String(p.generation),
  ]));
}

function renderSignatures() {
  fill($('signature-table').tBodies[0], state.signatures.map((s) => {
    const kind = text('span', s.corruption, 'kind');
    kind.style.background = kindColour(s.corruption);
    // The fingerprint's start tells bases apart at a glance; the whole is its tooltip.
    const print = text('span', s.fingerprint.replace(/^(sha256:[0-9a-f]{12}).*/, '$1…'), 'mono');
    print.title = s.fingerprint;
    return [s.name, kind, s.storage, (s.bytes / 1024).toFixed(1) + '\u00a0KiB', print, s.transferred ? 'yes' : 'no'];
  }));
}

async function refresh() {
  try {
    const t0 = Date.now();
    state = await api('/api/overview');
    skew = state.now_ms - (t0 + Date.now()) / 2;
    renderActivations();
    renderProfiles();
    renderSignatures();
  } catch (e) {
    if (e.status === 401) return showLogin();
    say(e.message, true);
  }
}

async function loadHistory() {
  const scope = $('history-scope').value.trim();
  try {
    const entries = await api('/api/history?scope=' + encodeURIComponent(scope));
    fill($('history-table').tBodies[0], entries.map((e) => [
      new Date(e.at_ms).toLocaleString(),
      e.op.replace('_', ' '),
      e.scope || '',
      e.who,
      e.why,
      String(e.generation || ('rev ' + e.revision)),
    ]));
  } catch (e) {
    say(e.message, true);
  }
}

async function change(path, body, done) {
  try {
    await api(path, body);
    say(done);
  } catch (e) {
    say(e.message, true);
  }
  await refresh();
}

// A line per series over the last 120 s, with its legend in a margin of its own
// so that it never covers the newest points.
function draw(canvas, series, value, label) {
  const ctx = canvas.getContext('2d');
  const w = canvas.width, h = canvas.height, pad = 40, right = w - 190;
  ctx.clearRect(0, 0, w, h);
  let max = 1;
  for (const s of series) for (const p of s.points) max = Math.max(max, value(p));
  ctx.strokeStyle = '#ccc';
  ctx.fillStyle = '#555';
  ctx.font = '13px system-ui';
  ctx.beginPath();
  ctx.moveTo(pad, 10); ctx.lineTo(pad, h - 20); ctx.lineTo(right, h - 20);
  ctx.stroke();
  ctx.fillText(label(max), 2, 18);
  ctx.fillText('0', 24, h - 22);
  ctx.fillText('-120 s', pad, h - 4);
  ctx.fillText('now', right - 24, h - 4);
  let y = 24;
  for (const s of series) {
    ctx.strokeStyle = s.colour;
    ctx.lineWidth = s.dashed ? 1.5 : 2.5;
    ctx.setLineDash(s.dashed ? [6, 4] : []);
    ctx.beginPath();
    s.points.forEach((p, i) => {
      const x = right - (p.ago / 120) * (right - pad);
      const yy = h - 20 - (value(p) / max) * (h - 40);
      if (i === 0) ctx.moveTo(x, yy); else ctx.lineTo(x, yy);
    });
    ctx.stroke();
    ctx.beginPath();
    ctx.moveTo(right + 16, y - 4); ctx.lineTo(right + 46, y - 4);
    ctx.stroke();
    ctx.setLineDash([]);
    ctx.fillStyle = s.colour;
    ctx.fillText(s.name, right + 54, y);
    y += 18;
  }
}

function renderTraffic() {
  if (!traffic) return;
  const names = Object.keys(traffic);
  draw($('rps'), names.map((n) => ({ name: n, colour: profileColour(n), points: traffic[n] })),
    (p) => p.requests, (m) => m + '/s');
  const lat = [];
  for (const n of names) {
    const pts = traffic[n].filter((p) => p.requests > 0);
    lat.push({ name: n + ' p50', colour: profileColour(n), points: pts.map((p) => ({ ago: p.ago, v: p.p50_us })) });
    lat.push({ name: n + ' p99', colour: profileColour(n), dashed: true, points: pts.map((p) => ({ ago: p.ago, v: p.p99_us })) });
  }
  draw($('latency'), lat, (p) => p.v, (m) => (m / 1000).toFixed(1) + ' ms');
  fill($('traffic-table').tBodies[0], names.map((n) => {
    const pts = traffic[n];
    const last10 = pts.filter((p) => p.ago < 10);
    const busy = pts.filter((p) => p.requests > 0);
    const recent = busy.find((p) => p.ago > 0) || busy[0];
    const rps = last10.reduce((a, p) => a + p.requests, 0) / 10;
    return [badge(n), rps.toFixed(1),
      recent ? (recent.p50_us / 1000).toFixed(2) + ' ms' : '-',
      recent ? (recent.p99_us / 1000).toFixed(2) + ' ms' : '-',
      String(pts.reduce((a, p) => a + p.errors, 0))];
  }));
}

function show(name) {
  page = name;
  for (const b of document.querySelectorAll('#tabs button')) b.classList.toggle('on', b.dataset.page === name);
  for (const s of document.querySelectorAll('.page')) s.hidden = s.id !== name;
  if (name === 'history') loadHistory();
}

function showLogin() {
  $('login').hidden = false;
  $('tabs').hidden = true;
  $('logout').hidden = true;
  for (const s of document.querySelectorAll('.page')) s.hidden = true;
}

async function start(session) {
  csrf = session.csrf;
  $('who').textContent = session.who;
  $('login').hidden = true;
  $('tabs').hidden = false;
  $('logout').hidden = false;
  show(page);
  await refresh();
  const events = new EventSource('/api/traffic');
  events.onmessage = (m) => { traffic = JSON.parse(m.data); renderTraffic(); };
}

async function boot() {
  for (const b of document.querySelectorAll('#tabs button')) b.onclick = () => show(b.dataset.page);
  $('login-form').onsubmit = async (e) => {
    e.preventDefault();
    try {
      await api('/login', { token: $('token').value });
      $('token').value = '';
      await start(await api('/api/session'));
      say('');
    } catch (err) {
      say(err.message, true);
    }
  };
  $('logout').onclick = async () => {
    await api('/logout', {}).catch(() => {});
    location.reload();
  };
  $('activate-form').onsubmit = (e) => {
    e.preventDefault();
    change('/api/activate', {
      scope: $('scope').value.trim(),
      profile: $('profile').value,
      minutes: Number($('minutes').value),
      reason: $('reason').value,
    }, 'Activated ' + $('profile').value + ' on ' + $('scope').value.trim());
  };
  $('history-form').onsubmit = (e) => { e.preventDefault(); loadHistory(); };
  try {
    await start(await api('/api/session'));
  } catch (e) {
    if (e.data && e.data.token_required === false) $('token-label').hidden = true;
    showLogin();
  }
  // The countdowns tick every second; the state is re-read every 2 s.
  setInterval(() => {
    for (const c of document.querySelectorAll('.countdown')) c.textContent = countdown(Number(c.dataset.until));
  }, 1000);
  setInterval(() => { if (csrf) refresh(); }, 2000);
}

boot();
