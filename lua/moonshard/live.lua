-- moonshard.live: REPL sessions inside a running rank (`moonshard attach` is the other end).
--
--   local live = require "moonshard.live"
--   live.listen { engine = engine, model = model, pg = pg, telemetry = tel, name = "serve" }
--
-- Where: a Unix socket <run folder>/rank<R>.repl.sock (mode 0600 in a folder only its owner may
-- enter; a peer of another uid is refused again by SO_PEERCRED), described by
-- <run folder>/rank<R>.repl.json (rank, world, pid, socket, tcp). The run folder is $MSH_LOG_DIR
-- (which `moonshard launch` sets), else $XDG_RUNTIME_DIR/moonshard-<uid>/<name>-<pid> (or /tmp/...);
-- the path is printed on stderr. opts.tcp = "HOST:PORT" (`--repl tcp:HOST:PORT`) adds a TCP
-- listener that takes a session only after it sent the token (opts.token, $MSH_REPL_TOKEN, else
-- drawn at random and written 0600 to rank<R>.repl.token); HOST is loopback unless an address
-- is named. $MSH_REPL=off (or opts.tcp/`--repl off`) listens nowhere.
--
-- When a chunk runs: on this rank's libuv loop, from the socket's read callback. The engine
-- steps from its own idle callback (engine:attach), and the loop runs one callback at a time, so
-- a chunk always runs between two steps, never inside one (a chunk that arrives while a step is
-- somehow in progress, e.g. from a request's callback, waits for a timer). A statement therefore
-- sees the scheduler's queues and the KV accounting as the last step left them, and what it
-- changes is what the next step reads.
--
-- Scope: engine, scheduler, runner, model, telemetry, pg, uv, live; globals a session assigns stay
-- in that session's table (the rank's own globals are read through it). print() goes back to the
-- session.
--
-- Limits: each chunk runs under a time budget (opts.budget, $MSH_REPL_BUDGET, default 2 s); a
-- count hook every 10,000 VM instructions raises past it (and makes the session's pcall and
-- xpcall raise, so a loop that catches errors ends too) (compiled code calls no hook, so the
-- chunk and what it defines run interpreted and the JIT starts no trace meanwhile; a loop inside
-- a function the rank compiled before, or a long call into C, is not interrupted). Errors come back as tracebacks.
-- A disconnect drops the session only. Nothing a session does ends the rank, short of os.exit.
--
-- Changes: after each chunk the scheduling policy and the sizes fixed at start are compared
-- with what they were before it.
--   scheduler.policy = { compare = ... } or scheduler:use("spf" | "file.lua" | table): checked
--     (a table with compare(a, b)), takes effect at the next step; the previous one is kept for
--     scheduler:undo() (:undo in attach). In a job of several ranks the scheduler is rank 0's
--     (the driver broadcasts each step's plan), so a change on another rank is refused.
--   engine.max_batch, the KV block pool, the context, the runner's slots and sizes, the process
--     group: sized at load, so a change is undone and refused with the reason (runner.chunk may
--     go down, not past the buffers it was loaded with).
--   In a job whose ranks follow rank 0's runner calls (moonshard.follow: `launch -n N serve
--     --tp/--pp`): rank 0's `runner` is the mirror (its calls go to every rank; assigning a field
--     is refused), a follower's is read-only and its `scheduler` a stub saying where the scheduler
--     is. live.broadcast(SOURCE) on rank 0 (`:all! CHUNK` in attach) sends SOURCE through the
--     channel of the runner calls and runs it, so every rank runs it at the same step boundary
--     over its own runner (the same refusals apply on each); live.result(n) shows a rank's answer.
local uv = require "luv"
local cjson = require "cjson"
local ffi = require "ffi"
local repl = require "moonshard.repl"
local bit = require "bit"

local M = {}

for _, decl in ipairs {
  "int getsockopt(int fd, int level, int optname, void *optval, uint32_t *optlen);",
  "unsigned int geteuid(void);",
  "unsigned int umask(unsigned int mask);",
  "void (*signal(int sig, void (*handler)(int)))(int);",
} do pcall(ffi.cdef, decl) end
local C = ffi.C

local SOL_SOCKET, SO_PEERCRED = 1, 17 -- Linux
local cred = ffi.new("int32_t[3]") -- struct ucred { pid_t pid; uid_t uid; gid_t gid; }
local cred_len = ffi.new("uint32_t[1]")

local Server = {}
Server.__index = Server

M.DEFAULT_BUDGET = 2
M.MAX_OUTPUT = 1024 * 1024 -- bytes of print() a chunk sends back at most
M.servers = {}             -- anchors the listeners (and their cleanup) until the state closes

local function read_file(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("*a")
  f:close()
  return s
end
M.read_file = read_file

local function pid_alive(pid)
  pid = tonumber(pid)
  if not pid or pid <= 0 then return false end
  local ok = uv.kill(pid, 0)
  if not (ok == 0 or ok == true) then return false end
  -- a zombie (ended, not yet reaped) is gone too
  local stat = read_file("/proc/" .. pid .. "/stat")
  return not (stat and stat:match("^%d+ %b() ([ZX])"))
end
M.pid_alive = pid_alive

local function write_file(path, text)
  local fd, err = uv.fs_open(path, "w", tonumber("600", 8))
  if not fd then return nil, err end
  uv.fs_write(fd, text, 0)
  uv.fs_close(fd)
  return true
end

-- The folder of runs started outside `moonshard launch`: $XDG_RUNTIME_DIR/moonshard-<uid> (or
-- /tmp/moonshard-<uid>), mode 0700 and ours, or nil and why not.
function M.private_base()
  local uid = tonumber(C.geteuid())
  local xdg = os.getenv("XDG_RUNTIME_DIR")
  local root = (xdg and xdg ~= "" and uv.fs_stat(xdg)) and xdg or "/tmp"
  local base = root .. "/moonshard-" .. uid
  uv.fs_mkdir(base, tonumber("700", 8))
  local st = uv.fs_stat(base)
  if not st or st.type ~= "directory" then return nil, base .. ": not a folder" end
  if st.uid ~= uid or bit.band(st.mode, tonumber("077", 8)) ~= 0 then
    return nil, string.format("%s: owned by uid %d or open to others (mode %o); not used", base, st.uid,
      bit.band(st.mode, tonumber("777", 8)))
  end
  return base
end

-- Removes the REPL files of rank `rank` in dir (its socket, description and token).
function M.remove_files(dir, rank)
  local stem = string.format("%s/rank%d.repl", dir, rank)
  local ok, info = pcall(cjson.decode, read_file(stem .. ".json") or "")
  if ok and type(info) == "table" and type(info.socket) == "string" then os.remove(info.socket) end
  for _, ext in ipairs { ".sock", ".json", ".token" } do os.remove(stem .. ext) end
end

-- Private run folders whose process is gone (a rank ended by os.exit or a signal cannot clean
-- up): their REPL files and, when then empty, the folder.
local function sweep(base)
  local it = uv.fs_scandir(base)
  if not it then return end
  while true do
    local name, kind = uv.fs_scandir_next(it)
    if not name then break end
    local pid = name:match("%-(%d+)$")
    if kind == "directory" and pid and not pid_alive(pid) then
      local d = base .. "/" .. name
      local it2 = uv.fs_scandir(d)
      while it2 do
        local f = uv.fs_scandir_next(it2)
        if not f then break end
        if f:match("^rank%d+%.repl%.") then os.remove(d .. "/" .. f) end
      end
      uv.fs_rmdir(d)
    end
  end
end

-- M.run_dir(name) -> folder, made (true when this call made a private one) | nil, message
function M.run_dir(name)
  local env = os.getenv("MSH_LOG_DIR")
  if env and env ~= "" then
    local ok, err = require("moonshard.telemetry").mkdir_p(env)
    if not ok then return nil, string.format("cannot make the run folder %s: %s", env, tostring(err)) end
    return env, false
  end
  local base, err = M.private_base()
  if not base then return nil, err end
  sweep(base)
  local dir = string.format("%s/%s-%d", base, (name or "moonshard"):gsub("[^%w_.-]", "_"), uv.os_getpid())
  local ok, merr = uv.fs_mkdir(dir, tonumber("700", 8))
  if not ok and not uv.fs_stat(dir) then return nil, "cannot make " .. dir .. ": " .. tostring(merr) end
  return dir, true
end

-- "tcp:HOST:PORT", "tcp:PORT", "HOST:PORT" -> host, port, named (an address other than loopback
-- was asked for by name) | nil, message
function M.parse_tcp(spec)
  local s = spec:gsub("^tcp:", "")
  local host, port = s:match("^%[(.*)%]:(%d+)$")
  if not host then host, port = s:match("^(.*):(%d+)$") end
  if not host then host, port = "", s:match("^(%d+)$") end
  port = tonumber(port)
  if not port or port > 65535 then return nil, string.format("--repl %s: expected tcp:HOST:PORT", spec) end
  if host == "" or host == "localhost" then host = "127.0.0.1" end
  local loopback = host:match("^127%.") or host == "::1"
  return host, port, not loopback
end

local function random_token()
  local f = io.open("/dev/urandom", "rb")
  local raw = f and f:read(24) or tostring(uv.hrtime()) .. tostring({})
  if f then f:close() end
  return (raw:gsub(".", function(c) return string.format("%02x", c:byte()) end))
end

-- ------------------------------------------------------------------------------ evaluating

local function policy_name(p)
  if type(p) == "table" and p.name then return tostring(p.name) end
  return tostring(p)
end

-- What a chunk may not change, and why: { object, field, label, reason, limit? } (a field with a
-- limit may take any integer in 1 .. limit).
local function frozen(self, scope)
  local list = {}
  local e, s, r, pg = scope.engine, scope.scheduler, scope.runner, scope.pg
  local load = "sized at load: restart with the new value"
  if e then
    list[#list + 1] = { e, "max_batch", "engine.max_batch", "the runner's KV slots and the logits buffer are " .. load }
    list[#list + 1] = { e, "max_len", "engine.max_len", "the context is " .. load }
  end
  if s then
    for _, k in ipairs { "block_size", "num_blocks", "n_slots", "max_seq" } do
      list[#list + 1] = { s, k, "scheduler." .. k, "the KV block pool and the slots' rows are " .. load }
    end
  end
  if r and type(r) == "table" then
    for _, k in ipairs { "batch", "max_seq", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "vocab_size",
      "first_layer", "last_layer", "pp_rank", "pp_size", "tp_size", "vocab_local", "device", "paged" } do
      list[#list + 1] = { r, k, "runner." .. k, "the runner's buffers, KV cache and share of the model are " .. load }
    end
    local limit = self.limits and self.limits.chunk
    if limit then
      list[#list + 1] = { r, "chunk", "runner.chunk", string.format("the activation buffers hold %d tokens a sequence "
        .. "(sized at load): 1 .. %d", limit, limit), limit }
    end
  end
  if pg and type(pg) == "table" then
    for _, k in ipairs { "rank", "world", "tp", "pp", "dp", "comm" } do
      list[#list + 1] = { pg, k, "pg." .. k, "the process group is fixed for the job's life (every rank relies on it)" }
    end
  end
  return list
end

local function snapshot(self, scope)
  local snap = { fields = {} }
  local s = scope.scheduler
  if s then
    snap.policy = s.policy
    snap.undo = {}
    for i, p in ipairs(rawget(s, "policy_undo") or {}) do snap.undo[i] = p end
  end
  for i, f in ipairs(frozen(self, scope)) do snap.fields[i] = { f = f, v = rawget(f[1], f[2]) } end
  return snap
end

-- After a chunk: keeps what may change (noting it), undoes what may not (with the reason).
local function review(self, snap, notes, scope)
  for _, x in ipairs(snap.fields) do
    local obj, k, label, why, limit = x.f[1], x.f[2], x.f[3], x.f[4], x.f[5]
    local v = rawget(obj, k)
    if v ~= x.v then
      if limit and type(v) == "number" and v >= 1 and v <= limit and v % 1 == 0 then
        notes[#notes + 1] = string.format("%s %s -> %s", label, tostring(x.v), tostring(v))
      else
        rawset(obj, k, x.v)
        notes[#notes + 1] = string.format("refused: %s cannot %s live (%s); kept %s", label,
          limit and ("be " .. tostring(v)) or "change", why, tostring(x.v))
      end
    end
  end
  local s = scope.scheduler
  if not s or s.policy == snap.policy then return end
  local function restore(why)
    s.policy, s.policy_undo = snap.policy, snap.undo
    notes[#notes + 1] = "refused: " .. why .. "; the policy stays " .. policy_name(snap.policy)
  end
  local pol, err = require("moonshard.scheduler").policy(s.policy)
  if not pol then return restore(err) end
  if self.world > 1 and self.rank ~= 0 then
    return restore(string.format("the scheduler runs on rank 0 (the driver broadcasts each step's plan to the %d ranks, "
      .. "so they cannot diverge): change it there (moonshard attach --rank 0)", self.world))
  end
  s.policy = pol
  local undo = s.policy_undo or {}
  s.policy_undo = undo
  if #undo == #snap.undo then undo[#undo + 1] = snap.policy end -- an assignment (use/undo keep the list)
  notes[#notes + 1] = string.format("scheduling policy %s -> %s: takes effect at the next step%s", policy_name(snap.policy),
    policy_name(pol), #undo > 0 and (" (:undo restores " .. policy_name(undo[#undo]) .. ")") or "")
end

local function compile(src, name)
  local fn = loadstring("return " .. src, name)
  if fn then return fn end
  return loadstring(src, name)
end

-- Runs fn under a time budget: a count hook raises once the budget is spent (again and again,
-- should the chunk catch the error). Returns xpcall's results as a table.
local function run_limited(fn, budget, env)
  local deadline = uv.hrtime() + budget * 1e9
  local msg = string.format("interrupted: the chunk ran past its budget of %g s (:budget S changes it)", budget)
  local function refuse() error(msg, 2) end
  local hook = function()
    if uv.hrtime() > deadline then
      -- a chunk that catches errors in a loop reaches for pcall again: from now on it raises
      if env then rawset(env, "pcall", refuse) rawset(env, "xpcall", refuse) end
      error(msg, 2)
    end
  end
  local old_f, old_mask, old_count = debug.gethook()
  local function handler(e)
    debug.sethook()
    -- the chunk's frames only: what lies under xpcall is this module's
    local tb = debug.traceback(tostring(e), 2)
    tb = tb:gsub("\n\t%[C%]: in function 'xpcall'.*$", "")
    return (tb:gsub("\n\t[^\n]*moonshard/live%.lua:[^\n]*", ""))
  end
  -- compiled code never calls the hook: the chunk and the functions it defines stay interpreted,
  -- and no new trace starts while it runs (the rank's compiled traces are kept)
  jit.off(fn, true)
  local jit_on = jit.status()
  jit.off()
  debug.sethook(hook, "", 10000)
  local res = { xpcall(fn, handler) }
  if old_f then debug.sethook(old_f, old_mask, old_count) else debug.sethook() end
  if jit_on then jit.on() end
  if env and rawget(env, "pcall") == refuse then rawset(env, "pcall", nil) rawset(env, "xpcall", nil) end
  return res
end

-- session:eval(src) -> reply { ok, values, out, err, notes }
local function eval(self, session, src)
  local fn, err = compile(src, "=rank" .. self.rank)
  if not fn then return { ok = false, err = err } end
  setfenv(fn, session.env)
  local snap = snapshot(self, self.scope)
  session.out, session.out_n = {}, 0
  local res = run_limited(fn, session.budget, session.env)
  local notes = {}
  local ok, rerr = pcall(review, self, snap, notes, self.scope)
  if not ok then notes[#notes + 1] = "could not review the chunk's changes: " .. tostring(rerr) end
  local reply = { ok = res[1], out = table.concat(session.out), notes = notes }
  session.out = nil
  if not res[1] then
    reply.err = tostring(res[2])
  else
    local n, parts = table.maxn(res), {}
    for i = 2, n do
      local rok, s = pcall(repl.render, res[i])
      parts[#parts + 1] = rok and s or ("<" .. type(res[i]) .. ">")
    end
    if n > 1 then reply.values = table.concat(parts, "\t") end
  end
  return reply
end

-- ------------------------------------------------------------------------------ broadcasts

-- What a broadcast chunk sees on every rank: the runner itself (not rank 0's mirror nor a
-- follower's guard: each rank changes its own, where it stands in the stream of calls), the model
-- over it, the process group; no engine or scheduler (rank 0's alone).
local function broadcast_scope(self)
  local sc, raw = self.scope, self.raw_runner or self.scope.runner
  local model = sc.model and setmetatable({ net = raw }, { __index = sc.model })
  return { runner = raw, model = model, pg = sc.pg, telemetry = sc.telemetry, uv = uv, live = self,
    rank = self.rank, world = self.world }
end

-- Runs broadcast number seq (Lua source) on this rank; keeps and returns the reply.
local function apply(self, src, seq, budget)
  local fn, err = compile(src, "=broadcast")
  local reply
  if not fn then
    reply = { ok = false, err = err, notes = {} }
  else
    local scope = broadcast_scope(self)
    local out = {}
    local env = setmetatable({ print = function(...)
      local parts = {}
      for i = 1, select("#", ...) do parts[i] = tostring((select(i, ...))) end
      out[#out + 1] = table.concat(parts, "\t") .. "\n"
    end }, { __index = function(_, k) if scope[k] ~= nil then return scope[k] end return _G[k] end })
    setfenv(fn, env)
    local snap = snapshot(self, scope)
    local res = run_limited(fn, budget or self.budget, env)
    local notes = {}
    local ok, rerr = pcall(review, self, snap, notes, scope)
    if not ok then notes[#notes + 1] = "could not review the chunk's changes: " .. tostring(rerr) end
    reply = { ok = res[1], out = table.concat(out), notes = notes }
    if not res[1] then
      reply.err = tostring(res[2])
    else
      local parts = {}
      for i = 2, table.maxn(res) do
        local rok, s = pcall(repl.render, res[i])
        parts[#parts + 1] = rok and s or ("<" .. type(res[i]) .. ">")
      end
      if #parts > 0 then reply.values = table.concat(parts, "\t") end
    end
  end
  self.applied[seq] = reply
  self.applied[seq - 64] = nil -- the last 64 are kept
  if not reply.ok then
    io.stderr:write(string.format("moonshard %s: rank %d: broadcast #%d failed: %s\n", self.name, self.rank, seq,
      (tostring(reply.err):match("^[^\n]*"))))
  end
  return reply
end
M.apply = apply

-- A reply as text: its output and values, or its error's first line; then its notes (each on a
-- line of its own, or after sep)
local function reply_text(r, sep)
  if not r then return "pending" end
  local s
  if r.ok then
    s = (r.out or "") .. (r.values or ((r.out or "") == "" and "ok" or ""))
  else
    s = (r.out or "") .. "error: " .. (tostring(r.err):match("^[^\n]*"))
  end
  s = s:gsub("\n$", "")
  for _, n in ipairs(r.notes or {}) do s = s .. (sep or "\n-- ") .. n end
  return s
end

-- live.broadcast(src) (from a session on rank 0) -> a summary line: src runs on every rank of the
-- job at the same step boundary: rank 0 sends it through the call channel that carries the runner
-- calls (moonshard.follow), then runs it; each follower runs it when it reaches it in that stream.
-- What a chunk may not change is undone on every rank, with the reason (runner sizes, the
-- process group, runner.chunk beyond its buffers). live.result(n) on a rank shows its own answer.
function Server:broadcast_src(src)
  if type(src) ~= "string" then error("live.broadcast(SOURCE): a string of Lua expected", 2) end
  if self.world > 1 and not self.group then
    error(string.format("live.broadcast: rank %d follows rank 0; broadcast from rank 0 (moonshard attach DIR --rank 0)",
      self.rank), 2)
  end
  local _, cerr = compile(src, "=broadcast")
  if cerr then error(cerr, 2) end
  local seq
  if self.group then
    local err
    seq, err = self.group:broadcast_fn(src, self.budget)
    if not seq then error("live.broadcast: " .. tostring(err), 2) end
  else
    self.seq = (self.seq or 0) + 1
    seq = self.seq
  end
  local r = apply(self, src, seq, self.budget)
  return string.format("broadcast #%d to %d rank%s (live.result(%d) on each): rank %d: %s", seq, self.world,
    self.world > 1 and "s" or "", seq, self.rank, (reply_text(r, "; "):gsub("\n", " ")))
end

-- live.result(n) -> what broadcast n did on this rank ("pending" before it arrived)
function Server:result_of(seq)
  return reply_text(self.applied[tonumber(seq)])
end

-- ------------------------------------------------------------------------------ sessions

local function new_session(self, conn, kind)
  local session = { conn = conn, kind = kind, authed = kind == "unix", budget = self.budget, buf = "" }
  local env = { live = self }
  for k, v in pairs(self.scope) do env[k] = v end
  env.print = function(...)
    if not session.out then return print(...) end
    local parts = {}
    for i = 1, select("#", ...) do parts[i] = tostring((select(i, ...))) end
    local line = table.concat(parts, "\t") .. "\n"
    if session.out_n + #line <= M.MAX_OUTPUT then
      session.out[#session.out + 1] = line
      session.out_n = session.out_n + #line
    elseif not session.out_cut then
      session.out[#session.out + 1] = "... (output cut at " .. M.MAX_OUTPUT .. " bytes)\n"
      session.out_n = M.MAX_OUTPUT + 1
    end
  end
  session.env = setmetatable(env, { __index = _G })
  return session
end

local function send(session, msg, done)
  if session.conn:is_closing() then return end
  local ok, line = pcall(cjson.encode, msg)
  if not ok then line = cjson.encode { id = msg.id, ok = false, err = "reply not encodable: " .. tostring(line) } end
  session.conn:write(line .. "\n", done)
end

local function drop(self, session)
  self.sessions[session] = nil
  if not session.conn:is_closing() then session.conn:close() end
end

local function handle(self, session, msg)
  local reply
  if type(msg) ~= "table" then
    reply = { ok = false, err = "a request is a JSON object" }
  elseif not session.authed then
    if msg.op == "auth" and type(msg.token) == "string" and msg.token == self.token then
      session.authed = true
      reply = { ok = true }
    else
      self.sessions[session] = nil
      session.conn:read_stop()
      return send(session, { id = msg.id, ok = false, err = "refused: this TCP session sent no valid token" },
        function() if not session.conn:is_closing() then session.conn:close() end end)
    end
  elseif msg.op == "hello" then
    reply = { ok = true, rank = self.rank, world = self.world, pid = uv.os_getpid(), name = self.name,
      budget = session.budget, dir = self.dir, socket = self.path, version = require("moonshard.host").version }
  elseif msg.op == "eval" and type(msg.src) == "string" then
    reply = eval(self, session, msg.src)
  elseif msg.op == "budget" and tonumber(msg.seconds) and tonumber(msg.seconds) > 0 then
    session.budget = tonumber(msg.seconds)
    reply = { ok = true, values = tostring(session.budget) }
  else
    reply = { ok = false, err = "unknown request (hello, eval, budget)" }
  end
  reply.id = msg.id
  send(session, reply)
end

-- Runs the complete lines received; waits (a 1 ms timer) while an engine step is in progress.
local function pump(self, session)
  if session.busy then return end
  local engine = self.scope.engine
  if engine and engine.stepping then
    local t = uv.new_timer()
    t:start(1, 0, function() t:close() pump(self, session) end)
    return
  end
  session.busy = true
  while self.sessions[session] do
    local line, rest = session.buf:match("^([^\n]*)\n(.*)$")
    if not line then break end
    session.buf = rest
    local ok, msg = pcall(cjson.decode, line)
    local hok, herr = pcall(handle, self, session, ok and msg or nil)
    if not hok then send(session, { ok = false, err = "internal: " .. tostring(herr) }) end
  end
  session.busy = false
end

local function accept(self, server, kind)
  local conn = kind == "unix" and uv.new_pipe(false) or uv.new_tcp()
  if not server:accept(conn) then conn:close() return end
  conn:unref() -- a session does not keep a finished script alive
  if kind == "unix" then
    cred_len[0] = 12
    local fd = conn:fileno()
    if fd and C.getsockopt(fd, SOL_SOCKET, SO_PEERCRED, cred, cred_len) == 0 then
      local uid, me = tonumber(ffi.cast("uint32_t", cred[1])), tonumber(C.geteuid())
      if uid ~= me and uid ~= 0 then
        conn:write(cjson.encode { ok = false, err = string.format("refused: uid %d does not own this rank (uid %d)", uid, me) } .. "\n",
          function() conn:close() end)
        io.stderr:write(string.format("moonshard %s: refused a REPL session from uid %d\n", self.name, uid))
        return
      end
    end
  end
  local session = new_session(self, conn, kind)
  self.sessions[session] = true
  conn:read_start(function(err, data)
    if err or not data then return drop(self, session) end
    session.buf = session.buf .. data
    if #session.buf > 64 * 1024 * 1024 then return drop(self, session) end
    pump(self, session)
  end)
end

-- ------------------------------------------------------------------------------ listening

-- A peer that went away must not take this process with it: writing to it fails with EPIPE
-- instead of raising SIGPIPE (both ends call this).
function M.ignore_sigpipe()
  C.signal(13, ffi.cast("void (*)(int)", 1)) -- SIGPIPE, SIG_IGN
end

-- M.listen(opts) -> server | nil, message. Never raises: a rank that cannot listen still runs.
--   opts.engine, opts.model, opts.pg, opts.telemetry (in the sessions' scope; scheduler and
--   runner are taken from the engine and the model unless given), opts.name (the command, for
--   messages and the folder), opts.dir (run folder), opts.tcp ("HOST:PORT" or "tcp:HOST:PORT"),
--   opts.token, opts.budget (seconds), opts.quiet (print nothing), opts.scope (more names in the
--   sessions' scope)
function M.listen(opts)
  opts = opts or {}
  local ok, res, err = pcall(M.listen_unprotected, opts)
  if not ok then res, err = nil, tostring(res) end
  if not res and err and not opts.quiet then
    io.stderr:write("moonshard ", opts.name or "live", ": no REPL: ", err, "\n")
  end
  return res, err
end

function M.listen_unprotected(opts)
  local name = opts.name or "moonshard"
  local spec = opts.tcp or os.getenv("MSH_REPL")
  if spec == "off" or os.getenv("MSH_REPL") == "off" then return nil end
  M.ignore_sigpipe()
  local engine, model, pg = opts.engine, opts.model, opts.pg or (opts.model and opts.model.dist)
  local rank = pg and pg.rank or tonumber(os.getenv("RANK") or "") or 0
  local world = pg and pg.world or tonumber(os.getenv("WORLD_SIZE") or "") or 1
  local self = setmetatable({
    name = name, rank = rank, world = world, sessions = {},
    budget = opts.budget or tonumber(os.getenv("MSH_REPL_BUDGET") or "") or M.DEFAULT_BUDGET,
    scope = {
      engine = engine, model = model, pg = pg, telemetry = opts.telemetry, uv = uv,
      scheduler = opts.scheduler or (engine and engine.sched),
      runner = opts.runner or (engine and engine.net) or (model and model.net),
    },
    -- a job of several ranks (moonshard.follow): rank 0's group of followers, or this follower;
    -- broadcasts run over the runner itself
    group = opts.group, follower = opts.follower, applied = {},
    raw_runner = (opts.group and opts.group.raw) or (opts.follower and opts.follower.raw),
  }, Server)
  for k, v in pairs(opts.scope or {}) do self.scope[k] = v end -- a command's own names (eval's progress)
  local r = self.raw_runner or self.scope.runner
  self.limits = { chunk = type(r) == "table" and r.chunk or nil }
  self.broadcast = function(a, b) if a == self then a = b end return self:broadcast_src(a) end
  self.result = function(a, b) if a == self then a = b end return self:result_of(a) end
  if opts.follower then opts.follower.on_fn = function(src, seq, budget) apply(self, src, seq, budget) end end
  local dir, made = opts.dir, false
  if not dir then
    dir, made = M.run_dir(name)
    if not dir then return nil, made end
  end
  self.dir, self.made_dir = dir, made
  local stem = string.format("%s/rank%d.repl", dir, rank)
  local path = stem .. ".sock"
  if #path > 100 then -- sun_path holds 108 bytes: a short private path, named in the .json
    local base = M.private_base()
    if base then path = string.format("%s/%d-r%d.sock", base, uv.os_getpid(), rank) end
  end
  -- a socket left by a rank that is gone is replaced; one of a live rank is not
  local prev = read_file(stem .. ".json")
  local pok, pinfo = pcall(cjson.decode, prev or "")
  if pok and type(pinfo) == "table" and pinfo.pid ~= uv.os_getpid() and pid_alive(pinfo.pid) then
    return nil, string.format("%s: rank %d of another job (pid %d) listens there", dir, rank, pinfo.pid)
  end
  os.remove(path)
  local pipe = uv.new_pipe(false)
  local old = C.umask(tonumber("177", 8))
  local bok, berr = pipe:bind(path)
  C.umask(old)
  if not bok then
    pipe:close()
    return nil, string.format("cannot listen on %s: %s", path, tostring(berr))
  end
  uv.fs_chmod(path, tonumber("600", 8))
  local lok, lerr = pipe:listen(16, function(e) if not e then accept(self, pipe, "unix") end end)
  if not lok then
    pipe:close()
    os.remove(path)
    return nil, string.format("cannot listen on %s: %s", path, tostring(lerr))
  end
  pipe:unref()
  self.pipe, self.path, self.stem = pipe, path, stem

  if spec and spec ~= "" then
    local host, port, named = M.parse_tcp(spec)
    if not host then self:close() return nil, port end
    self.token = opts.token or os.getenv("MSH_REPL_TOKEN") or random_token()
    local tcp = uv.new_tcp()
    local tok, terr = tcp:bind(host, port)
    if tok then tok, terr = tcp:listen(16, function(e) if not e then accept(self, tcp, "tcp") end end) end
    if not tok then
      tcp:close()
      self:close()
      return nil, string.format("cannot listen on tcp:%s:%d: %s", host, port, tostring(terr))
    end
    tcp:unref()
    self.tcp_handle = tcp
    local a = tcp:getsockname()
    self.tcp = string.format("%s:%d", a.ip, a.port)
    self.tcp_named = named
    write_file(stem .. ".token", self.token .. "\n")
  end
  write_file(stem .. ".json", cjson.encode {
    rank = rank, world = world, pid = uv.os_getpid(), socket = path, tcp = self.tcp, name = name,
    uid = tonumber(C.geteuid()), started = os.time(),
  } .. "\n")
  -- the files go when the Lua state closes (a normal exit); os.exit and signals leave them to
  -- the next run's sweep and to the launcher
  local sentinel = newproxy(true)
  getmetatable(sentinel).__gc = function() self:cleanup() end
  self.sentinel = sentinel
  M.servers[#M.servers + 1] = self
  if not opts.quiet then
    local who = world > 1 and string.format(" (rank %d)", rank) or ""
    io.stderr:write(string.format("moonshard %s: REPL%s on unix:%s (moonshard attach %s%s)\n", name, who, path, dir,
      world > 1 and (" --rank " .. rank) or ""))
    if self.tcp then
      io.stderr:write(string.format("moonshard %s: REPL on tcp:%s%s; token in %s.token\n", name, self.tcp,
        named and " (beyond loopback: asked by name)" or "", stem))
    end
    io.stderr:flush()
  end
  return self
end

function Server:cleanup()
  if self.cleaned then return end
  self.cleaned = true
  if self.path then os.remove(self.path) end
  for _, ext in ipairs { ".json", ".token" } do os.remove(self.stem .. ext) end
  if self.made_dir then uv.fs_rmdir(self.dir) end
end

-- server:close(): ends the sessions, stops listening, removes the files.
function Server:close()
  for s in pairs(self.sessions) do drop(self, s) end
  for _, k in ipairs { "pipe", "tcp_handle" } do
    local h = self[k]
    if h and not h:is_closing() then h:close() end
  end
  if self.stem then self:cleanup() end
end

-- M.poll(): serves pending sessions once from a script that keeps the loop busy itself (a
-- synchronous benchmark between repetitions, an evaluation between scoring batches); does
-- nothing inside a loop callback. The listeners and sessions do not keep the loop alive (they are
-- unreferenced, so that a finished script ends), and libuv does not poll a loop with nothing
-- alive: they are referenced for the poll, then released again.
function M.poll()
  local held = {}
  local function hold(h)
    if h and pcall(function() if not h:is_closing() then h:ref(); held[#held + 1] = h end end) then return end
  end
  for _, srv in ipairs(M.servers) do
    hold(srv.pipe)
    hold(srv.tcp_handle)
    for session in pairs(srv.sessions) do hold(session.conn) end
  end
  if #held == 0 then return end
  -- accepting, reading a request and writing its answer take a turn each
  for _ = 1, 3 do pcall(uv.run, "nowait") end
  for _, h in ipairs(held) do pcall(function() if not h:is_closing() then h:unref() end end) end
end

return M
