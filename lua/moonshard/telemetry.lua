-- moonshard.telemetry: JSON Lines events of one rank, and the figures drawn from them.
--
--   local telemetry = require "moonshard.telemetry"
--   local tel = assert(telemetry.open(dir, { rank = 0, world = 2, meta = { script = "bench" } }))
--   tel:watch(tp_comm, "tp")         -- every collective on it becomes an event
--   model.hooks = tel:stage_hooks(device, stage_index)   -- busy/idle of this pipeline stage
--   ... run ...
--   tel:poll()                       -- drains what the devices have finished (never waits)
--   local s = tel:summary()          -- collective time by op, busy, idle, bubble
--   tel:close()                      -- waits for pending timings, writes the summary
--
-- The file is <dir>/rank<R>.jsonl: one JSON object a line, each with "t" (CLOCK_MONOTONIC
-- seconds, the clock of uv.hrtime(), shared by the ranks of one host), "rank" and "event":
--   open        unix time and the monotonic time at opening, world size, caller's meta fields
--   collective  group, op, bytes, peer (-1: none), seconds (device time of NCCL calls, host
--               time inside TCP calls), device (true when timed by CUDA events)
--   stage       one forward pass of this stage: stage, tokens, busy_s (its compute, timed on its
--               device from after its input arrived to before its output leaves), idle_s (the
--               gap since the previous pass ended; absent for the first of a window), mb
--   step        whatever the caller reports (tel:event("step", fields))
--   summary     the summary below, at close
-- Bubble: idle / (busy + idle) over the measured window of a stage: from window_begin() (or
-- the first pass) to window_end() (or the last pass).
--
-- Nothing here waits for a device on the way: device timers and collective records are read
-- once the device has reached them (poll), and close() waits for the rest.
local core = require "moonshard.core"
local cjson = require "cjson"
local uv = require "luv"

local ffi, C = core.ffi, core.C

local M = {}

-- ------------------------------------------------------------------------------- timers

local out_timer = ffi.new("msh_timer*[1]")
local secs_out = ffi.new("double[1]")

-- M.timer(device?) -> a device timer ("cpu" or "cuda[:i]") | nil, message
function M.timer(device)
  local kind, index = require("moonshard.tensor").device_id(device or "cpu")
  local ok, msg, code = core.try(C.msh_timer_new(out_timer, kind, index))
  if not ok then return nil, msg, code end
  return ffi.gc(out_timer[0], C.msh_timer_free)
end

-- M.elapsed(a, b, wait?) -> seconds from a to b, or nil while the device has not reached them
function M.elapsed(a, b, wait)
  core.check(C.msh_timer_elapsed(a, b, wait and 1 or 0, secs_out), 2)
  local s = secs_out[0]
  if s < 0 and not wait then return nil end
  return s
end

-- ----------------------------------------------------------------------------- helpers

local function mkdir_p(path)
  local sofar = path:sub(1, 1) == "/" and "/" or ""
  for part in path:gmatch("[^/]+") do
    sofar = sofar .. part
    local st = uv.fs_stat(sofar)
    if not st then
      local ok, err = uv.fs_mkdir(sofar, 493) -- 0755
      if not ok and not (err or ""):match("^EEXIST") then return nil, err end
    elseif st.type ~= "directory" then
      return nil, sofar .. " is not a directory"
    end
    sofar = sofar .. "/"
  end
  return true
end
M.mkdir_p = mkdir_p

local function now() return uv.hrtime() / 1e9 end

-- ----------------------------------------------------------------------------- recorder

local Recorder = {}
Recorder.__index = Recorder

-- M.open(dir, opts?) -> recorder | nil, message. Creates dir when missing and (over)writes
-- <dir>/rank<R>.jsonl. opts.rank (default: RANK or 0), opts.world, opts.meta (fields of the
-- "open" event), opts.detail (false: no line per collective or per stage pass, only their totals
-- and the caller's events: a long-running server writes a sample a second instead).
function M.open(dir, opts)
  opts = opts or {}
  if type(dir) ~= "string" or dir == "" then error("telemetry.open: a directory is required", 2) end
  local rank = opts.rank or tonumber(os.getenv("RANK") or "") or 0
  local ok, err = mkdir_p(dir)
  if not ok then return nil, string.format("log folder '%s': %s", dir, tostring(err)) end
  local path = string.format("%s/rank%d.jsonl", dir, rank)
  local f, ferr = io.open(path, "w")
  if not f then return nil, string.format("cannot write %s: %s", path, tostring(ferr)) end
  local self = setmetatable({
    dir = dir, path = path, file = f, rank = rank, comms = {}, stages = {},
    totals = {}, line = { rank = rank }, detail = opts.detail ~= false,
  }, Recorder)
  local open = { unix = os.time(), world = opts.world }
  for k, v in pairs(opts.meta or {}) do open[k] = v end
  self:event("open", open)
  return self
end

-- M.null(opts?) -> a recorder that keeps figures (summary, stage probes) but writes no file
function M.null(opts)
  opts = opts or {}
  return setmetatable({ dir = nil, path = nil, file = { write = function() end, close = function() end },
    rank = opts.rank or 0, comms = {}, stages = {}, totals = {}, line = { rank = opts.rank or 0 }, detail = false }, Recorder)
end

-- M.from_env(opts?) -> recorder when opts.dir or MSH_LOG_DIR names a folder, else nil.
function M.from_env(opts)
  opts = opts or {}
  local dir = opts.dir or os.getenv("MSH_LOG_DIR")
  if not dir or dir == "" then return nil end
  return M.open(dir, opts)
end

-- tel:event(name, fields?) writes one line {"t", "rank", "event", fields...}.
function Recorder:event(name, fields, t)
  local line = fields or {}
  line.t = t or now()
  line.rank = self.rank
  line.event = name
  self.file:write(cjson.encode(line), "\n")
end

-- tel:watch(comm, group) records every collective on comm (a ring of `capacity` records,
-- default 4096, drained by poll).
function Recorder:watch(comm, group, capacity)
  if not comm then return self end
  assert(comm:set_events(capacity or 4096))
  self.comms[#self.comms + 1] = { comm = comm, group = group or "world" }
  return self
end

-- the collective line and the running totals (reused: no table per record)
local function collective_writer(self, group)
  local line = { event = "collective", rank = self.rank, group = group }
  local totals = self.totals
  local detail = self.detail
  return function(op, bytes, peer, t, seconds, on_device)
    if detail then
      line.t, line.op, line.bytes, line.peer, line.seconds, line.device = t, op, bytes, peer, seconds, on_device
      self.file:write(cjson.encode(line), "\n")
    end
    local tot = totals[op]
    if not tot then
      tot = { calls = 0, bytes = 0, seconds = 0 }
      totals[op] = tot
    end
    tot.calls, tot.bytes, tot.seconds = tot.calls + 1, tot.bytes + bytes, tot.seconds + seconds
  end
end

-- ---------------------------------------------------------------------------- stages

local Stage = {}
Stage.__index = Stage

local RING = 64

-- tel:stage(device, index?) -> a stage probe: probe:begin(tokens, mb) before a pass's compute and
-- probe:finish() after it; probe:window_begin() / window_end() bound the measured window.
function Recorder:stage(device, index)
  local st = setmetatable({
    tel = self, device = device or "cpu", index = index or 0,
    starts = {}, ends = {}, tokens = {}, mbs = {}, hosts = {},
    head = 0, tail = 0, -- passes [tail, head) are recorded but not yet read
    busy = 0, idle = 0, passes = 0, prev_end = nil, open = false,
    line = { event = "stage", rank = self.rank, stage = index or 0 },
  }, Stage)
  for i = 0, RING - 1 do
    st.starts[i] = assert(M.timer(st.device))
    st.ends[i] = assert(M.timer(st.device))
  end
  st.w0, st.w1 = assert(M.timer(st.device)), assert(M.timer(st.device))
  self.stages[#self.stages + 1] = st
  return st
end

-- hooks for a model (model.hooks): begin(model, tokens, mb) before a pass's compute (its input
-- has arrived) and finish(model) after it (before its output leaves); finish also polls.
function Recorder:stage_hooks(device, index)
  local st = self:stage(device, index)
  return {
    probe = st,
    begin = function(model, tokens) st:begin(tokens, model.mb) end,
    finish = function()
      if st:finish() then self:poll() end
    end,
  }
end

-- (a pass whose start cannot be recorded, one being captured into a CUDA graph, is not counted)
function Stage:begin(tokens, mb)
  if self.head - self.tail >= RING - 1 then self:resolve(true, 1) end -- keep the previous end alive
  local i = self.head % RING
  self.running = C.msh_timer_record(self.starts[i]) == 0
  self.tokens[i], self.mbs[i], self.hosts[i] = tokens or 0, mb, now()
end

function Stage:finish()
  if not self.running then return false end
  self.running = false
  if C.msh_timer_record(self.ends[self.head % RING]) ~= 0 then return false end
  self.head = self.head + 1
  return true
end

-- Starts the measured window here: idle time counts from this point.
function Stage:window_begin()
  self:resolve(true)
  C.msh_timer_record(self.w0)
  self.open, self.closed = true, false
  self.busy, self.idle, self.passes, self.window = 0, 0, 0, nil
  self.prev_end = self.w0
end

-- Ends the measured window here (idle after the last pass counts).
function Stage:window_end()
  C.msh_timer_record(self.w1)
  self:resolve(true)
  if self.open and self.prev_end then
    self.idle = self.idle + M.elapsed(self.prev_end, self.w1, true)
    self.window = M.elapsed(self.w0, self.w1, true)
  end
  self.open, self.closed = false, true
  self.prev_end = nil
end

-- Reads finished passes (all of them with wait, else those the device has reached; at most
-- `limit`), writing their lines.
function Stage:resolve(wait, limit)
  local line = self.line
  while self.tail < self.head and (not limit or limit > 0) do
    local i = self.tail % RING
    local busy = M.elapsed(self.starts[i], self.ends[i], wait)
    if not busy then break end
    local gap = self.prev_end and M.elapsed(self.prev_end, self.starts[i], true) or nil
    if self.tel.detail then
      line.t, line.tokens, line.mb, line.busy_s, line.idle_s = self.hosts[i], self.tokens[i], self.mbs[i], busy, gap
      self.tel.file:write(cjson.encode(line), "\n")
    end
    self.busy = self.busy + busy
    if gap then self.idle = self.idle + math.max(gap, 0) end
    self.passes = self.passes + 1
    -- the end timer stays untouched until the ring comes round (begin keeps one slot free)
    self.prev_end = self.ends[i]
    self.tail = self.tail + 1
    if limit then limit = limit - 1 end
  end
end

function Stage:summary()
  local total = self.busy + self.idle
  return {
    stage = self.index, passes = self.passes, busy_s = self.busy, idle_s = self.idle,
    bubble = total > 0 and self.idle / total or nil,
  }
end

-- -------------------------------------------------------------------------- draining

-- tel:poll(wait?) writes the events the devices have finished (all pending ones with wait).
function Recorder:poll(wait)
  for _, w in ipairs(self.comms) do
    w.writer = w.writer or collective_writer(self, w.group)
    local _, dropped = w.comm:drain_events(w.writer, wait)
    if dropped > 0 then
      self.dropped = (self.dropped or 0) + dropped
      self:event("dropped", { group = w.group, records = dropped })
    end
  end
  for _, st in ipairs(self.stages) do st:resolve(wait) end
end

-- tel:summary() -> {
--   collectives = { all_reduce = { calls, bytes, seconds }, ... }, collective_s,
--   stages = { { stage, passes, busy_s, idle_s, bubble }, ... }, busy_s, idle_s, bubble }
-- over what poll() has read so far (call poll(true) first for everything).
function Recorder:summary()
  local s = { collectives = {}, collective_s = 0, stages = {}, busy_s = 0, idle_s = 0, dropped = self.dropped }
  for op, tot in pairs(self.totals) do
    s.collectives[op] = { calls = tot.calls, bytes = tot.bytes, seconds = tot.seconds }
    s.collective_s = s.collective_s + tot.seconds
  end
  for i, st in ipairs(self.stages) do
    local ss = st:summary()
    s.stages[i] = ss
    s.busy_s, s.idle_s = s.busy_s + ss.busy_s, s.idle_s + ss.idle_s
  end
  local total = s.busy_s + s.idle_s
  s.bubble = total > 0 and s.idle_s / total or nil
  return s
end

-- Zeroes the collective totals (the lines already written stay).
function Recorder:reset_totals()
  self.totals = {}
  for _, w in ipairs(self.comms) do w.writer = nil end
end

-- tel:close(extra?) waits for pending timings, writes the summary (with extra's fields) and
-- closes the file. Communicators stop recording.
function Recorder:close(extra)
  if not self.file then return end
  self:poll(true)
  local s = self:summary()
  for k, v in pairs(extra or {}) do s[k] = v end
  if next(s.collectives) == nil then s.collectives = nil end
  if #s.stages == 0 then s.stages = nil end
  self:event("summary", s)
  for _, w in ipairs(self.comms) do pcall(w.comm.set_events, w.comm, 0) end
  self.comms = {}
  self.file:close()
  self.file = nil
end

-- ------------------------------------------------------------------------------ reading

-- M.read(path) -> array of events | nil, message (a malformed line names its number)
function M.read(path)
  local f, err = io.open(path, "r")
  if not f then return nil, err end
  local out, n = {}, 0
  for line in f:lines() do
    n = n + 1
    local ok, ev = pcall(cjson.decode, line)
    if not ok then
      f:close()
      return nil, string.format("%s:%d: %s", path, n, tostring(ev))
    end
    out[#out + 1] = ev
  end
  f:close()
  return out
end

-- M.bubble(stages) -> idle / (busy + idle) summed over stage summaries
function M.bubble(stages)
  local busy, idle = 0, 0
  for _, s in ipairs(stages) do busy, idle = busy + s.busy_s, idle + s.idle_s end
  return busy + idle > 0 and idle / (busy + idle) or nil
end

-- M.gpipe_bound(p, m) -> (p - 1) / (m + p - 1), the bubble of a fill-and-drain schedule
function M.gpipe_bound(p, m) return (p - 1) / (m + p - 1) end

M.Recorder, M.Stage = Recorder, Stage
return M
