// moonshard web console: chat, evaluation and live telemetry over the server's own API.
// Plain JavaScript, no build step, nothing loaded from elsewhere; charts drawn on canvas.
'use strict';
(function () {
  const KEY = 'moonshard.apiKey';
  const WINDOW_S = 600; // charts keep the last 10 minutes
  const $ = (id) => document.getElementById(id);
  const state = { info: null, online: null, chatAbort: null, messages: [], job: null, lastEvent: 0,
    sampleWarnings: [], charts: [], keyWaiters: [] };

  // ------------------------------------------------------------------ the API and the key

  function apiKey() { return sessionStorage.getItem(KEY) || ''; }

  function withAuth(extra) {
    const h = Object.assign({}, extra || {});
    const k = apiKey();
    if (k) h.Authorization = 'Bearer ' + k;
    return h;
  }

  class AuthError extends Error {}

  // fetch with the key; a network failure marks the server gone, a 401 asks for the key
  async function api(path, opts) {
    opts = opts || {};
    const used = apiKey();
    let res;
    try {
      res = await fetch(path, Object.assign({}, opts, { headers: withAuth(opts.headers), cache: 'no-store' }));
    } catch (e) {
      if (e.name !== 'AbortError') serverGone();
      throw e;
    }
    serverBack();
    if (res.status === 401 && apiKey() !== used) return api(path, opts); // a key came meanwhile
    if (res.status === 401) {
      const body = await res.json().catch(() => null);
      askKey(body && body.error ? body.error.message : 'the API key is not valid');
      throw new AuthError('API key needed');
    }
    return res;
  }

  async function apiJSON(path, opts) {
    const res = await api(path, opts);
    const body = await res.json().catch(() => null);
    if (!res.ok) {
      const msg = body && body.error ? body.error.message : 'HTTP ' + res.status;
      const err = new Error(msg);
      err.param = body && body.error ? body.error.param : null;
      throw err;
    }
    return body;
  }

  function askKey(message) {
    $('key-form').hidden = false;
    $('key-error').textContent = apiKey() ? message : '';
    $('key-input').focus();
  }

  function keyReady() {
    if (!$('key-form').hidden) return new Promise((resolve) => state.keyWaiters.push(resolve));
    return Promise.resolve();
  }

  $('key-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(KEY, $('key-input').value.trim());
    $('key-form').hidden = true;
    const waiters = state.keyWaiters;
    state.keyWaiters = [];
    waiters.forEach((w) => w());
    loadInfo().then(loadRuns);
  });

  // ------------------------------------------------------------------ server gone / back

  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

  function serverGone() {
    if (state.online === false) return;
    state.online = false;
    const b = $('banner');
    b.textContent = 'The server at ' + location.host + ' is not answering. Retrying every 2 seconds…';
    b.hidden = false;
    $('conn').textContent = 'offline';
    $('conn').className = 'pill down';
    watchHealth();
  }

  function serverBack() {
    if (state.online === true) return;
    const wasDown = state.online === false;
    state.online = true;
    $('banner').hidden = true;
    $('conn').textContent = 'online';
    $('conn').className = 'pill up';
    if (wasDown) { loadInfo(); loadRuns(); }
  }

  async function watchHealth() {
    while (state.online === false) {
      await sleep(2000);
      try {
        const r = await fetch('/health', { cache: 'no-store' });
        if (r.ok) serverBack();
      } catch (e) { /* still gone */ }
    }
  }

  // ------------------------------------------------------------------ info and warnings

  function gib(b) { return (b / 2 ** 30).toFixed(b < 2 ** 30 ? 2 : 1) + ' GiB'; }
  function mib(b) { return b >= 2 ** 30 ? gib(b) : (b / 2 ** 20).toFixed(2) + ' MiB'; }
  const list = (x) => (Array.isArray(x) ? x : []);

  async function loadInfo() {
    let info;
    try { info = await apiJSON('/v1/console/info'); } catch (e) { return; }
    state.info = info;
    const m = info.model, p = info.placement, e = info.engine, mc = info.machine || {};
    const gpus = list(mc.gpus);
    const host = mc.host ? `${mc.host.cores} cores` : '';
    const ram = mc.memory && mc.memory.total ? gib(mc.memory.total) + ' RAM' : '';
    const gpuText = gpus.length ? `${gpus.length} GPU (${gpus[0].name || ''})` : 'no GPU';
    $('model-line').textContent = `${m.name} · ${m.arch || ''} ${m.layers || ''} layers, dim ${m.dim}, context ${m.max_seq}` +
      ` · ${p.device} ${p.dtype} · tp ${p.tp} × pp ${p.pp}` + (p.offload ? ` · weights streamed from ${p.offload}` : '') +
      ` · weights ${mib(p.weight_bytes)}, KV ${mib(p.kv_bytes)}` +
      ` · max batch ${e.max_batch}, ${e.kv_blocks} KV blocks of ${e.block_size} tokens` +
      ` · machine: ${[host, ram, gpuText].filter(Boolean).join(', ')}`;
    $('model-line').dataset.model = m.name;
    document.title = m.name + ' · moonshard';
    renderTasks(info.tasks || []);
    renderWarnings();
    if (!m.chat_template) {
      $('chat-status').textContent = 'This model has no chat template: start the server with --template to chat.';
    }
  }

  function renderWarnings() {
    const ul = $('warnings');
    ul.textContent = '';
    const all = list(state.info && state.info.warnings).concat(state.sampleWarnings);
    for (const w of all) {
      const li = document.createElement('li');
      li.dataset.key = w.key;
      li.textContent = '⚠ ' + w.message;
      ul.appendChild(li);
    }
  }

  // ------------------------------------------------------------------ charts

  const COLORS = ['#2563eb', '#16a34a', '#dc2626', '#9333ea', '#ea580c', '#0891b2', '#4d7c0f', '#be185d'];

  class Chart {
    // spec: { id, title, unit, source, series: [[label, fn(sample)]] | keys: fn(sample) -> { label: value } }
    constructor(spec, parent) {
      this.spec = spec;
      this.data = new Map(); // label -> [[t, v]]
      this.points = 0;
      this.values_seen = 0; // numbers pushed (not gaps)
      this.na = false;
      const el = document.createElement('div');
      el.className = 'chart';
      el.id = 'chart-' + spec.id;
      el.dataset.points = '0';
      el.dataset.values = '0';
      const title = document.createElement('div');
      title.className = 'title';
      const name = document.createElement('span');
      name.textContent = spec.title;
      this.now = document.createElement('span');
      this.now.className = 'now';
      this.now.textContent = '—';
      title.append(name, this.now);
      this.canvas = document.createElement('canvas');
      this.legend = document.createElement('div');
      this.legend.className = 'legend';
      el.append(title, this.canvas, this.legend);
      parent.appendChild(el);
      this.el = el;
    }

    values(s) {
      if (this.spec.keys) return this.spec.keys(s) || {};
      const out = {};
      for (const [label, fn] of this.spec.series) out[label] = fn(s);
      return out;
    }

    push(s) {
      const na = this.spec.source && s.sources && s.sources[this.spec.source] === false;
      this.na = !!na;
      this.el.classList.toggle('na', this.na);
      const t = s.t;
      const vals = na ? {} : this.values(s);
      for (const [label, v] of Object.entries(vals)) {
        if (!this.data.has(label)) this.data.set(label, []);
        const num = typeof v === 'number' && isFinite(v);
        this.data.get(label).push([t, num ? v : null]);
        if (num) this.values_seen += 1;
      }
      // a series this sample lacks (a rank that sent nothing) gets a gap
      for (const [label, arr] of this.data) if (!(label in vals)) arr.push([t, null]);
      for (const arr of this.data.values()) {
        while (arr.length && arr[0][0] < t - WINDOW_S) arr.shift();
      }
      this.tmax = t;
      this.points += 1;
      this.el.dataset.points = String(this.points);
      this.el.dataset.values = String(this.values_seen);
      this.el.dataset.series = Array.from(this.data.keys()).join(',');
      if (this.na) {
        this.now.textContent = 'n/a';
      } else {
        const parts = [];
        for (const [label, v] of Object.entries(vals)) {
          parts.push(label + ' ' + (typeof v === 'number' ? fmt(v) : '–'));
        }
        this.now.textContent = parts.join(' · ') + (this.spec.unit ? ' ' + this.spec.unit : '');
      }
      this.dirty = true;
    }

    draw() {
      if (!this.dirty) return;
      this.dirty = false;
      const c = this.canvas, dpr = window.devicePixelRatio || 1;
      const w = c.clientWidth, h = c.clientHeight;
      if (c.width !== Math.round(w * dpr) || c.height !== Math.round(h * dpr)) {
        c.width = Math.round(w * dpr);
        c.height = Math.round(h * dpr);
      }
      const g = c.getContext('2d');
      g.setTransform(dpr, 0, 0, dpr, 0, 0);
      g.clearRect(0, 0, w, h);
      const left = 40, right = 6, top = 6, bottom = 16;
      const pw = w - left - right, ph = h - top - bottom;
      g.font = '10px system-ui, sans-serif';
      g.fillStyle = '#6b7280';
      if (this.na) {
        g.textAlign = 'center';
        g.fillText('n/a: no source in this run', w / 2, h / 2);
        this.legend.textContent = '';
        return;
      }
      // the span shown grows with the data, from one minute to the 10 minutes kept
      let first = Infinity;
      for (const arr of this.data.values()) if (arr.length && arr[0][0] < first) first = arr[0][0];
      const t1 = this.tmax || 0;
      const span = Math.min(WINDOW_S, Math.max(60, isFinite(first) ? t1 - first : 0));
      const t0 = t1 - span;
      let ymax = 0;
      for (const arr of this.data.values()) for (const [, v] of arr) if (v !== null && v > ymax) ymax = v;
      ymax = niceMax(ymax);
      g.strokeStyle = '#e5e7eb';
      g.lineWidth = 1;
      g.textAlign = 'right';
      for (let k = 0; k <= 2; k++) {
        const y = top + ph - (ph * k) / 2;
        g.beginPath(); g.moveTo(left, y); g.lineTo(left + pw, y); g.stroke();
        g.fillText(fmt((ymax * k) / 2), left - 4, y + 3);
      }
      g.textAlign = 'left';
      g.fillText(span >= 120 ? '-' + Math.round(span / 60) + ' min' : '-' + Math.round(span) + ' s', left, h - 3);
      g.textAlign = 'right';
      g.fillText('now', left + pw, h - 3);
      const x = (t) => left + ((t - t0) / span) * pw;
      const y = (v) => top + ph - (v / ymax) * ph;
      let i = 0;
      this.legend.textContent = '';
      for (const [label, arr] of this.data) {
        const color = COLORS[i++ % COLORS.length];
        g.strokeStyle = color;
        g.lineWidth = 1.6;
        g.beginPath();
        let pen = false;
        for (const [t, v] of arr) {
          if (v === null) { pen = false; continue; }
          if (pen) g.lineTo(x(t), y(v)); else g.moveTo(x(t), y(v));
          pen = true;
        }
        g.stroke();
        const item = document.createElement('span');
        const sw = document.createElement('i');
        sw.style.background = color;
        item.append(sw, document.createTextNode(label));
        this.legend.appendChild(item);
      }
    }
  }

  function niceMax(v) {
    if (!(v > 0)) return 1;
    const p = 10 ** Math.floor(Math.log10(v));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }

  function fmt(v) {
    if (v === 0) return '0';
    const a = Math.abs(v);
    if (a >= 1e6) return (v / 1e6).toFixed(1) + 'M';
    if (a >= 1e4) return (v / 1e3).toFixed(0) + 'k';
    if (a >= 100) return v.toFixed(0);
    if (a >= 10) return v.toFixed(1);
    return v.toFixed(2);
  }

  // one line per rank: s.ranks[i][field] (null while a rank sends nothing: a gap)
  const perRank = (field, scale) => (s) => {
    const out = {};
    const ranks = list(s.ranks);
    if (ranks.length) {
      for (const r of ranks) {
        const x = r[field];
        out['rank ' + r.rank] = typeof x === 'number' ? x * (scale || 1) : null;
      }
    } else {
      const v = s[field];
      out['rank 0'] = typeof v === 'number' ? v * (scale || 1) : null;
    }
    return out;
  };

  // one line per rank and kind of collective ("r1 all_reduce")
  const collectives = (s) => {
    const ranks = list(s.ranks);
    if (!ranks.some((r) => r.collectives_ms)) return s.collectives_ms || {};
    const out = {};
    for (const r of ranks) {
      for (const [k, x] of Object.entries(r.collectives_ms || {})) out['r' + r.rank + ' ' + k] = typeof x === 'number' ? x : null;
    }
    return out;
  };

  const CHARTS = [
    { id: 'tokens', title: 'Prefill and decode', unit: 'tok/s',
      series: [['prefill', (s) => s.prefill_tps], ['decode', (s) => s.decode_tps]] },
    { id: 'latency', title: 'TTFT and ITL (means)', unit: 'ms',
      series: [['TTFT', (s) => s.ttft_ms], ['ITL', (s) => s.itl_ms]] },
    { id: 'batch', title: 'Running batch and queue', unit: 'seq',
      series: [['batch', (s) => s.batch], ['queue', (s) => s.queue]] },
    { id: 'kv', title: 'KV-cache blocks used', unit: 'blocks',
      series: [['used', (s) => s.kv_used], ['total', (s) => s.kv_total]] },
    { id: 'collectives', title: 'Collectives by kind', unit: 'ms/s', source: 'collectives',
      keys: collectives },
    { id: 'bubble', title: 'Pipeline bubble', unit: '%', source: 'bubble', keys: perRank('bubble', 100) },
    { id: 'weights', title: 'Weight stream', unit: 'GB/s', source: 'weight_stream', keys: perRank('weight_gbs') },
    { id: 'nvme', title: 'NVMe queue depth (layer reads queued)', unit: '', source: 'nvme', keys: perRank('nvme_qd') },
    { id: 'stall', title: 'Compute waiting for streamed weights', unit: 'ms/s', source: 'prefetch',
      keys: perRank('prefetch_stall_s', 1000) },
    { id: 'ranks', title: 'Time since each rank reported', unit: 's', keys: perRank('age_s') },
  ];

  function buildCharts() {
    const parent = $('charts');
    state.charts = CHARTS.map((spec) => new Chart(spec, parent));
    const frame = () => {
      for (const c of state.charts) c.draw();
      requestAnimationFrame(frame);
    };
    requestAnimationFrame(frame);
    window.addEventListener('resize', () => state.charts.forEach((c) => { c.dirty = true; }));
  }

  function onSample(s) {
    state.lastEvent = Date.now();
    for (const c of state.charts) c.push(s);
  }

  // the events stream: fetch() reads it (EventSource cannot send the key); reconnects
  async function events() {
    for (;;) {
      await keyReady();
      const ctrl = new AbortController();
      let watchdog = null;
      try {
        const res = await api('/v1/console/events', { signal: ctrl.signal });
        if (!res.ok) throw new Error('HTTP ' + res.status);
        state.lastEvent = Date.now();
        watchdog = setInterval(() => { if (Date.now() - state.lastEvent > 5000) ctrl.abort(); }, 1000);
        const reader = res.body.getReader();
        const dec = new TextDecoder();
        let buf = '';
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += dec.decode(value, { stream: true });
          let i;
          while ((i = buf.indexOf('\n\n')) >= 0) {
            handleEvent(buf.slice(0, i));
            buf = buf.slice(i + 2);
          }
        }
      } catch (e) {
        if (e instanceof AuthError) continue;
      } finally {
        if (watchdog) clearInterval(watchdog);
      }
      serverGone(); // the stream ended: the server went away (or stopped sending)
      await sleep(2000);
    }
  }

  function handleEvent(block) {
    let name = 'message';
    const data = [];
    for (const line of block.split('\n')) {
      if (line.startsWith('event:')) name = line.slice(6).trim();
      else if (line.startsWith('data:')) data.push(line.slice(5).replace(/^ /, ''));
    }
    if (!data.length) return;
    let obj;
    try { obj = JSON.parse(data.join('\n')); } catch (e) { return; }
    if (name === 'history') {
      for (const c of state.charts) { c.data.clear(); c.points = 0; c.values_seen = 0; }
      for (const s of list(obj.samples)) onSample(s);
      return;
    }
    onSample(obj);
    state.sampleWarnings = list(obj.warnings);
    renderWarnings();
    if (obj.eval && (!state.job || state.job.id !== obj.eval.id)) followJob(obj.eval.id);
  }

  // ------------------------------------------------------------------ chat

  function bubble(role, text) {
    const div = document.createElement('div');
    div.className = 'msg ' + role;
    const body = document.createElement('span');
    body.className = 'text';
    body.textContent = text;
    div.appendChild(body);
    $('messages').appendChild(div);
    $('messages').scrollTop = $('messages').scrollHeight;
    return div;
  }

  function meta(div, text) {
    let m = div.querySelector('.meta');
    if (!m) { m = document.createElement('span'); m.className = 'meta'; div.appendChild(m); }
    m.textContent = text;
  }

  function num(id) {
    const v = $(id).value.trim();
    return v === '' ? undefined : Number(v);
  }

  async function sendChat(text) {
    const userDiv = bubble('user', text);
    userDiv.dataset.role = 'user';
    state.messages.push({ role: 'user', content: text });
    const div = bubble('assistant', '');
    div.classList.add('streaming');
    div.dataset.state = 'waiting';
    div.dataset.chunks = '0';
    const out = div.querySelector('.text');
    const msgs = [];
    const sys = $('system').value.trim();
    if (sys) msgs.push({ role: 'system', content: sys });
    const body = { messages: msgs.concat(state.messages), stream: true, stream_options: { include_usage: true },
      temperature: num('temperature'), top_p: num('top_p'), max_tokens: num('max_tokens') };
    if ($('ignore_eos').checked) body.ignore_eos = true;
    const ctrl = new AbortController();
    state.chatAbort = ctrl;
    $('stop').disabled = false;
    $('send').disabled = true;
    const t0 = performance.now();
    let text2 = '', chunks = 0, usage = null, finish = null, ttft = null;
    try {
      const res = await api('/v1/chat/completions', { method: 'POST', signal: ctrl.signal,
        headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body) });
      if (!res.ok) {
        const e = await res.json().catch(() => null);
        throw new Error(e && e.error ? e.error.message + (e.error.param ? ' (' + e.error.param + ')' : '') : 'HTTP ' + res.status);
      }
      div.dataset.state = 'streaming';
      const reader = res.body.getReader();
      const dec = new TextDecoder();
      let buf = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += dec.decode(value, { stream: true });
        let i;
        while ((i = buf.indexOf('\n\n')) >= 0) {
          const line = buf.slice(0, i);
          buf = buf.slice(i + 2);
          if (!line.startsWith('data: ')) continue;
          const d = line.slice(6);
          if (d === '[DONE]') continue;
          const o = JSON.parse(d);
          if (o.error) throw new Error(o.error.message);
          if (o.usage) usage = o.usage;
          const ch = o.choices && o.choices[0];
          if (!ch) continue;
          if (ch.delta && ch.delta.content) {
            if (ttft === null) ttft = performance.now() - t0;
            text2 += ch.delta.content;
            out.textContent = text2;
            chunks += 1;
            div.dataset.chunks = String(chunks);
            $('messages').scrollTop = $('messages').scrollHeight;
          }
          if (ch.finish_reason) finish = ch.finish_reason;
        }
      }
      div.dataset.state = 'done';
      const secs = (performance.now() - t0) / 1000;
      meta(div, `${usage ? usage.completion_tokens : chunks} tokens in ${secs.toFixed(2)} s` +
        (ttft !== null ? `, first after ${ttft.toFixed(0)} ms` : '') + (finish ? ` · ${finish}` : ''));
    } catch (e) {
      if (e.name === 'AbortError') {
        div.dataset.state = 'stopped';
        meta(div, `stopped after ${chunks} chunks`);
      } else {
        div.dataset.state = 'error';
        meta(div, 'error: ' + e.message);
      }
    } finally {
      div.classList.remove('streaming');
      state.chatAbort = null;
      $('stop').disabled = true;
      $('send').disabled = false;
    }
    state.messages.push({ role: 'assistant', content: text2 });
  }

  $('chat-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const text = $('chat-input').value.trim();
    if (!text || state.chatAbort) return;
    $('chat-input').value = '';
    sendChat(text);
  });
  $('chat-input').addEventListener('keydown', (ev) => {
    if (ev.key === 'Enter' && !ev.shiftKey) { ev.preventDefault(); $('chat-form').requestSubmit(); }
  });
  // aborting the fetch closes the connection: the server cancels the request and frees its blocks
  $('stop').addEventListener('click', () => { if (state.chatAbort) state.chatAbort.abort(); });
  $('clear').addEventListener('click', () => { state.messages = []; $('messages').textContent = ''; });

  // ------------------------------------------------------------------ evaluation

  function renderTasks(tasks) {
    const fs = $('eval-tasks');
    const checked = new Set(Array.from(fs.querySelectorAll('input:checked')).map((i) => i.value));
    if (!checked.size) checked.add('arc_easy');
    fs.querySelectorAll('label').forEach((l) => l.remove());
    for (const t of tasks) {
      const l = document.createElement('label');
      const cb = document.createElement('input');
      cb.type = 'checkbox';
      cb.value = t;
      cb.name = 'task';
      cb.checked = checked.has(t);
      l.append(cb, document.createTextNode(' ' + t));
      fs.appendChild(l);
    }
  }

  $('eval-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    $('eval-error').textContent = '';
    const tasks = Array.from($('eval-tasks').querySelectorAll('input:checked')).map((i) => i.value);
    const body = { tasks };
    const limit = num('eval-limit'), k = num('eval-fewshot');
    if (limit !== undefined) body.limit = limit;
    if (k !== undefined) body.num_fewshot = k;
    try {
      const job = await apiJSON('/v1/console/evals', { method: 'POST', headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify(body) });
      followJob(job.id, job);
    } catch (e) {
      $('eval-error').textContent = e.message;
    }
  });

  $('eval-cancel').addEventListener('click', async () => {
    if (!state.job) return;
    try { await apiJSON('/v1/console/evals/' + state.job.id, { method: 'DELETE' }); } catch (e) { /* shown by the poll */ }
  });

  async function followJob(id, first) {
    if (state.job && state.job.id === id && state.job.polling) return;
    state.job = { id, polling: true };
    $('eval-results').hidden = true;
    let job = first;
    while (true) {
      if (job) {
        showProgress(job);
        if (job.state !== 'queued' && job.state !== 'running') break;
      }
      await sleep(400);
      if (!state.job || state.job.id !== id) return;
      try { job = await apiJSON('/v1/console/evals/' + id); } catch (e) { if (state.online === false) await sleep(1600); }
    }
    state.job.polling = false;
    $('eval-cancel').disabled = true;
    $('eval-start').disabled = false;
    if (job.state === 'done') showResults(job);
    if (job.state === 'failed') $('eval-error').textContent = 'eval failed: ' + job.error;
    loadRuns();
  }

  function showProgress(job) {
    const p = $('eval-progress');
    p.max = Math.max(1, job.total);
    p.value = job.done;
    const running = job.state === 'running' || job.state === 'queued';
    $('eval-start').disabled = running;
    $('eval-cancel').disabled = !running;
    $('eval-progress-text').textContent = `${job.id}: ${job.state}` + (job.current ? ` (${job.current})` : '') +
      ` · ${job.done}/${job.total} requests`;
    $('eval-panel').dataset.job = job.id;
    $('eval-panel').dataset.state = job.state;
  }

  function showResults(job) {
    const res = job.results;
    const tb = $('eval-results').querySelector('tbody');
    tb.textContent = '';
    for (const task of Object.keys(res.results).sort()) {
      const r = res.results[task];
      const keys = Object.keys(r).filter((k) => k !== 'alias' && !k.includes('_stderr,')).sort();
      for (const key of keys) {
        const [metric, filter] = key.split(',');
        const se = r[metric + '_stderr,' + filter];
        const tr = document.createElement('tr');
        tr.dataset.task = task;
        tr.dataset.metric = metric;
        const ns = res['n-samples'][task] || {};
        const cells = [task, metric + (filter && filter !== 'none' ? ' (' + filter + ')' : ''),
          r[key].toFixed(4), typeof se === 'number' ? se.toFixed(4) : String(se), String(res['n-shot'][task]),
          `${ns.effective} of ${ns.original}`];
        cells.forEach((c, i) => {
          const td = document.createElement('td');
          td.textContent = c;
          if (i >= 2) td.className = 'num';
          tr.appendChild(td);
        });
        tb.appendChild(tr);
      }
    }
    $('eval-results').hidden = false;
  }

  async function loadRuns() {
    let d;
    try { d = await apiJSON('/v1/console/evals'); } catch (e) { return; }
    const tb = $('eval-runs').querySelector('tbody');
    tb.textContent = '';
    const running = list(d.jobs).find((j) => j.state === 'running' || j.state === 'queued');
    if (running && (!state.job || !state.job.polling)) followJob(running.id, running);
    for (const r of list(d.runs)) {
      const tr = document.createElement('tr');
      tr.dataset.run = r.id;
      tr.dataset.kind = r.kind || '';
      const scores = [];
      for (const [task, m] of Object.entries(r.scores || {})) {
        for (const [k, v] of Object.entries(m)) scores.push(`${task} ${k.replace(',none', '')} ${v.toFixed(4)}`);
      }
      // a sweep's bench point: its headline figures
      const headline = Object.keys(r.metrics || {}).filter((k) => /tok|per_s|ttft|latency|itl/.test(k)).sort().slice(0, 6);
      for (const k of headline) scores.push(`${k} ${fmt(r.metrics[k])}`);
      const axes = r.axes ? Object.entries(r.axes).map(([k, v]) => `${k}=${Array.isArray(v) ? v.join(',') : v}`).join(' ') : '';
      const date = r.date ? new Date(r.date * 1000).toLocaleString() : '';
      const what = (r.kind && r.kind !== 'console' ? r.kind + ' · ' : '') + r.id + (axes ? ' (' + axes + ')' : '');
      const cells = [what + (date ? ' · ' + date : ''), r.state || '', r.model || '', r.limit == null ? 'all' : String(r.limit),
        scores.join(' · ') || (r.error || '')];
      for (const c of cells) {
        const td = document.createElement('td');
        td.textContent = c;
        tr.appendChild(td);
      }
      tb.appendChild(tr);
    }
  }

  // ------------------------------------------------------------------ start

  buildCharts();
  loadInfo().then(() => { loadRuns(); events(); });
})();
