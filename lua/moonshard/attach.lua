-- moonshard.attach: the client end of moonshard.live. `moonshard attach [RUN_DIR|SOCKET|tcp:HOST:PORT]
-- [--rank R]` opens a REPL in a running rank: the reader of `moonshard repl` (libedit line editing
-- and history, multi-line input), each complete chunk sent to the rank and run there between two
-- engine steps; tracebacks come back and the session goes on.
--
--   local attach = require "moonshard.attach"
--   local s = assert(attach.connect(assert(attach.find(run_dir, 0))))
--   local r = s:eval("engine:stats().waiting")   -- { ok, values = "32", out, err, notes }
--   s:close()
--
-- Commands (a line starting with ':'): :ranks, :all EXPR, :all! CHUNK, :watch EXPR SECONDS [TIMES], :undo,
-- :budget SECONDS, :help. The client waits on its own libuv loop (uv.run "once"), so it is used
-- from a script's main chunk, not from inside a loop callback.
local uv = require "luv"
local cjson = require "cjson"
local live = require "moonshard.live"

local M = {}

M.usage = [[
usage: moonshard attach [RUN_DIR | SOCKET | tcp:HOST:PORT] [--rank R] [--token T] [-e CHUNK ...]

Opens a REPL inside a running rank (serve, bench, a script under moonshard launch): statements run
on the rank's loop between engine steps with engine, scheduler, runner, model, telemetry and pg in
scope. Without a target, the one live run of yours is taken (MSH_LOG_DIR, then ./logs/*, then
$XDG_RUNTIME_DIR/moonshard-UID or /tmp/moonshard-UID). -e runs CHUNK (or a :command) and exits.

commands:
  :ranks                      the job's ranks (pid, state, socket)
  :all EXPR                   EXPR on every rank, the answers side by side
  :all! CHUNK                 CHUNK run by every rank at the same step boundary, sent by rank 0
                              with its runner calls (live.broadcast); what each rank answered
  :watch EXPR SECONDS [TIMES] re-evaluate and redraw every SECONDS until Enter or Ctrl-C
  :undo                       restore the scheduling policy before the last change
  :budget SECONDS             time limit of each chunk on the rank (default 2)
  :help                       this list
]]

-- ------------------------------------------------------------------------------ finding ranks

local function decode_file(path)
  local s = live.read_file(path)
  if not s then return nil end
  local ok, v = pcall(cjson.decode, s)
  return ok and type(v) == "table" and v or nil
end

-- M.ranks(dir) -> { { rank, pid, socket, tcp, alive, name } ... } in rank order (from the ranks'
-- rank<R>.repl.json, and launch.json for ranks that have not written theirs)
function M.ranks(dir)
  local by, list = {}, {}
  local it = uv.fs_scandir(dir)
  while it do
    local f = uv.fs_scandir_next(it)
    if not f then break end
    local r = f:match("^rank(%d+)%.repl%.json$")
    if r then
      local info = decode_file(dir .. "/" .. f)
      if info then
        info.rank = tonumber(r)
        by[info.rank] = info
      end
    end
  end
  local desc = decode_file(dir .. "/launch.json")
  for _, r in ipairs(desc and desc.ranks or {}) do
    if not by[r.rank] then by[r.rank] = { rank = r.rank, pid = r.pid, socket = r.repl, starting = true } end
  end
  for _, info in pairs(by) do
    info.alive = live.pid_alive(info.pid)
    list[#list + 1] = info
  end
  table.sort(list, function(a, b) return a.rank < b.rank end)
  return list
end

local function is_dir(p) local st = uv.fs_stat(p) return st and st.type == "directory" end

local function live_runs(dir, out)
  local it = uv.fs_scandir(dir)
  while it do
    local f, kind = uv.fs_scandir_next(it)
    if not f then break end
    local d = dir .. "/" .. f
    if kind == "directory" then
      for _, r in ipairs(M.ranks(d)) do
        if r.alive and r.socket then out[#out + 1] = d break end
      end
    end
  end
end

-- M.find(target, rank, token) -> endpoint { kind = "unix", path, dir } | { kind = "tcp", host,
-- port, token } | nil, message
function M.find(target, rank, token)
  rank = rank or 0
  if target and target:match("^tcp:") then
    local host, port = live.parse_tcp(target)
    if not host then return nil, port end
    token = token or os.getenv("MSH_REPL_TOKEN")
    if not token then return nil, "a TCP session needs the rank's token (--token T or MSH_REPL_TOKEN)" end
    return { kind = "tcp", host = host, port = port, token = token }
  end
  if not target then
    local runs = {}
    local env = os.getenv("MSH_LOG_DIR")
    if env and env ~= "" and is_dir(env) and #M.ranks(env) > 0 then runs[1] = env end
    if #runs == 0 then live_runs(uv.cwd() .. "/logs", runs) end
    if #runs == 0 then
      local base = live.private_base()
      if base then live_runs(base, runs) end
    end
    if #runs == 0 then return nil, "no live run found: name its run folder or socket (printed on its stderr)" end
    if #runs > 1 then
      return nil, "several live runs; name one:\n  " .. table.concat(runs, "\n  ")
    end
    target = runs[1]
  end
  local st = uv.fs_stat(target)
  if not st then return nil, target .. ": no such run folder or socket" end
  if st.type == "socket" then
    local dir = target:match("^(.*)/[^/]*$") or "."
    return { kind = "unix", path = target, dir = dir }
  end
  if st.type ~= "directory" then return nil, target .. ": neither a run folder nor a socket" end
  for _, r in ipairs(M.ranks(target)) do
    if r.rank == rank then
      if not r.alive then return nil, string.format("rank %d of %s is not running (pid %s)", rank, target, tostring(r.pid)) end
      return { kind = "unix", path = r.socket, dir = target }
    end
  end
  return nil, string.format("%s: no rank %d listens there (see the rank's stderr)", target, rank)
end

-- ------------------------------------------------------------------------------ a session

local Session = {}
Session.__index = Session

-- Runs the loop until done() or the timeout; returns true when done.
local function wait(done, timeout)
  local timer, expired = uv.new_timer(), false
  timer:start(math.floor(timeout * 1000), 0, function() expired = true end)
  while not done() and not expired do uv.run("once") end
  timer:close()
  uv.run("nowait")
  return done()
end

-- M.connect(endpoint, timeout?) -> session | nil, message
function M.connect(ep, timeout)
  timeout = timeout or 10
  live.ignore_sigpipe() -- a rank that refuses us closes first
  local conn = ep.kind == "tcp" and uv.new_tcp() or uv.new_pipe(false)
  local self = setmetatable({ conn = conn, buf = "", replies = {}, next_id = 0, ep = ep }, Session)
  local connected, cerr = false, nil
  local function on_connect(err)
    connected, cerr = true, err
  end
  if ep.kind == "tcp" then conn:connect(ep.host, ep.port, on_connect) else conn:connect(ep.path, on_connect) end
  if not wait(function() return connected end, timeout) then
    conn:close()
    return nil, "timed out connecting to " .. (ep.path or (ep.host .. ":" .. ep.port))
  end
  if cerr then
    conn:close()
    return nil, string.format("cannot connect to %s: %s", ep.path or (ep.host .. ":" .. ep.port), tostring(cerr))
  end
  conn:read_start(function(err, data)
    if err or not data then
      self.closed = err or "the rank closed the session"
      return
    end
    self.buf = self.buf .. data
    while true do
      local line, rest = self.buf:match("^([^\n]*)\n(.*)$")
      if not line then break end
      self.buf = rest
      local ok, msg = pcall(cjson.decode, line)
      if ok and type(msg) == "table" then
        self.replies[msg.id or "none"] = msg
      end
    end
  end)
  if ep.kind == "tcp" then
    local r, err = self:call({ op = "auth", token = ep.token }, timeout)
    if not r or not r.ok then
      self:close()
      return nil, r and r.err or err
    end
  end
  local hello, herr = self:call({ op = "hello" }, timeout)
  if not hello or not hello.ok then
    self:close()
    return nil, hello and hello.err or herr
  end
  self.info = hello
  return self
end

-- session:call(msg, timeout?) -> reply | nil, message
function Session:call(msg, timeout)
  if self.closed then return nil, self.closed end
  self.next_id = self.next_id + 1
  local id = self.next_id
  msg.id = id
  self.conn:write(cjson.encode(msg) .. "\n")
  local function done() return self.replies[id] or self.replies.none or self.closed end
  if not wait(done, timeout or 3600) then return nil, "no answer from the rank" end
  local r = self.replies[id] or self.replies.none
  self.replies[id], self.replies.none = nil, nil
  if not r then return nil, self.closed end
  return r
end

function Session:eval(src, timeout) return self:call({ op = "eval", src = src }, timeout) end

function Session:close()
  if not self.conn:is_closing() then self.conn:close() end
  uv.run("nowait")
end

-- ------------------------------------------------------------------------------ the front end

-- One answer as text (values, or the error's first line when short is set).
local function answer_text(r, short)
  if not r then return "(no answer)" end
  if not r.ok then
    local e = tostring(r.err or "error")
    return short and ("error: " .. (e:match("^[^\n]*"))) or e
  end
  local s = (r.out or "") .. (r.values or "")
  for _, n in ipairs(r.notes or {}) do s = s .. "\n-- " .. n end
  s = s:gsub("\n$", "")
  return short and (s:gsub("\t", "  ")) or s
end

-- Lines of text side by side in columns of equal width, one per rank.
function M.side_by_side(heads, texts, width)
  local n = #texts
  local colw = math.max(12, math.floor((width - 3 * (n - 1)) / n))
  local cols, rows = {}, 0
  for i, t in ipairs(texts) do
    local lines = {}
    for line in (t .. "\n"):gmatch("([^\n]*)\n") do
      repeat
        lines[#lines + 1] = line:sub(1, colw)
        line = line:sub(colw + 1)
      until line == ""
    end
    cols[i] = lines
    rows = math.max(rows, #lines)
  end
  local out = {}
  local function row(cells)
    for i = 1, n do cells[i] = cells[i] .. string.rep(" ", colw - #cells[i]) end
    out[#out + 1] = (table.concat(cells, " | "):gsub("%s+$", ""))
  end
  row(heads)
  local rule = {}
  for i = 1, n do rule[i] = string.rep("-", colw) end
  out[#out + 1] = table.concat(rule, "-+-")
  for j = 1, rows do
    local cells = {}
    for i = 1, n do cells[i] = cols[i][j] or "" end
    row(cells)
  end
  return table.concat(out, "\n") .. "\n"
end

local function term_width()
  local w = tonumber(os.getenv("COLUMNS") or "")
  if w then return w end
  -- only a terminal has a width (and luv keeps what it allocated for a refused one)
  if uv.guess_handle(1) ~= "tty" then return 100 end
  local ok, tty = pcall(uv.new_tty, 1, false)
  if ok and tty then
    local cw = tty:get_winsize()
    tty:close()
    if cw and cw > 0 then return cw end
  end
  return 100
end

-- The client: M.client(session, out, err) -> { eval = fn, command = fn } for repl.run
function M.client(session, out, err_out)
  local dir = session.ep.dir
  local others = {} -- rank -> session of :all
  local function show(r)
    if not r then
      err_out:write("moonshard attach: ", tostring(session.closed or "no answer"), "\n")
      return false
    end
    if r.out and r.out ~= "" then out:write(r.out) end
    if r.ok and r.values then out:write(r.values, "\n") end
    for _, n in ipairs(r.notes or {}) do out:write("-- ", n, "\n") end
    if not r.ok then err_out:write(tostring(r.err), "\n") end
    out:flush()
    return r.ok
  end
  local function eval(src)
    local r, err = session:eval(src)
    if not r then
      err_out:write("moonshard attach: ", tostring(err), "\n")
      return false
    end
    return show(r)
  end
  local function ranks()
    if not dir then return {} end
    return M.ranks(dir)
  end
  local function session_for(info)
    if info.rank == session.info.rank then return session end
    local s = others[info.rank]
    if s and not s.closed then return s end
    local err
    s, err = M.connect({ kind = "unix", path = info.socket, dir = dir }, 5)
    others[info.rank] = s
    return s, err
  end
  local commands = {}
  commands.help = function() out:write((M.usage:match("commands:\n(.*)$"))) return true end
  commands.ranks = function()
    local list = ranks()
    if #list == 0 then list = { { rank = session.info.rank, pid = session.info.pid, alive = true, socket = session.ep.path } } end
    out:write(string.format("%-5s %-8s %-9s %s\n", "rank", "pid", "state", "socket"))
    for _, r in ipairs(list) do
      local state = r.alive and (r.rank == session.info.rank and "attached" or "running") or "gone"
      out:write(string.format("%-5d %-8s %-9s %s\n", r.rank, tostring(r.pid), state, tostring(r.socket)))
    end
    return true
  end
  commands.all = function(expr)
    if expr == "" then err_out:write(":all EXPR\n") return false end
    local list, heads, texts = ranks(), {}, {}
    if #list == 0 then list = { { rank = session.info.rank, alive = true } } end
    for _, info in ipairs(list) do
      heads[#heads + 1] = "rank " .. info.rank
      local s, err = info.alive and session_for(info)
      if not s then
        texts[#texts + 1] = "(" .. (info.alive and tostring(err) or "gone") .. ")"
      else
        local r, rerr = s:eval(expr)
        texts[#texts + 1] = r and answer_text(r, true) or ("(" .. tostring(rerr) .. ")")
      end
    end
    out:write(M.side_by_side(heads, texts, term_width()))
    return true
  end
  -- :all! CHUNK: rank 0 broadcasts CHUNK (live.broadcast) through the channel of its runner
  -- calls, so every rank runs it at the same step boundary; then each rank's answer side by side
  commands["all!"] = function(src)
    if src == "" then err_out:write(":all! CHUNK\n") return false end
    local list = ranks()
    if #list == 0 then list = { { rank = session.info.rank, alive = true } } end
    local s0, err = session, nil
    if session.info.rank ~= 0 then
      s0 = nil
      for _, info in ipairs(list) do
        if info.rank == 0 and info.alive then s0, err = session_for(info) end
      end
      if not s0 then err_out:write("moonshard attach: rank 0: ", tostring(err or "not running"), "\n") return false end
    end
    local r
    r, err = s0:eval(string.format("live.broadcast(%q)", src))
    if not r or not r.ok then
      err_out:write(tostring(r and r.err or err), "\n")
      return false
    end
    local seq = tonumber((r.values or ""):match("broadcast #(%d+)"))
    if not seq then err_out:write("moonshard attach: rank 0 answered ", tostring(r.values), "\n") return false end
    local heads, texts = {}, {}
    for _, info in ipairs(list) do
      heads[#heads + 1] = "rank " .. info.rank
      local s, serr = info.alive and session_for(info)
      local text = "(" .. (info.alive and tostring(serr) or "gone") .. ")"
      uv.update_time()
      local deadline = uv.now() + 10000
      while s do -- a follower runs it once it reaches it among rank 0's calls
        local a = s:eval(string.format("print(live.result(%d))", seq))
        text = a and (a.ok and (a.out or ""):gsub("\n$", "") or ("error: " .. tostring(a.err))) or "(no answer)"
        if text ~= "pending" or uv.now() > deadline then break end
        wait(function() return false end, 0.05)
      end
      texts[#texts + 1] = text
    end
    out:write(M.side_by_side(heads, texts, term_width()))
    return true
  end
  commands.watch = function(rest)
    local expr, secs, times = rest:match("^(.-)%s+([%d.]+)%s+(%d+)$")
    if not expr then expr, secs = rest:match("^(.-)%s+([%d.]+)$") end
    secs, times = tonumber(secs), tonumber(times)
    if not expr or expr == "" or not secs or secs <= 0 then
      err_out:write(":watch EXPR SECONDS [TIMES]\n")
      return false
    end
    local interactive = require("ffi").C.isatty(0) ~= 0
    local stop = false
    local sig = uv.new_signal()
    sig:start("sigint", function() stop = true end)
    local poll
    if interactive then
      poll = uv.new_poll(0)
      poll:start("r", function()
        io.stdin:read("*l")
        stop = true
      end)
    end
    local n = 0
    while not stop do
      n = n + 1
      local r = session:eval(expr)
      if not r then break end
      if interactive and out == io.stdout then out:write("\27[H\27[2J") end
      out:write(string.format("every %gs: %s   (%s) [%s]\n", secs, expr,
        interactive and "Enter or Ctrl-C stops" or ("#" .. n), os.date("%H:%M:%S")))
      out:write(answer_text(r), "\n")
      out:flush()
      if times and n >= times then break end
      wait(function() return stop end, secs)
    end
    sig:close()
    if poll then poll:close() end
    uv.run("nowait")
    return not session.closed
  end
  commands.undo = function() return eval("scheduler:undo()") end
  commands.budget = function(s)
    local r = session:call({ op = "budget", seconds = tonumber(s) })
    return show(r)
  end
  local function command(line)
    local name, rest = line:match("^:(%S+)%s*(.-)$")
    local f = name and commands[name]
    if not f then
      err_out:write("unknown command ", line, " (:help lists them)\n")
      return false
    end
    return f(rest or "")
  end
  return { eval = eval, command = command, close = function()
    for _, s in pairs(others) do s:close() end
  end }
end

-- M.main(argv) -> exit code
function M.main(argv)
  local target, rank, token, chunks = nil, 0, nil, {}
  local i = 1
  while i <= #argv do
    local a = argv[i]
    if a == "--help" or a == "-h" then
      io.stdout:write(M.usage)
      return 0
    elseif a == "--rank" or a == "--token" or a == "-e" then
      local v = argv[i + 1]
      if not v then io.stderr:write("moonshard attach: ", a, " needs a value\n") return 2 end
      if a == "--rank" then
        rank = tonumber(v)
        if not rank or rank < 0 or rank % 1 ~= 0 then io.stderr:write("moonshard attach: --rank expects a rank\n") return 2 end
      elseif a == "--token" then token = v
      else chunks[#chunks + 1] = v end
      i = i + 1
    elseif a:match("^%-") then
      io.stderr:write("moonshard attach: unknown option ", a, " (see `moonshard attach --help`)\n")
      return 2
    elseif target then
      io.stderr:write("moonshard attach: one run folder or socket, not two\n")
      return 2
    else
      target = a
    end
    i = i + 1
  end
  local ep, err = M.find(target, rank, token)
  if not ep then io.stderr:write("moonshard attach: ", err, "\n") return 1 end
  local session
  session, err = M.connect(ep)
  if not session then io.stderr:write("moonshard attach: ", err, "\n") return 1 end
  local client = M.client(session, io.stdout, io.stderr)
  local failures = 0
  if #chunks > 0 then
    for _, c in ipairs(chunks) do
      local ok
      if c:match("^%s*:") then ok = client.command(c:match("^%s*(.-)%s*$")) else ok = client.eval(c) end
      if not ok then failures = failures + 1 end
    end
  else
    local info = session.info
    local banner = string.format("attached to %s rank %d of %d (pid %d; each chunk may run %g s); :help, Ctrl-D detaches",
      info.name or "?", info.rank, info.world, info.pid, info.budget)
    local interactive
    failures, interactive = require("moonshard.repl").run { eval = client.eval, command = client.command, banner = banner }
    if interactive then failures = 0 end
  end
  client.close()
  session:close()
  return failures > 0 and 1 or 0
end

return M
