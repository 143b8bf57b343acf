-- moonshard.serve_telemetry: what one rank of `moonshard serve` measures for the web console and
-- its log folder: collective time by kind (its tensor- and pipeline-parallel communicators), its
-- pipeline stage's busy and idle time inside each runner call, and the weights it streams
-- (--cpu-offload / --disk-offload: bytes, time compute waited for them, disk reads queued).
--
--   local st = require "moonshard.serve_telemetry"
--   local probe = st.attach(model.net, { rank = 0, world = 2, dir = os.getenv("MSH_LOG_DIR"), meta = {...} })
--   local snap = probe:tick()          -- cumulative figures now (and a "sample" line in rank<R>.jsonl)
--   local r = st.rates(prev, snap)     -- per-second figures between two snapshots
--   probe:close()
--
-- Every rank attaches its own probe before moonshard.follow starts (the runner is still its own):
-- rank 0's console ticks it once a second, a follower ticks it once a second and sends the
-- snapshot to rank 0 over the call channel (moonshard.follow's stats messages). A snapshot is plain
-- data (it travels in that channel's encoding) and cumulative, so a late or lost one costs nothing.
--
-- Pipeline bubble: a stage's idle share of the time inside the runner calls that make passes
-- (step, forward_slot, forward_blocks, ...): each such call is a measured window of the stage
-- probe (moonshard.telemetry), so waiting for the other stages counts and the server's idle time
-- between requests does not.
local uv = require "luv"
local telemetry = require "moonshard.telemetry"

local M = {}

-- the runner methods that run passes of the model (each call is one bubble window)
M.PASSES = { "step", "step_paged", "forward", "forward_batch", "forward_slot", "forward_blocks", "forward_hidden" }

local Probe = {}
Probe.__index = Probe

-- M.attach(runner, opts) -> probe | nil, message
--   opts.rank, opts.world, opts.dir (a log folder: rank<R>.jsonl with a sample a second; nil: none
--   written), opts.meta (fields of the file's "open" event)
function M.attach(runner, opts)
  opts = opts or {}
  local rank = opts.rank or 0
  local tel, err
  if opts.dir and opts.dir ~= "" then
    tel, err = telemetry.open(opts.dir, { rank = rank, world = opts.world, meta = opts.meta, detail = false })
    if not tel then return nil, err end
  else
    tel = telemetry.null { rank = rank }
  end
  runner:observe(tel)
  local self = setmetatable({ tel = tel, runner = runner, rank = rank, world = opts.world or 1,
    pp = runner.pp_size or 1, stage_probe = runner.hooks and runner.hooks.probe,
    busy = 0, idle = 0, calls = 0, depth = 0 }, Probe)
  local stage = runner.stage
  self.streaming = type(stage) == "table" and stage.streaming and stage or nil
  -- each pass-making call is a window of the stage probe; nested calls belong to the outer one
  for _, name in ipairs(M.PASSES) do
    local f = runner[name]
    if type(f) == "function" then
      runner[name] = function(r, ...)
        if self.depth > 0 then return f(r, ...) end
        return self:window(f, r, ...)
      end
    end
  end
  return self
end

local function pack(...) return { n = select("#", ...), ... } end

function Probe:window(f, r, ...)
  local sp = self.stage_probe
  self.depth = 1
  if sp then sp:window_begin() end
  local res = pack(pcall(f, r, ...))
  self.depth = 0
  if sp then
    sp:window_end()
    self.busy, self.idle = self.busy + sp.busy, self.idle + sp.idle
  end
  self.calls = self.calls + 1
  if not res[1] then error(res[2], 0) end
  return unpack(res, 2, res.n)
end

-- probe:snapshot() -> { rank, t (seconds, this rank's monotonic clock), calls, busy_s, idle_s, pp,
--   coll = { op = { calls, bytes, seconds } }, stream = { tier, bytes, wait_s, fetches, read_bytes,
--   queued_sum, queued_n, max_in_flight, first_layer, layer_wait_s[i], layer_bytes[i] (the fetch
--   waits and bytes of layer first_layer + i - 1) } (streaming stages only) }, all cumulative
function Probe:snapshot()
  self.tel:poll()
  local coll = {}
  for op, t in pairs(self.tel.totals) do coll[op] = { calls = t.calls, bytes = t.bytes, seconds = t.seconds } end
  local s = { rank = self.rank, t = uv.hrtime() / 1e9, calls = self.calls, busy_s = self.busy, idle_s = self.idle,
    pp = self.pp, coll = coll }
  local stage = self.streaming
  if stage then
    local st = stage:stats()
    s.stream = { tier = st.tier, bytes = st.bytes + (st.gathered or 0), wait_s = st.wait_s, fetches = st.fetches,
      read_bytes = st.read_bytes, queued_sum = st.queued_sum, queued_n = st.queued_n, max_in_flight = st.max_in_flight,
      first_layer = stage.first - 1, layer_wait_s = {}, layer_bytes = {} }
    for l = stage.first, stage.last do -- per layer of the stage, from first_layer (counted from 0)
      s.stream.layer_wait_s[#s.stream.layer_wait_s + 1] = st.layer_wait[l] or 0
      s.stream.layer_bytes[#s.stream.layer_bytes + 1] = st.layer_fetched[l] or 0
    end
  end
  return s
end

-- probe:tick() -> snapshot, also written as a "sample" line to the rank's JSONL (when it has one)
function Probe:tick()
  local s = self:snapshot()
  if self.tel.path then
    self.tel:event("sample", { calls = s.calls, busy_s = s.busy_s, idle_s = s.idle_s, collectives = next(s.coll) and s.coll or nil,
      stream = s.stream }, s.t)
    self.tel.file:flush()
  end
  return s
end

function Probe:close()
  if self.closed then return end
  self.closed = true
  -- the stage's figures over every runner call (the probe's own are its last window's)
  local total = self.busy + self.idle
  local bubble = self.pp > 1 and total > 0 and self.idle / total or require("cjson").null
  self.tel:close { calls = self.calls, busy_s = self.busy, idle_s = self.idle, bubble = bubble,
    stages = { { stage = self.runner.pp_rank or 0, calls = self.calls, busy_s = self.busy, idle_s = self.idle, bubble = bubble } } }
end

-- M.rates(a, b) -> the per-second figures of a rank between snapshots a and b (b later):
--   { collectives_ms = { op = ms of that kind per second }, bubble (idle share of the stage's time in
--   runner calls; nil without a pipeline or without calls), weight_gbs (and weight_bytes between
--   the two), prefetch_stall_s (seconds a
--   second compute waited in acquire), nvme_qd (disk reads queued, mean over the fetches), calls }
function M.rates(a, b)
  local dt = b.t - a.t
  if not (dt > 0) then return nil end
  local r = { collectives_ms = {}, calls = b.calls - a.calls }
  for op, c in pairs(b.coll or {}) do
    local p = a.coll and a.coll[op]
    r.collectives_ms[op] = 1000 * (c.seconds - (p and p.seconds or 0)) / dt
  end
  if (b.pp or 1) > 1 then
    local busy, idle = b.busy_s - a.busy_s, b.idle_s - a.idle_s
    if busy + idle > 0 then r.bubble = idle / (busy + idle) end
  end
  local sa, sb = a.stream, b.stream
  if sb then
    sa = sa or {}
    r.weight_bytes = (sb.bytes or 0) - (sa.bytes or 0)
    r.weight_gbs = r.weight_bytes / dt / 1e9
    r.prefetch_stall_s = ((sb.wait_s or 0) - (sa.wait_s or 0)) / dt
    if sb.tier == "disk" then
      local n = (sb.queued_n or 0) - (sa.queued_n or 0)
      r.nvme_qd = n > 0 and ((sb.queued_sum or 0) - (sa.queued_sum or 0)) / n or 0
    end
  end
  return r
end

M.Probe = Probe
return M
