-- moonshard.follow: one model served by several ranks (tensor and pipeline parallel). Rank 0 is
-- the driver: it runs HTTP, the scheduler and sampling; every call the engine makes on the
-- runner is sent to the other ranks (the followers), which make the same call on their own part
-- of the model, so the ranks' collectives line up step by step.
--
--   local model = assert(moonshard.load(path, { tp = 2, pp = 1, batch = 16 }))
--   local group = assert(follow.start(model))   -- rank 0: follow.lead; the others: follow.follow
--   if model.rank ~= 0 then return end          -- a follower: its loop makes rank 0's calls
--   -- rank 0: model.net is now a mirror of the runner: net:step(batch), net:copy_kv(...), any
--   -- method, is encoded (method name + arguments), sent to every follower, then run here
--
-- The call channel: a TCP connection from each follower to rank 0 (set up through the
-- rendezvous store), written by rank 0 only, in call order, framed (4-byte big-endian length +
-- a compact binary encoding of plain Lua values). It carries:
--   call   a runner method and its arguments: the follower makes the same call
--   fn     Lua source a REPL on rank 0 broadcast (live.broadcast, `:all!` in moonshard attach):
--          every rank runs it where it stands in the stream of calls, i.e. at the same step boundary
--   stop   rank 0 is stopping: the follower closes its model and exits 0
-- and, the other way, a follower's `stats` (opts.stats: its telemetry once a second, plain data),
-- kept on rank 0 in group.stats[rank] = { snap, at (uv.hrtime() when it came) } for the console.
-- A follower waits for messages on its libuv loop (no CPU while idle; its REPL sessions are
-- served between calls). The channel is not how data moves during a step: that is the ranks'
-- communicators (TCP between CPU ranks, NCCL between GPUs), inside the calls themselves. Under
-- pipeline parallelism the runner already hands the last stage's logits to every stage
-- (moonshard.runner's Runner:run), so rank 0 samples from them.
--
-- A mirrored call carries plain data only: nil, booleans, numbers, strings and tables of them.
-- A table field named in M.LOCAL_FIELDS stays on rank 0 (a step entry's `seq` is the engine's
-- request, which the runner does not read); a function or cdata anywhere else is refused with a
-- message naming the method, the argument and the field. What a call returns that the caller
-- owns (every position's logits, asked for with { all_logits = true }) a follower frees; another
-- method of that kind says how in M.RELEASE.
--
-- Failures: a follower whose connection closes (it died or was killed), a call that raises on
-- rank 0 (a collective that timed out waiting for a rank), or a write that cannot go out within
-- the collective timeout breaks the group: group.broken holds a one-line message naming the
-- rank, and group.on_broken(message) runs once (serve answers 503 and exits). A follower whose
-- call raises, or whose rank 0 goes away, exits 1 with a one-line message.
local uv = require "luv"
local ffi = require "ffi"
local bit = require "bit"

local M = {}

-- ------------------------------------------------------------------------------ encoding

-- Tags of the encoding. Integers are varints (7 bits a byte, low first); other numbers 8 raw bytes.
local NIL, FALSE, TRUE, UINT, NINT, DOUBLE, STR, TABLE = 0, 1, 2, 3, 4, 5, 6, 7

M.LOCAL_FIELDS = { seq = true }

local dbl = ffi.new("double[1]")

local function varint(out, n)
  while n >= 128 do
    out[#out + 1] = string.char(128 + n % 128)
    n = math.floor(n / 128)
  end
  out[#out + 1] = string.char(n)
end

local function enc(out, v, where, seen)
  local t = type(v)
  if v == nil then out[#out + 1] = string.char(NIL)
  elseif v == false then out[#out + 1] = string.char(FALSE)
  elseif v == true then out[#out + 1] = string.char(TRUE)
  elseif t == "number" then
    if v % 1 == 0 and v >= -2 ^ 53 and v <= 2 ^ 53 then
      out[#out + 1] = string.char(v >= 0 and UINT or NINT)
      varint(out, v >= 0 and v or -v)
    else
      dbl[0] = v
      out[#out + 1] = string.char(DOUBLE) .. ffi.string(dbl, 8)
    end
  elseif t == "string" then
    out[#out + 1] = string.char(STR)
    varint(out, #v)
    out[#out + 1] = v
  elseif t == "table" then
    if seen[v] then error(where .. " is a table that contains itself", 0) end
    seen[v] = true
    local n = #v
    local hash = {}
    for k, x in pairs(v) do
      local idx = type(k) == "number" and k % 1 == 0 and k >= 1 and k <= n
      if not idx then
        local kt = type(k)
        if kt ~= "string" and kt ~= "number" and kt ~= "boolean" then
          error(string.format("%s has a key of type %s", where, kt), 0)
        end
        if not (M.LOCAL_FIELDS[k] and type(x) == "table") then hash[#hash + 1] = k end
      end
    end
    out[#out + 1] = string.char(TABLE)
    varint(out, n)
    for i = 1, n do enc(out, v[i], where .. "[" .. i .. "]", seen) end
    varint(out, #hash)
    for _, k in ipairs(hash) do
      enc(out, k, where, seen)
      enc(out, v[k], type(k) == "string" and (where .. "." .. k) or (where .. "[" .. tostring(k) .. "]"), seen)
    end
    seen[v] = nil
  else
    error(string.format("%s is a %s (a mirrored call carries plain data only)", where, t), 0)
  end
end

-- M.encode(v, what?) -> string, or raises naming the part of v that is not plain data
function M.encode(v, what)
  local out = {}
  enc(out, v, what or "value", {})
  return table.concat(out)
end

local function dec(s, i)
  local tag = s:byte(i)
  if not tag then error("truncated message", 0) end
  i = i + 1
  local function uint()
    local n, mul = 0, 1
    while true do
      local b = s:byte(i)
      if not b then error("truncated message", 0) end
      i = i + 1
      if b < 128 then return n + b * mul end
      n, mul = n + (b - 128) * mul, mul * 128
    end
  end
  if tag == NIL then return nil, i
  elseif tag == FALSE then return false, i
  elseif tag == TRUE then return true, i
  elseif tag == UINT then return uint(), i
  elseif tag == NINT then return -uint(), i
  elseif tag == DOUBLE then
    if #s < i + 7 then error("truncated message", 0) end
    ffi.copy(dbl, s:sub(i, i + 7), 8)
    return dbl[0], i + 8
  elseif tag == STR then
    local n = uint()
    if #s < i + n - 1 then error("truncated message", 0) end
    return s:sub(i, i + n - 1), i + n
  elseif tag == TABLE then
    local t = {}
    local n = uint()
    for k = 1, n do t[k], i = dec(s, i) end
    local h = uint()
    for _ = 1, h do
      local k
      k, i = dec(s, i)
      t[k], i = dec(s, i)
    end
    return t, i
  end
  error("bad tag " .. tag .. " in a message", 0)
end

-- M.decode(s) -> the value M.encode(v) made of v
function M.decode(s)
  local v, i = dec(s, 1)
  if i ~= #s + 1 then error("trailing bytes in a message", 0) end
  return v
end

-- what rank 0 reads from a connection: before its hello (anyone who reaches the port), then a
-- follower's stats
local HELLO_MAX, STATS_MAX = 4096, 1024 * 1024

local function frame(payload)
  local n = #payload
  return string.char(bit.band(bit.rshift(n, 24), 255), bit.band(bit.rshift(n, 16), 255),
    bit.band(bit.rshift(n, 8), 255), bit.band(n, 255)) .. payload
end
M.frame = frame

-- M.reader(on_msg, limit?) -> feed(data): calls on_msg(value) for each complete frame of a
-- stream; limit() (when given) is the largest frame accepted now, in bytes: a longer one raises
-- an error as soon as its length is read, before its bytes are buffered
function M.reader(on_msg, limit)
  local buf = ""
  return function(data)
    buf = buf .. data
    while #buf >= 4 do
      local b1, b2, b3, b4 = buf:byte(1, 4)
      local n = ((b1 * 256 + b2) * 256 + b3) * 256 + b4
      local max = limit and limit()
      if max and n > max then error(string.format("a frame of %d bytes, over the %d allowed", n, max), 0) end
      if #buf < 4 + n then break end
      local payload = buf:sub(5, 4 + n)
      buf = buf:sub(5 + n)
      on_msg(M.decode(payload))
    end
  end
end

-- ------------------------------------------------------------------------------ the world

-- M.check_world(tp, pp, getenv?) -> world | nil, message: a served model is one replica, so the
-- job's ranks must be exactly tp x pp (from `moonshard launch -n N`, torchrun or Slurm).
function M.check_world(tp, pp, getenv)
  local id, err = require("moonshard.dist").identity(getenv)
  if not id then return nil, err end
  local need = tp * pp
  if id.world ~= need then
    local how = id.world == 1 and string.format(": start it with moonshard launch -n %d serve ...", need)
      or string.format(" (serve runs one replica of the model: launch -n %d)", need)
    return nil, string.format("--tp %d --pp %d needs %d ranks, this job has %d%s", tp, pp, need, id.world, how)
  end
  return id.world
end

-- What must not be called on a follower's runner from its own REPL (it would wait in collectives
-- for ranks that are not making the call), nor assigned there.
local READ_ONLY = { last_stage = true, slot_position = true }
-- Methods rank 0 runs alone: read-only ones, and telemetry wiring (its recorder stays local).
local LOCAL = { last_stage = true, slot_position = true, observe = true, tp_capturable = true }

-- How a follower disposes of what a call returned that the caller owns: by default, a call given
-- a table with all_logits = true (forward, forward_slot, forward_blocks ...) returned a new tensor
-- of every position's logits, which is freed; M.RELEASE[method](result, args...) overrides that.
M.RELEASE = {}

local function release(method, res, args, n)
  local rel = M.RELEASE[method]
  if rel then return rel(res, unpack(args, 1, n)) end
  for i = 1, n do
    local a = args[i]
    if type(a) == "table" and a.all_logits and type(res) == "cdata" then
      res:free()
      return
    end
  end
end

-- a random hex string (what a follower proves it was told by the rendezvous)
function M.token()
  local f = io.open("/dev/urandom", "rb")
  local raw = f and f:read(16) or (tostring(uv.hrtime()) .. tostring({}))
  if f then f:close() end
  return (raw:gsub(".", function(c) return string.format("%02x", c:byte()) end))
end

local function who(rank, pid)
  return pid and string.format("rank %d (pid %d)", rank, pid) or ("rank " .. rank)
end

-- ------------------------------------------------------------------------------ rank 0

local Group = {}
Group.__index = Group

-- M.lead(model, opts) -> group | nil, message (rank 0 of model.dist). Waits for every follower to
-- connect (opts.timeout seconds, default the rendezvous timeout), then replaces model.net by a
-- mirror of it (group.raw is the runner itself).
--   opts.on_broken(message)  called once when the group breaks (default: none; group.broken says)
function M.lead(model, opts)
  opts = opts or {}
  local pg = model.dist
  if not pg or pg.rank ~= 0 then error("follow.lead: rank 0 of a model loaded with tp/pp expected", 2) end
  local timeout = opts.timeout or pg.timeout or 300
  require("moonshard.live").ignore_sigpipe() -- a follower gone: writes fail with EPIPE, no signal
  local self = setmetatable({ pg = pg, world = pg.world, conns = {}, pids = {}, raw = model.net,
    on_broken = opts.on_broken, write_timeout = pg.comm_timeout or 600, seq = 0, calls = 0, stats = {},
    started = uv.hrtime() }, Group)
  local server = uv.new_tcp()
  local loopback = pg.master_addr == "127.0.0.1" or pg.master_addr == "localhost"
  local ok, err = server:bind(loopback and "127.0.0.1" or "0.0.0.0", 0)
  if not ok then return nil, "cannot listen for the followers: " .. tostring(err) end
  local token = M.token()
  local joined = 0
  local pending = {} -- connections that have not said hello yet
  server:listen(pg.world, function(lerr)
    if lerr then return end
    local conn = uv.new_tcp()
    if not server:accept(conn) then conn:close() return end
    pending[conn] = true
    local rank
    conn:read_start(M.reader_guarded(function(msg)
      if rank == nil then
        pending[conn] = nil
        -- the first message: hello { rank, pid, token }
        if type(msg) ~= "table" or msg.token ~= token or type(msg.rank) ~= "number"
          or msg.rank < 1 or msg.rank >= pg.world or self.conns[msg.rank] then
          conn:close()
          return
        end
        rank = msg.rank
        self.conns[rank], self.pids[rank] = conn, msg.pid
        joined = joined + 1
      elseif type(msg) == "table" and msg.op == "stats" then
        self.stats[rank] = { snap = msg.s, at = uv.hrtime() }
      end
    end, function(why)
      if rank == nil then
        pending[conn] = nil
        if not conn:is_closing() then conn:close() end
        return
      end
      self:lost(rank, why)
    end, function() -- a hello is a few dozen bytes; a follower's stats a few KiB
      return rank == nil and HELLO_MAX or STATS_MAX
    end))
  end)
  -- rank 0's address is the rendezvous address; the port and token go through the store
  local all
  all, err = pg.store:gather("follow", 0, pg.world, require("cjson").encode { port = server:getsockname().port,
    token = token }, timeout)
  if not all then server:close() return nil, err end
  uv.update_time() -- the loop's clock stands still while nothing runs it (a model's load)
  local deadline = uv.now() + timeout * 1000
  local tick = uv.new_timer()
  tick:start(20, 20, function() end)
  while joined < pg.world - 1 and uv.now() < deadline do uv.run("once") end
  tick:close()
  server:close()
  for conn in pairs(pending) do -- not a follower (none is missing, or the wait is over)
    if not conn:is_closing() then conn:close() end
  end
  if joined < pg.world - 1 then
    local missing = {}
    for r = 1, pg.world - 1 do if not self.conns[r] then missing[#missing + 1] = tostring(r) end end
    self:close_conns()
    return nil, string.format("rank%s %s did not connect to rank 0 within %g s", #missing > 1 and "s" or "",
      table.concat(missing, ", "), timeout)
  end
  model.net = M.mirror(self.raw, self)
  self.mirror = model.net
  return self
end

-- M.reader_guarded(on_msg, on_end, limit?) -> a read callback: frames to on_msg (limit as
-- M.reader's); on_end(why) at EOF, on an error or a malformed or oversized frame
function M.reader_guarded(on_msg, on_end, limit)
  local feed = M.reader(on_msg, limit)
  local ended = false
  return function(err, data)
    if ended then return end
    if err or not data then
      ended = true
      return on_end(err and ("its connection failed: " .. tostring(err)) or "its connection closed")
    end
    local ok, perr = pcall(feed, data)
    if not ok then
      ended = true
      return on_end("it sent a malformed message: " .. tostring(perr))
    end
  end
end

-- group:lost(rank, why): a follower is gone (its connection ended) -> the group is broken.
function Group:lost(rank, why)
  local conn = self.conns[rank]
  self.conns[rank] = nil
  if conn and not conn:is_closing() then conn:close() end
  if self.stopping then return end
  self:fail(string.format("%s is gone (%s)", who(rank, self.pids[rank]), why))
end

function Group:fail(msg)
  if self.broken then return end
  self.broken = msg
  if self.on_broken then
    local ok, err = pcall(self.on_broken, msg)
    if not ok then io.stderr:write("moonshard: on_broken failed: ", tostring(err), "\n") end
  end
end

-- Writes all of data to a follower before returning (rank 0 goes on into collectives that wait for
-- the follower to have read it, so nothing may stay queued on the loop).
local function write_all(conn, data, deadline)
  local off = 1
  while off <= #data do
    local n, err, name = conn:try_write(off == 1 and data or data:sub(off))
    if n then
      off = off + n
    elseif name == "EAGAIN" or tostring(err):match("^EAGAIN") then
      if uv.hrtime() > deadline then return nil, "its connection took no data for the collective timeout" end
      uv.sleep(1)
    else
      return nil, "writing to it failed: " .. tostring(err)
    end
  end
  return true
end

-- group:send(msg) -> true | nil, message: msg (a table of plain data) to every follower
function Group:send(msg, what)
  if self.broken then return nil, self.broken end
  local data = frame(M.encode(msg, what))
  local deadline = uv.hrtime() + self.write_timeout * 1e9
  for r = 1, self.world - 1 do
    local conn = self.conns[r]
    if not conn then
      self:fail(string.format("%s is gone", who(r, self.pids[r])))
      return nil, self.broken
    end
    local ok, err = write_all(conn, data, deadline)
    if not ok then
      self:lost(r, err)
      return nil, self.broken
    end
  end
  return true
end

-- group:call(method, ...) -> what raw:method(...) returns: sent to the followers, then run here.
-- Arguments that are not plain data raise (misuse). A call that cannot be sent, or that raises
-- here (a collective that failed: the ranks are out of step for good), breaks the group and
-- returns nil, message.
function Group:call(method, ...)
  local n = select("#", ...)
  local ok, sent = pcall(function(...)
    return self:send({ op = "call", m = method, n = n, a = { ... } }, "runner:" .. method .. " argument")
  end, ...)
  if not ok then error("runner:" .. method .. ": " .. tostring(sent), 3) end
  if not sent then return nil, self.broken end
  self.calls = self.calls + 1
  local raw = self.raw
  local res = { pcall(raw[method], raw, ...) }
  if not res[1] then
    local msg = tostring(res[2]):gsub("^[^:]*:%d+: ", "")
    self:fail(string.format("runner:%s failed on rank 0: %s", method, msg))
    return nil, self.broken
  end
  return unpack(res, 2, table.maxn(res))
end

-- group:broadcast_fn(src, budget) -> seq | nil, message: Lua source every follower runs at this
-- point of the call stream (rank 0 runs it itself; see moonshard.live)
function Group:broadcast_fn(src, budget)
  self.seq = self.seq + 1
  local ok, err = self:send { op = "fn", src = src, seq = self.seq, budget = budget }
  if not ok then return nil, err end
  return self.seq
end

function Group:close_conns()
  for r, c in pairs(self.conns) do
    if not c:is_closing() then c:close() end
    self.conns[r] = nil
  end
end

-- group:stop(): tells the followers to stop (they exit 0) and closes the connections.
function Group:stop()
  if self.stopping then return end
  if not self.broken then self:send { op = "stop" } end
  self.stopping = true
  self:close_conns()
end

local function unavailable(res, msg)
  local body = require("cjson").encode { error = { message = msg, type = "server_error", code = "rank_gone",
    param = require("cjson").null } }
  res.keep_alive = false
  if not res.started then
    res:send(503, { ["Content-Type"] = "application/json", ["Retry-After"] = "5" }, body)
  elseif res.chunked and not res.finished then
    res:write("data: " .. body .. "\n\n")
    res:write("data: [DONE]\n\n")
    res:finish()
  end
end

-- group:http_handler(handler) -> a moonshard.http handler that answers 503 (OpenAI's error JSON
-- naming the rank) once the group is broken; group:answer_open() answers the requests still open
-- then (their engine requests must be silenced first: see serve).
function Group:http_handler(handler)
  local open = setmetatable({}, { __mode = "k" })
  self.open = open
  return function(req, res)
    if self.broken then return unavailable(res, self.broken) end
    open[res] = true
    return handler(req, res)
  end
end

function Group:answer_open()
  for res in pairs(self.open or {}) do
    if not res.finished and not res:closed() then pcall(unavailable, res, self.broken) end
  end
end

-- The mirror: a runner whose methods (but the read-only and local ones) go through group:call;
-- fields read through. Assigning a field is refused: every rank relies on the same runner state.
function M.mirror(raw, group)
  local wrappers = {}
  local proxy = {}
  local function close()
    group:stop()
    return raw:close()
  end
  setmetatable(proxy, {
    __index = function(_, k)
      local v = raw[k]
      if type(v) ~= "function" then return v end
      if k == "close" then return close end
      local w = wrappers[k]
      if w then return w end
      if LOCAL[k] then
        w = function(self, ...) if self == proxy then return v(raw, ...) end return v(self, ...) end
      else
        w = function(self, ...)
          if self ~= proxy then error("runner." .. k .. ": call it as a method (runner:" .. k .. "(...))", 2) end
          return group:call(k, ...)
        end
      end
      wrappers[k] = w
      return w
    end,
    __newindex = function(_, k)
      error(string.format("runner.%s: the runner is mirrored on %d ranks, which must stay in step: change it on "
        .. "every rank at once with live.broadcast(\"runner.%s = ...\") (:all! in moonshard attach)", tostring(k),
        group.world, tostring(k)), 2)
    end,
    __tostring = function() return string.format("runner mirrored on %d ranks", group.world) end,
  })
  return proxy
end

-- ------------------------------------------------------------------------------ followers

-- M.guard(raw, rank) -> a follower's runner as its REPL sees it: fields read through, read-only
-- methods run, anything else is refused with the reason.
function M.guard(raw, rank)
  local why = string.format("rank %d follows rank 0, which makes every runner call of the job; calls and changes "
    .. "here would leave the ranks out of step: attach to rank 0 (live.broadcast there runs code on every rank)", rank)
  return setmetatable({}, {
    __index = function(_, k)
      local v = raw[k]
      if type(v) ~= "function" then return v end
      if READ_ONLY[k] then return function(_, ...) return v(raw, ...) end end
      return function() error("runner:" .. tostring(k) .. ": " .. why, 2) end
    end,
    __newindex = function(_, k) error("runner." .. tostring(k) .. ": " .. why, 2) end,
    __tostring = function() return string.format("runner of rank %d (follows rank 0)", rank) end,
  })
end

-- M.scheduler_stub(rank) -> what a follower's REPL finds as `scheduler`: nothing to read, and
-- methods that say where the scheduler is.
function M.scheduler_stub(rank)
  local why = string.format("the scheduler runs on rank 0 only (rank %d follows its step plan): "
    .. "change the policy there (moonshard attach DIR --rank 0)", rank)
  return setmetatable({ follower = true }, {
    __index = function(_, k)
      if k == "policy" or k == "policy_undo" then return nil end
      return function() error("scheduler:" .. tostring(k) .. ": " .. why, 2) end
    end,
    __tostring = function() return "no scheduler on rank " .. rank .. " (" .. why .. ")" end,
  })
end

-- M.follow(model, opts) -> follower | nil, message: connects rank R (> 0) to rank 0 and makes
-- every call that arrives on model.net (the runner itself; model.net becomes the REPL's guard).
--   opts.name       the command, for messages ("serve")
--   opts.on_fn(src, seq, budget, env)  runs a broadcast chunk (moonshard.live sets it); default: run it
--   opts.grace      seconds a SIGINT/SIGTERM waits for rank 0's stop before exiting (default 2)
--   opts.stats()    -> plain data sent to rank 0 every opts.stats_ms (default 1000) while idle
function M.follow(model, opts)
  opts = opts or {}
  local pg = model.dist
  if not pg or pg.rank == 0 then error("follow.follow: a rank other than 0 of a model loaded with tp/pp expected", 2) end
  local name = opts.name or "moonshard"
  local timeout = opts.timeout or pg.timeout or 300
  local all, err = pg.store:gather("follow", pg.rank, pg.world, "", timeout)
  if not all then return nil, err end
  local ok, info = pcall(require("cjson").decode, all[1])
  if not ok or type(info) ~= "table" then return nil, "rank 0 published no call channel" end
  local raw = model.net
  local self = { rank = pg.rank, raw = raw, model = model, calls = 0, name = name, on_fn = opts.on_fn }
  local conn = uv.new_tcp()
  local connected, cerr = false, nil
  conn:connect(pg.master_addr == "localhost" and "127.0.0.1" or pg.master_addr, info.port, function(e)
    connected, cerr = true, e
  end)
  uv.update_time() -- the loop's clock stands still while nothing runs it (a model's load)
  local deadline = uv.now() + timeout * 1000
  while not connected and uv.now() < deadline do uv.run("once") end
  if not connected or cerr then
    conn:close()
    return nil, string.format("cannot connect to rank 0's call channel at %s:%d: %s", pg.master_addr, info.port,
      tostring(cerr or "timed out"))
  end
  conn:write(frame(M.encode { rank = pg.rank, pid = uv.os_getpid(), token = info.token }))
  self.conn = conn
  model.net = M.guard(raw, pg.rank)
  self.guard = model.net

  local function die(msg)
    io.stderr:write(string.format("moonshard %s: rank %d: %s\n", name, pg.rank, msg))
    M.exit(1)
  end
  local function finish()
    if self.done then return end
    self.done = true
    if self.stats_timer and not self.stats_timer:is_closing() then self.stats_timer:close() end
    if not conn:is_closing() then conn:close() end
    pcall(raw.close, raw)
    M.exit(0)
  end
  self.finish = finish

  local function handle(msg)
    if type(msg) ~= "table" then return die("rank 0 sent something that is not a message") end
    if msg.op == "call" then
      local f = raw[msg.m]
      if type(f) ~= "function" then return die(string.format("rank 0 called runner:%s, which this rank's runner lacks", tostring(msg.m))) end
      local args = msg.a or {}
      local res = { pcall(f, raw, unpack(args, 1, msg.n or #args)) }
      if not res[1] then
        return die(string.format("runner:%s failed: %s", msg.m, (tostring(res[2]):gsub("^[^:]*:%d+: ", ""))))
      end
      release(msg.m, res[2], args, msg.n or #args)
      self.calls = self.calls + 1
    elseif msg.op == "fn" then
      if self.on_fn then
        self.on_fn(msg.src, msg.seq, msg.budget)
      else
        local fn, ferr = loadstring(msg.src, "=broadcast")
        if fn then
          setfenv(fn, setmetatable({ runner = raw, model = model, pg = pg }, { __index = _G }))
          local fok, e = pcall(fn)
          if not fok then io.stderr:write(string.format("moonshard %s: rank %d: broadcast #%d: %s\n", name, pg.rank, msg.seq, tostring(e))) end
        else
          io.stderr:write(string.format("moonshard %s: rank %d: broadcast #%d: %s\n", name, pg.rank, msg.seq, ferr))
        end
      end
    elseif msg.op == "stop" then
      self.stopped = true
      finish()
    else
      die("rank 0 sent an unknown message '" .. tostring(msg.op) .. "'")
    end
  end
  conn:read_start(M.reader_guarded(handle, function(why)
    if self.stopped or self.stopping then return finish() end
    die("rank 0 is gone (" .. why .. ")")
  end))

  if opts.stats then -- this rank's telemetry, between calls (a rank stopped or stuck sends none)
    local t = uv.new_timer()
    local ms = opts.stats_ms or 1000
    t:start(math.min(ms, 100), ms, function() -- the first soon after joining
      if self.done or conn:is_closing() then return end
      local ok, data = pcall(function() return frame(M.encode({ op = "stats", s = opts.stats() }, "stats")) end)
      if ok then conn:write(data) end
    end)
    t:unref()
    self.stats_timer = t
  end

  -- a signal (the launcher forwards SIGINT/SIGTERM to every rank) waits for rank 0's stop, which
  -- comes after the step in progress, so that no rank leaves another waiting in a collective
  self.signals = {}
  for _, sig in ipairs { "sigint", "sigterm" } do
    local h = uv.new_signal()
    h:start(sig, function()
      if self.stopping then return end
      self.stopping = true
      local t = uv.new_timer()
      t:start(math.floor((opts.grace or 2) * 1000), 0, function() t:close() finish() end)
      t:unref()
    end)
    h:unref()
    self.signals[#self.signals + 1] = h
  end
  return self
end

-- M.start(model, opts) -> group (rank 0: M.lead) | follower (the others: M.follow, and a REPL
-- listening with the runner's guard and a scheduler stub in scope) | nil, message
--   opts.name ("serve"), opts.repl (moonshard.live's tcp spec), opts.on_broken (rank 0)
function M.start(model, opts)
  opts = opts or {}
  if model.rank == 0 then return M.lead(model, opts) end
  local f, err = M.follow(model, opts)
  if not f then return nil, err end
  local name = opts.name or "moonshard"
  require("moonshard.live").listen { name = name, model = model, pg = model.dist, runner = f.guard,
    scheduler = M.scheduler_stub(model.rank), follower = f, tcp = opts.repl }
  io.stderr:write(string.format("moonshard %s: rank %d follows rank 0's runner calls\n", name, model.rank))
  io.stderr:flush()
  return f
end

-- group:abandon(engine): after a break, the engine stops stepping and its requests end without
-- calling back (their HTTP responses are answered by group:answer_open()).
function Group:abandon(engine)
  if not engine then return end
  engine:detach()
  for _, list in ipairs { engine.sched.running, engine.sched.waiting } do
    for _, req in ipairs(list) do req.on_token, req.on_finish = nil, nil end
  end
end

-- M.exit(code): ends a rank of a served job. The REPL files go now; the Lua state is not closed
-- (what the rank holds was closed explicitly), so that no finalizer closes the signal handles:
-- the launcher, and a `timeout` around it, send SIGTERM more than once, and one arriving after a
-- handle closed would find the default action (death by the signal, a failure to the launcher).
-- _exit, not exit: no atexit handler runs either (a sanitizer's leak check would report what the
-- unclosed state still holds).
function M.exit(code)
  for _, s in ipairs(require("moonshard.live").servers) do pcall(s.cleanup, s) end
  io.stdout:flush()
  io.stderr:flush()
  local ffi = require "ffi"
  pcall(ffi.cdef, "void _exit(int status);")
  ffi.C._exit(code)
end

M.who = who
return M
