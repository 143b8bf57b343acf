-- moonshard.console: the web console of `moonshard serve` (web/index.html, console.js,
-- console.css) and the routes it calls, dispatched from moonshard.openai:
--   GET  /, /<file>               the console's files from web/ (ETag, Cache-Control: no-cache)
--   GET  /v1/console/info         the model, its placement, engine sizes, the tasks, this machine
--                                 as `moonshard doctor` sees it and the mode's warnings
--   GET  /v1/console/events       server-sent events: the last 10 minutes of samples first
--                                 ("event: history"), then one sample a second
--   POST /v1/console/evals        { tasks = {...}, limit, num_fewshot, batch_size, seed } -> 202
--   GET  /v1/console/evals        the jobs of this server and the past runs of the eval folder
--   GET  /v1/console/evals/ID     one job: state, progress, results; DELETE cancels it
--
--   local console = require("moonshard.console").attach(api, { eval_dir = dir, thresholds = t })
--
-- The /v1/ routes take the API's key, body limit and error JSON. Eval jobs run through the
-- same engine as chat: moonshard.eval.run_task in a coroutine whose scoring requests are echo
-- requests (max_tokens 0, every prompt position scored) submitted beside the chat traffic; the
-- coroutine waits for them and resumes on the loop, so the engine's loop never blocks.
local cjson = require "cjson"
local uv = require "luv"
local V = require "moonshard.validate"
local http = require "moonshard.http"
local eval = require "moonshard.eval"

local M = {}

local null = cjson.null
-- lists that may be empty: moonshard.openai's encode writes its marker as []
local EMPTY = require("moonshard.openai").EMPTY
local function encode(v) return require("moonshard.openai").encode(v) end
local function send_json(res, status, v, headers)
  local h = { ["Content-Type"] = "application/json" }
  for k, x in pairs(headers or {}) do h[k] = x end
  res:send(status, h, encode(v))
end
M.HISTORY = 600 -- samples kept (10 minutes at one a second)
M.MAX_JOBS = 64  -- ended eval jobs kept in memory (the oldest beyond go; their folders stay past runs)

local function host_root()
  local ok, h = pcall(require, "moonshard.host")
  return ok and h.root or "."
end
M.WEB_DIR = host_root() .. "/web"

local TYPES = {
  html = "text/html; charset=utf-8", js = "text/javascript; charset=utf-8", css = "text/css; charset=utf-8",
  png = "image/png", svg = "image/svg+xml", json = "application/json", ico = "image/x-icon", txt = "text/plain; charset=utf-8",
}
M.TYPES = TYPES

-- nothing from elsewhere: scripts, styles, images and connections from this origin only
local CSP = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; "
  .. "frame-ancestors 'none'"

http.REASONS[304] = http.REASONS[304] or "Not Modified"
http.REASONS[202] = http.REASONS[202] or "Accepted"

-- ------------------------------------------------------------------------------ warnings

-- M.warnings(sample, th) -> list of { key, message }: the telemetry sample's values over the
-- thresholds (moonshard/console_thresholds.lua). A series that is nil (no source) is skipped.
function M.warnings(s, th)
  local out = {}
  local function warn(key, msg) out[#out + 1] = { key = key, message = msg } end
  if type(s.bubble) == "number" and s.bubble > th.bubble then
    warn("bubble", string.format("pipeline bubble %.0f%% is above %.0f%%", 100 * s.bubble, 100 * th.bubble))
  end
  if type(s.prefetch_stall_s) == "number" and s.prefetch_stall_s > th.prefetch_stall_s then
    warn("prefetch_stall", string.format("compute waited %.0f ms a second for streamed weights (above %.0f ms)",
      1000 * s.prefetch_stall_s, 1000 * th.prefetch_stall_s))
  end
  for _, r in ipairs(s.ranks or {}) do
    if type(r.age_s) == "number" and r.age_s > th.rank_silent_s then
      warn("rank_silent", string.format("rank %d has been silent for %.0f s (more than %g s)", r.rank, r.age_s,
        th.rank_silent_s))
    end
  end
  if type(s.queue) == "number" and s.queue > th.queue_length then
    warn("queue", string.format("%d sequences wait for a slot (more than %d)", s.queue, th.queue_length))
  end
  if type(s.kv_used) == "number" and type(s.kv_total) == "number" and s.kv_total > 0
    and s.kv_used / s.kv_total > th.kv_used_fraction then
    warn("kv", string.format("KV cache %d of %d blocks in use (above %.0f%%)", s.kv_used, s.kv_total,
      100 * th.kv_used_fraction))
  end
  if type(s.ttft_ms) == "number" and s.ttft_ms / 1000 > th.ttft_s then
    warn("ttft", string.format("time to first token %.1f s (above %g s)", s.ttft_ms / 1000, th.ttft_s))
  end
  return out
end

-- M.thresholds(t) -> t with the defaults' missing keys filled | nil, message naming a bad key
function M.thresholds(t)
  local defaults = require "moonshard.console_thresholds"
  local out = {}
  for k, v in pairs(t) do
    if defaults[k] == nil then return nil, string.format("unknown threshold '%s'", tostring(k)) end
    if type(v) ~= "number" or v ~= v or v < 0 then
      return nil, string.format("threshold '%s' must be a number >= 0 (got %s)", k, V.show(v))
    end
    out[k] = v
  end
  for k, v in pairs(defaults) do if out[k] == nil then out[k] = v end end
  return out
end

local function gib(b) return string.format("%.1f GiB", b / 2 ^ 30) end

-- M.mode_warnings(mode, machine, th) -> list of { key, message }: the served mode against what
-- doctor found. mode: { device, tp, pp, weight_bytes, kv_bytes, pinned_bytes }; machine:
-- { gpus = { { memory } }, islands = { { kind, gpus } }, memory = { available }, pinned = { allowed } }.
function M.mode_warnings(mode, m, th)
  local out = {}
  local function warn(key, msg) out[#out + 1] = { key = key, message = msg } end
  local need = (mode.weight_bytes or 0) + (mode.kv_bytes or 0)
  local gpus = m.gpus or {}
  local cuda = type(mode.device) == "string" and mode.device:match("^cuda") ~= nil
  if cuda and #gpus == 0 then warn("gpu", "the mode runs on " .. mode.device .. " but doctor finds no GPU") end
  if cuda and #gpus > 0 then
    local per = need / math.max(1, (mode.tp or 1) * (mode.pp or 1))
    local mem = gpus[1].memory
    if mem and mem > 0 and per > th.gpu_memory_fraction * mem then
      warn("gpu_memory", string.format("weights and KV cache need %s a GPU; the GPU has %s (over %.0f%%)", gib(per), gib(mem),
        100 * th.gpu_memory_fraction))
    end
  end
  if not cuda and m.memory and m.memory.available and need > th.host_memory_fraction * m.memory.available then
    warn("host_memory", string.format("weights and KV cache need %s of RAM; %s is available", gib(need),
      gib(m.memory.available)))
  end
  local allowed = m.pinned and m.pinned.allowed
  if (mode.pinned_bytes or 0) > 0 and allowed and mode.pinned_bytes > th.pinned_fraction * allowed then
    warn("pinned", string.format("the offload pins %s; this process may pin %s (raise RLIMIT_MEMLOCK: ulimit -l)",
      gib(mode.pinned_bytes), gib(allowed)))
  end
  if cuda and (mode.tp or 1) > 1 then
    local best = 0
    for _, isl in ipairs(m.islands or {}) do
      if isl.kind == "nvlink" then best = math.max(best, #(isl.gpus or {})) end
    end
    if best < mode.tp then
      warn("nvlink", string.format("tensor parallelism over %d GPUs, but doctor finds NVLink among at most %d: its "
        .. "all-reduces go over PCIe", mode.tp, best))
    end
  end
  return out
end

-- ------------------------------------------------------------------------------ the console

local Console = {}
Console.__index = Console

-- the bytes of the tensors a table (a stage) holds, each counted once
local function tensor_bytes(root)
  local seen, total = {}, 0
  local function walk(t, depth)
    if depth > 4 or seen[t] then return end
    seen[t] = true
    for _, v in pairs(t) do
      if type(v) == "cdata" and not seen[v] then
        seen[v] = true
        local ok, n = pcall(function() return v:nbytes() end)
        if ok and type(n) == "number" then total = total + n end
      elseif type(v) == "table" then
        walk(v, depth + 1)
      end
    end
  end
  if type(root) == "table" then walk(root, 0) end
  return total
end

local runs = require "moonshard.console_runs"
local file_exists = runs.file_exists
M.iso_time, M.eval_jobs_run, M.sweep_runs = runs.iso_time, runs.eval_jobs_run, runs.sweep_runs

local read_file = require("moonshard.jobs").read
local mkdir_p = require("moonshard.telemetry").mkdir_p

-- M.attach(api, opts) -> console; api.console is set, so api's routes dispatch to it.
--   opts.web_dir (default: web/ of the source tree), opts.eval_dir (results of eval jobs, and
--   past runs read from there), opts.data_dir / opts.tasks_dir (eval data and task files),
--   opts.thresholds (a table, default moonshard.console_thresholds), opts.mode (fields shown:
--   device, dtype, tp, pp), opts.machine (what doctor found; default: discovered on first use),
--   opts.telemetry (rank 0's moonshard.serve_telemetry probe: collectives, bubble, weight stream),
--   opts.group (moonshard.follow's group of a multi-rank serve: the followers' snapshots),
--   opts.runs_dir (more past runs: moonshard sweep and eval --jobs folders),
--   opts.interval_ms (sampling, default 1000)
function M.attach(api, opts)
  opts = opts or {}
  local self = setmetatable({
    api = api, engine = api.engine, model = api.model, opts = opts, web_dir = opts.web_dir or M.WEB_DIR,
    eval_dir = opts.eval_dir, thresholds = opts.thresholds or require("moonshard.console_thresholds"),
    history = {}, subscribers = {}, jobs = {}, job_order = {}, next_job = 0, started = os.time(),
    acc = { prefill = 0, decode = 0, steps = 0, batch = 0 }, last = nil,
  }, Console)
  api.console = self
  self.t0_unix, self.t0_hr = os.time(), uv.hrtime()
  -- the engine's steps feed the throughput and batch series (after the API's own hook)
  local prev = api.on_step
  api.on_step = function(a, info)
    prev(a, info)
    self:on_step(info)
  end
  self:start_sampling(opts.interval_ms or 1000)
  return self
end

function Console:on_step(info)
  local a = self.acc
  a.prefill = a.prefill + (info.prefill_tokens or 0)
  a.decode = a.decode + (info.decode_tokens or 0)
  a.steps = a.steps + 1
  a.batch = a.batch + (info.batch or 0)
end

function Console:close()
  if self.timer and not self.timer:is_closing() then self.timer:close() end
  self.timer = nil
  for res in pairs(self.subscribers) do
    if not res.finished and not res:closed() then res:finish() end
  end
  self.subscribers = {}
end

-- ------------------------------------------------------------------------------ facts

-- this machine as doctor sees it (once): GPUs, islands, RAM, pinned-memory limit
function Console:machine()
  if self.opts.machine then return self.opts.machine end
  if self.machine_facts then return self.machine_facts end
  local m = { gpus = {}, islands = {}, memory = {}, pinned = {} }
  local topology = require "moonshard.topology"
  local ok, topo = pcall(topology.discover, {})
  if ok and topo then
    for _, g in ipairs(topo.gpus or {}) do
      m.gpus[#m.gpus + 1] = { index = g.index, name = g.name, memory = g.memory, busid = g.busid, numa = g.numa }
    end
    for _, isl in ipairs(topo.islands or {}) do m.islands[#m.islands + 1] = { kind = isl.kind, gpus = isl.gpus, gbs = isl.gbs } end
    local n = topo.nodes and topo.nodes[1]
    if n then m.host = { hostname = n.hostname, cores = n.cores, threads = n.pus, cpu = n.cpu_model } end
    m.nvml = topo.nvml and topo.nvml.status
  end
  local mi = topology.meminfo()
  m.memory = { total = mi.MemTotal, available = mi.MemAvailable }
  local ok2, plan = pcall(require, "moonshard.plan")
  if ok2 then
    local ffi = require "ffi"
    local C = require("moonshard.core").C
    local allowed, total, memlock = ffi.new("uint64_t[1]"), ffi.new("uint64_t[1]"), ffi.new("uint64_t[1]")
    local ok3, rc = pcall(function() return C.msh_pin_limit(plan.PIN_SHARE, 1, allowed, total, memlock) end)
    if ok3 and rc == 0 then m.pinned = { allowed = tonumber(allowed[0]) } end
  end
  self.machine_facts = m
  return m
end

-- the served mode: device, dtype, parallelism, sizes
function Console:mode()
  if self.mode_facts then return self.mode_facts end
  local o, net, e = self.opts.mode or {}, self.model.net, self.engine
  local stage = net and net.stage
  local dtype = o.dtype
  if not dtype and stage and stage.embed_w then
    local ok, d = pcall(function() return stage.embed_w:dtype() end)
    dtype = ok and d or nil
  end
  local st = e:stats()
  local kv_per_block = 0
  if net and net.n_layers and net.n_kv_heads and net.head_dim then
    kv_per_block = 2 * net.n_layers * net.n_kv_heads * net.head_dim * 4 * st.block_size
  end
  local total_blocks = (st.kv_blocks_total or ((st.kv_blocks_used or 0) + (st.kv_blocks_free or 0)))
  self.mode_facts = {
    device = net and net.device or "cpu", dtype = dtype or "native", tp = o.tp or 1, pp = o.pp or 1,
    max_batch = e.max_batch, block_size = st.block_size, kv_blocks = total_blocks, max_seq = net and net.max_seq,
    weight_bytes = tensor_bytes(stage), kv_bytes = kv_per_block * total_blocks, pinned_bytes = o.pinned_bytes or 0,
    max_tokens_per_step = o.max_tokens_per_step, policy = o.policy, offload = o.offload,
  }
  return self.mode_facts
end

function Console:info()
  local model, net = self.model, self.model.net
  local tasks = eval.list_tasks(self.opts.tasks_dir and { self.opts.tasks_dir, eval.TASKS_DIR } or { eval.TASKS_DIR })
  local mode, machine = self:mode(), self:machine()
  local warnings = M.mode_warnings(mode, machine, self.thresholds)
  return {
    model = { name = self.api.name, path = tostring(model.path or ""), arch = model.desc and model.desc.arch or null,
      layers = net and net.n_layers or null, dim = net and net.dim or null, vocab = self.api.vocab,
      max_seq = mode.max_seq or null, chat_template = self.api.template ~= nil },
    placement = { device = mode.device, dtype = mode.dtype, tp = mode.tp, pp = mode.pp, world = mode.tp * mode.pp,
      weight_bytes = mode.weight_bytes, kv_bytes = mode.kv_bytes, offload = mode.offload or null },
    engine = { max_batch = mode.max_batch, max_queue = self.api.max_queue, block_size = mode.block_size,
      kv_blocks = mode.kv_blocks, max_tokens_per_step = mode.max_tokens_per_step or null, policy = mode.policy or null },
    machine = machine, warnings = #warnings > 0 and warnings or EMPTY,
    tasks = tasks, thresholds = self.thresholds, started = self.started,
    auth = self.api.opts.api_key ~= nil, eval_dir = self.eval_dir or null,
  }
end

-- ------------------------------------------------------------------------------ sampling

function Console:start_sampling(ms)
  local t = uv.new_timer()
  self.timer = t
  t:start(ms, ms, function()
    local ok, err = pcall(self.sample, self)
    if not ok then io.stderr:write("console: sample failed: " .. tostring(err) .. "\n") end
  end)
  t:unref() -- the server's listening socket keeps the loop alive, not this
end

-- The ranks' series of a sample: s.ranks = { { rank, age_s (since its last snapshot came),
-- collectives_ms = { op = ms/s }, bubble, weight_gbs, prefetch_stall_s, nvme_qd, and since the
-- previous figures: calls (runner calls that ran passes), weight_bytes }, ... } and the
-- run's figures over them (collectives_ms: the mean per rank of each kind; bubble: the mean of the
-- stages'; weight_gbs: the sum; prefetch_stall_s and nvme_qd: the largest). Rank 0's snapshot is
-- taken now; a follower's is the last it sent (moonshard.follow's stats), its rates computed on its
-- own clock between its snapshots and kept until a newer one comes.
local RANK_FIELDS = { "bubble", "weight_gbs", "prefetch_stall_s", "nvme_qd" }

function Console:rank_series(s, sources, now)
  local probe, group = self.opts.telemetry, self.opts.group
  if not probe then
    s.ranks = { { rank = 0, age_s = 0 } }
    return
  end
  local world = group and group.world or 1
  local state = self.rank_state or {}
  self.rank_state = state
  local latest = { [0] = { snap = probe:tick(), at = now } }
  for r = 1, world - 1 do latest[r] = group.stats[r] or { at = group.started or now } end
  local ranks, coll_sum, coll_n = {}, {}, {}
  local agg = { bubble = {}, weight_gbs = {}, prefetch_stall_s = {}, nvme_qd = {} }
  for r = 0, world - 1 do
    local e, st = latest[r], state[r]
    if not st then st = {}; state[r] = st end
    if e.snap and (not st.base or e.snap.t > st.base.t) then
      if st.base then st.rates = require("moonshard.serve_telemetry").rates(st.base, e.snap) or st.rates end
      st.base = e.snap
    end
    local row = { rank = r, age_s = (now - e.at) / 1e9 }
    local snap, rt = st.base, st.rates
    if row.age_s > self.thresholds.rank_silent_s then rt = nil end -- no figures from a silent rank
    if snap then
      if world > 1 then sources.collectives = true end
      if (snap.pp or 1) > 1 then sources.bubble = true end
      if snap.stream then
        sources.weight_stream, sources.prefetch = true, true
        if snap.stream.tier == "disk" then sources.nvme = true end
      end
    end
    if rt then
      if world > 1 then
        row.collectives_ms = rt.collectives_ms
        for op, v in pairs(rt.collectives_ms) do coll_sum[op], coll_n[op] = (coll_sum[op] or 0) + v, (coll_n[op] or 0) + 1 end
      end
      for _, k in ipairs(RANK_FIELDS) do
        row[k] = rt[k]
        if rt[k] then agg[k][#agg[k] + 1] = rt[k] end
      end
      row.calls, row.weight_bytes = rt.calls, rt.weight_bytes
    end
    ranks[#ranks + 1] = row
  end
  s.ranks = ranks
  if sources.collectives then
    local coll = {}
    for op, v in pairs(coll_sum) do coll[op] = v / coll_n[op] end
    s.collectives_ms = coll
  end
  local function sum(list)
    local t = 0
    for _, v in ipairs(list) do t = t + v end
    return t
  end
  if #agg.bubble > 0 then s.bubble = sum(agg.bubble) / #agg.bubble end
  if #agg.weight_gbs > 0 then s.weight_gbs = sum(agg.weight_gbs) end
  if #agg.prefetch_stall_s > 0 then s.prefetch_stall_s = math.max(unpack(agg.prefetch_stall_s)) end
  if #agg.nvme_qd > 0 then s.nvme_qd = math.max(unpack(agg.nvme_qd)) end
end

-- one sample: rates over the time since the previous one
function Console:sample()
  local now = uv.hrtime()
  local last = self.last
  local m = self.api.m
  local st = self.engine:stats()
  local acc = self.acc
  local s = { t = self.t0_unix + (now - self.t0_hr) / 1e9, queue = st.waiting, running = st.running, kv_used = st.kv_blocks_used,
    kv_total = st.kv_blocks_total or (st.kv_blocks_used + st.kv_blocks_free) }
  if last then
    local dt = (now - last.hr) / 1e9
    s.prefill_tps = acc.prefill / dt
    s.decode_tps = acc.decode / dt
    s.batch = acc.steps > 0 and acc.batch / acc.steps or 0
    s.steps = acc.steps
    local dc = m.ttft.count - last.ttft_count
    s.ttft_ms = dc > 0 and 1000 * (m.ttft.sum - last.ttft_sum) / dc or nil
    local di = m.itl.count - last.itl_count
    s.itl_ms = di > 0 and 1000 * (m.itl.sum - last.itl_sum) / di or nil
  end
  -- every rank's collectives, bubble and weight stream (moonshard.serve_telemetry), when the run has them
  local sources = { collectives = false, bubble = false, weight_stream = false, nvme = false, prefetch = false }
  self:rank_series(s, sources, now)
  s.sources = sources
  s.eval = self:job_brief()
  local w = M.warnings(s, self.thresholds)
  s.warnings = #w > 0 and w or EMPTY
  self.last = { hr = now, ttft_sum = m.ttft.sum, ttft_count = m.ttft.count, itl_sum = m.itl.sum, itl_count = m.itl.count }
  acc.prefill, acc.decode, acc.steps, acc.batch = 0, 0, 0, 0
  if not last then return end -- the first tick only starts the clock
  local h = self.history
  h[#h + 1] = s
  if #h > M.HISTORY then table.remove(h, 1) end
  self:broadcast("data: " .. encode(s) .. "\n\n")
end

-- Sends text to every events subscriber. One whose connection holds more than M.MAX_QUEUED bytes
-- not yet taken by the client (it stopped reading) is dropped and its connection closed: the
-- server would otherwise keep a sample a second for it as long as it stays connected.
M.MAX_QUEUED = 4 * 1024 * 1024
function Console:broadcast(text)
  for res in pairs(self.subscribers) do
    if res:closed() or res.finished then
      self.subscribers[res] = nil
    elseif res.conn.tcp:get_write_queue_size() > M.MAX_QUEUED then
      self.subscribers[res] = nil
      res.conn:close()
    else
      res:write(text)
    end
  end
end

function Console:events(req, res)
  res:stream(200, { ["Content-Type"] = "text/event-stream", ["Cache-Control"] = "no-cache",
    ["X-Accel-Buffering"] = "no" })
  if res.finished then return end -- (HEAD: the head alone)
  res:write("retry: 2000\n\nevent: history\ndata: " .. encode({ samples = #self.history > 0 and self.history
    or EMPTY }) .. "\n\n")
  self.subscribers[res] = true
  res:on_close(function() self.subscribers[res] = nil end)
end

-- ------------------------------------------------------------------------------ eval jobs

-- an lm (moonshard.eval's adapter shape) whose requests go through the engine; it must be
-- called from the job's coroutine, which waits while the engine scores.
local function engine_lm(self, job)
  local engine, model = self.engine, self.model
  local tok = model.tokenizer
  local lm = { tokenizer = tok, max_length = math.min(2048, model.net.max_seq - 1) }
  local function wait_all(submit_each, n)
    local co = coroutine.running()
    local left, failed = n, nil
    local function done()
      left = left - 1
      if left == 0 then
        local t = uv.new_timer() -- resumed on the loop, after the engine's step returns
        t:start(0, 0, function()
          t:close()
          self:resume(job, co)
        end)
      end
    end
    for i = 1, n do
      local q, err = submit_each(i, function(reason, q)
        job.live[q] = nil
        if reason == "cancelled" or reason == "error" then failed = failed or (q.error or reason) end
        done()
      end)
      if not q then
        for r in pairs(job.live) do engine:cancel(r) end
        error(err, 0)
      end
      job.live[q] = true
    end
    coroutine.yield()
    if job.cancelled then error("cancelled", 0) end
    if failed then error("a scoring request ended: " .. tostring(failed), 0) end
  end
  function lm.score_batch(reqs)
    local out = {}
    wait_all(function(i, fin)
      local r = reqs[i]
      return engine:submit { prompt_ids = r.ids, max_tokens = 0, echo = true, logprobs = 1, temperature = 0,
        on_finish = function(q, reason)
          if reason ~= "cancelled" and reason ~= "error" then
            local sum, greedy, lps, gr = 0, true, {}, {}
            for k = r.first + 1, #r.ids do
              local lp = q.prompt_logprobs[k]
              local top = q.prompt_top_logprobs[k]
              local g = top and top[1] and top[1].id == r.ids[k] or false
              lps[#lps + 1], gr[#gr + 1] = lp, g
              sum = sum + lp
              greedy = greedy and g
            end
            out[i] = { logprobs = lps, greedy = gr, sum = sum, is_greedy = greedy }
          end
          fin(reason, q)
        end }
    end, #reqs)
    job.tokens = (job.tokens or 0)
    for _, r in ipairs(reqs) do job.tokens = job.tokens + #r.ids end
    return out
  end
  function lm.generate(context, stops, max_new, o)
    local ids = eval.generation_ids(tok, context, max_new, engine.max_len, o)
    local st = {}
    for _, s in ipairs(stops or {}) do if s ~= "" then st[#st + 1] = s end end
    local text, n = "", 0
    wait_all(function(_, fin)
      return engine:submit { prompt_ids = ids, max_tokens = max_new, temperature = 0, stop = #st > 0 and st or nil,
        on_finish = function(q, reason)
          text, n = q.text, #q.output_ids
          fin(reason, q)
        end }
    end, 1)
    return text, #ids + n
  end
  return lm
end

function Console:resume(job, co)
  if coroutine.status(co) ~= "suspended" then return end
  local ok, err = coroutine.resume(co)
  if not ok then self:job_failed(job, err) end
end

function Console:job_failed(job, err)
  if job.state ~= "running" and job.state ~= "queued" then return end -- (ended already: cancelled)
  for r in pairs(job.live) do
    job.live[r] = nil
    if not r.finish_reason then self.engine:cancel(r) end
  end
  if job.cancelled then
    job.state, job.error = "cancelled", null
  else
    job.state, job.error = "failed", tostring(err)
    io.stderr:write(string.format("console: eval %s failed: %s\n", job.id, tostring(err)))
  end
  job.finished = os.time()
  self:write_descriptor(job)
  self:retire(job)
  self:next_queued()
end

-- An ended job: its documents and coroutine go (the view keeps names, figures and results), and
-- of the ended jobs only the last M.MAX_JOBS stay listed (a long-running server takes many).
function Console:retire(job)
  job.tasks, job.co = nil, nil
  local ended = 0
  for i = #self.job_order, 1, -1 do
    local id = self.job_order[i]
    local st = self.jobs[id].state
    if st ~= "queued" and st ~= "running" then
      ended = ended + 1
      if ended > M.MAX_JOBS then
        self.jobs[id] = nil
        table.remove(self.job_order, i)
      end
    end
  end
end

function Console:job_brief()
  local j = self.running
  if not j then return nil end
  return { id = j.id, state = j.state, done = j.done, total = j.total, task = j.current }
end

local function job_view(job)
  return { id = job.id, state = job.state, tasks = job.task_names, limit = job.limit or null,
    num_fewshot = job.num_fewshot or null, batch_size = job.batch_size, created = job.created,
    started = job.started or null, finished = job.finished or null, done = job.done, total = job.total,
    current = job.current or null, error = job.error or null, results = job.results or null,
    markdown = job.markdown or null, dir = job.dir or null }
end

function Console:write_descriptor(job)
  if not job.dir then return end
  local f = io.open(job.dir .. "/eval.json", "wb")
  if not f then return end
  local v = job_view(job)
  v.results, v.markdown = nil, nil
  v.model = self.api.name
  f:write(encode(v), "\n")
  f:close()
end

function Console:run_job(job)
  self.running = job
  job.state, job.started = "running", os.time()
  self:write_descriptor(job)
  local co = coroutine.create(function()
    local lm = engine_lm(self, job)
    local runs = {}
    local t0 = uv.hrtime()
    for ti, tk in ipairs(job.tasks) do
      job.current = tk.task.name
      local base = job.done
      local run = eval.run_task(lm, tk.task, tk.docs, {
        num_fewshot = job.num_fewshot, seed = job.seed, batch_size = job.batch_size, quiet = true,
        on_progress = function(done, total)
          if total ~= tk.requests then -- rolling windows are known once the task's requests are made
            job.total, tk.requests = job.total + total - tk.requests, total
          end
          job.done = base + done
        end,
      })
      job.done = base + tk.requests
      run.task, run.original, run.data_path = tk.task, tk.original, tk.path
      runs[ti] = run
    end
    local mode = self:mode()
    local res = eval.results_json(runs, {
      config = { model = "moonshard", model_args = "model=" .. tostring(self.model.path), model_path = tostring(self.model.path),
        placement = { device = mode.device, tp = mode.tp, pp = mode.pp, dtype = mode.dtype, via = "serve" },
        batch_size = job.batch_size, limit = job.limit, seed = job.seed },
      date = os.time(), total_evaluation_time_seconds = string.format("%.2f", (uv.hrtime() - t0) / 1e9),
    })
    job.results, job.markdown = res, eval.markdown(res)
    job.state, job.finished, job.current = "done", os.time(), nil
    if job.dir then
      local f = io.open(job.dir .. "/results.json", "wb")
      if f then f:write(eval.encode_json(res), "\n") f:close() end
    end
    self:write_descriptor(job)
    self:retire(job)
    self:next_queued()
  end)
  job.co = co
  local ok, err = coroutine.resume(co)
  if not ok then return self:job_failed(job, err) end
end

function Console:next_queued()
  if self.running and (self.running.state == "running") then return end
  self.running = nil
  for _, id in ipairs(self.job_order) do
    local j = self.jobs[id]
    if j.state == "queued" then
      local t = uv.new_timer()
      t:start(0, 0, function()
        t:close()
        if j.state == "queued" then self:run_job(j) end
      end)
      return
    end
  end
end

local function api_error(status, msg, param, code)
  require("moonshard.openai").api_error(status, msg, param, code)
end

-- a field of a JSON body through moonshard.validate; a bad one is a 400 naming it
local function field(body, key, spec)
  local ok, v = pcall(V.field, body, key, spec)
  if not ok then api_error(400, tostring(v), key) end
  return v
end

local EVAL_FIELDS = { tasks = true, limit = true, num_fewshot = true, batch_size = true, seed = true }

function Console:start_eval(req, res)
  local ok, body = pcall(cjson.decode, req.body)
  if not ok or type(body) ~= "table" or (next(body) ~= nil and rawget(body, 1) ~= nil) then
    api_error(400, "the body must be a JSON object (" .. (ok and V.show(body) or "not valid JSON") .. ")")
  end
  for k in pairs(body) do
    if not EVAL_FIELDS[k] then
      api_error(400, string.format("unknown field '%s' (tasks, limit, num_fewshot, batch_size, seed)", tostring(k)), tostring(k))
    end
  end
  local names = field(body, "tasks", { type = "list", min = 1, max = 16, required = true, elem = { type = "string", min = 1 } })
  local limit = field(body, "limit", { type = "int", min = 1, max = 100000 })
  local k = field(body, "num_fewshot", { type = "int", min = 0, max = 25 })
  local max_bs = math.max(1, self.engine.max_batch)
  local bs = field(body, "batch_size", { type = "int", min = 1, max = max_bs,
    default = math.max(1, math.floor(max_bs / 2)) })
  local seed = field(body, "seed", { type = "int", min = 0, max = 2 ^ 31 - 1, default = 1234 })
  local tasks, seen = {}, {}
  for i, name in ipairs(names) do
    if seen[name] then api_error(400, string.format("field 'tasks' names '%s' twice", name), "tasks") end
    seen[name] = true
    local t, err = eval.load_task(name, { tasks_dir = self.opts.tasks_dir })
    if not t then api_error(400, string.format("field 'tasks'[%d]: %s", i - 1, err), "tasks") end
    local docs, derr, path = eval.docs(t, { data_dir = self.opts.data_dir })
    if not docs then api_error(400, string.format("task '%s': %s", name, derr), "tasks") end
    local original = #docs
    if limit and #docs > limit then
      local cut = {}
      for j = 1, limit do cut[j] = docs[j] end
      docs = cut
    end
    -- the progress unit is a scoring request (a document under generate_until)
    local n = 0
    if t.output_type == "multiple_choice" then
      for _, d in ipairs(docs) do n = n + #t.doc_to_choice(d) end
    elseif t.output_type == "loglikelihood" or t.output_type == "generate_until" then
      n = #docs
    else
      n = #docs -- rolling windows: counted once the requests are made
    end
    tasks[#tasks + 1] = { task = t, docs = docs, original = original, path = path, requests = n }
  end
  self.next_job = self.next_job + 1
  local id = string.format("eval-%s-%d", os.date("!%Y%m%dT%H%M%S"), self.next_job)
  local total = 0
  for _, tk in ipairs(tasks) do total = total + tk.requests end
  local job = { id = id, state = "queued", tasks = tasks, task_names = names, limit = limit, num_fewshot = k,
    batch_size = bs, seed = seed, created = os.time(), done = 0, total = total, live = {} }
  if self.eval_dir then
    local dir = self.eval_dir .. "/" .. id
    local okd, derr = mkdir_p(dir)
    if not okd then api_error(500, string.format("cannot make the eval folder %s: %s", dir, tostring(derr))) end
    job.dir = dir
  end
  self.jobs[id] = job
  self.job_order[#self.job_order + 1] = id
  self:write_descriptor(job)
  if not self.running then self:run_job(job) end
  send_json(res, 202, job_view(job), { Location = "/v1/console/evals/" .. id })
end

-- the past runs (moonshard.console_runs), less the jobs of this server still queued or running
function Console:past_runs()
  return runs.past_runs(self.eval_dir, self.opts.runs_dir, function(id)
    local j = self.jobs[id]
    return j and (j.state == "running" or j.state == "queued")
  end)
end

function Console:cancel_job(job)
  if job.state ~= "running" and job.state ~= "queued" then return end
  job.cancelled = true
  if job.state == "queued" then
    job.state, job.finished = "cancelled", os.time()
    self:write_descriptor(job)
    self:retire(job)
    return
  end
  for r in pairs(job.live) do
    job.live[r] = nil
    if not r.finish_reason then self.engine:cancel(r) end
  end
  self:job_failed(job, "cancelled")
end

-- ------------------------------------------------------------------------------ routes

-- the path's file in web/: one name of letters, digits, '.', '_' and '-' (no folders)
function Console:static(req, res, path)
  local raw = path
  local decoded = raw:gsub("%%(%x%x)", function(x) return string.char(tonumber(x, 16)) end)
  if decoded:find("..", 1, true) or decoded:find("\\", 1, true) or decoded:find("%z") then
    api_error(400, string.format("the path '%s' leaves the console's folder", raw), nil, "bad_path")
  end
  local name = decoded == "/" and "index.html" or decoded:match("^/([%w_%-][%w_%-%.]*)$")
  local ext = name and name:match("%.(%w+)$")
  local ctype = ext and TYPES[ext:lower()]
  if not name or not ctype then api_error(404, string.format("no route %s %s", req.method, raw), nil, "not_found") end
  local file = self.web_dir .. "/" .. name
  local ok, st = file_exists(file)
  if not ok then api_error(404, string.format("no route %s %s", req.method, raw), nil, "not_found") end
  local etag = string.format('"%x-%x%09d"', st.size, st.mtime.sec, st.mtime.nsec)
  local headers = { ["Content-Type"] = ctype, ETag = etag, ["Cache-Control"] = "no-cache",
    ["X-Content-Type-Options"] = "nosniff" }
  if ctype:find("text/html", 1, true) then headers["Content-Security-Policy"] = CSP end
  local inm = req.headers["if-none-match"]
  if inm and (inm == etag or inm == "*" or inm:find(etag, 1, true)) then return res:send(304, headers, "") end
  local body = read_file(file)
  if not body then api_error(404, string.format("no route %s %s", req.method, raw), nil, "not_found") end
  res:send(200, headers, body) -- (to HEAD: the headers and the file's length, no body)
end

local CONSOLE_ROUTES = {
  ["/v1/console/info"] = { GET = "info" },
  ["/v1/console/events"] = { GET = "events" },
  ["/v1/console/evals"] = { GET = "list_evals", POST = "start_eval" },
}

-- console:owns(path) -> true when the path is the console's
function Console:owns(path, method)
  if path:match("^/v1/console/") or path == "/v1/console" then return true end
  if path:match("^/v1/") or path == "/health" or path == "/metrics" then return false end
  return method == "GET" or method == "HEAD"
end

function Console:route(req, res, path)
  if not path:match("^/v1/") then return self:static(req, res, path) end
  self.api:check_auth(req)
  local methods = CONSOLE_ROUTES[path]
  local job_id
  if not methods then
    job_id = path:match("^/v1/console/evals/([%w_%-]+)$")
    if job_id then methods = { GET = "get_eval", DELETE = "cancel_eval" } end
  end
  if not methods then api_error(404, string.format("no route %s %s", req.method, path), nil, "not_found") end
  local m = req.method == "HEAD" and "GET" or req.method
  local action = methods[m]
  if not action then
    local allow = {}
    for k in pairs(methods) do allow[#allow + 1] = k end
    table.sort(allow)
    require("moonshard.openai").api_error(405, string.format("%s takes %s, not %s", path, table.concat(allow, ", "),
      req.method), nil, "method_not_allowed", nil, { Allow = table.concat(allow, ", ") })
  end
  if action == "info" then return send_json(res, 200, self:info()) end
  if action == "events" then return self:events(req, res) end
  if action == "start_eval" then return self:start_eval(req, res) end
  if action == "list_evals" then
    local jobs = {}
    for i = #self.job_order, 1, -1 do
      local v = job_view(self.jobs[self.job_order[i]])
      v.results, v.markdown = nil, nil
      jobs[#jobs + 1] = v
    end
    return send_json(res, 200, { jobs = #jobs > 0 and jobs or EMPTY,
      runs = (function() local r = self:past_runs() return #r > 0 and r or EMPTY end)() })
  end
  local job = self.jobs[job_id]
  if not job then api_error(404, string.format("no eval job '%s'", job_id), nil, "not_found") end
  if action == "cancel_eval" then self:cancel_job(job) end
  return send_json(res, 200, job_view(job))
end

return M
