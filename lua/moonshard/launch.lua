-- moonshard.launch: `moonshard launch -n N [options] SCRIPT|NAME args...` starts N local ranks
-- of the moonshard executable on this process's libuv loop and watches them.
--
-- Each rank gets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT (a free
-- port when none is given on one node), OMP_NUM_THREADS (cores / N unless set) and
-- MOONSHARD_LAUNCHER_PID; a rank dies with the launcher (PR_SET_PDEATHSIG).
--
-- Output: rank 0's stdout passes through untouched (so `launch -n 2 generate ...` prints the
-- text as one process would); every other stream is tagged line by line with "[rank R] " (stdout
-- to stdout, stderr to stderr). --tag-output tags rank 0's stdout too. Only rank 0 reads stdin.
--
-- Logs: the run's log folder (--log-dir DIR, else MSH_LOG_DIR, else logs/<date>-<time>-<pid>/
-- under the current directory) is made before the ranks start, named on stderr and passed to them as MSH_LOG_DIR;
-- each rank writes its JSON Lines events there (moonshard.telemetry). A folder the launcher made
-- that is still empty when the ranks are gone is removed again (and logs/ with it when empty).
-- While the ranks run, launch.json there names each rank's pid and REPL socket
-- (rank<R>.repl.sock: moonshard.live; `moonshard attach DIR --rank R`).
--
-- Time limits: --timeout S stops the ranks after S seconds (naming those still running, exit
-- 124); --collective-timeout S (MSH_COLLECTIVE_TIMEOUT) is how long a rank's collective waits for
-- a stalled or dead peer before failing with that peer's rank (default 600 s).
--
-- Exit: 0 when every rank exits 0. When a rank fails (non-zero status or a signal), the launcher
-- says which ("rank 1 exited on signal 9 (SIGKILL)"), sends SIGTERM to the others, SIGKILL after
-- the grace period, and exits with that rank's status (128 + signal for a signal). SIGINT,
-- SIGTERM and SIGHUP sent to the launcher are forwarded to the ranks, which are then stopped the
-- same way.
local uv = require "luv"
local host = require "moonshard.host"

local M = {}

M.usage = [[
usage: moonshard launch -n N [options] SCRIPT|NAME [args...]

Starts N ranks of `moonshard SCRIPT args...` on this node.

options:
  -n, --nproc-per-node N  ranks on this node (required)
  --nnodes K              nodes in the job (default 1)
  --node-rank I           this node's index, 0 .. K-1 (default 0)
  --master-addr A         address of rank 0's node (default 127.0.0.1)
  --master-port P         rendezvous port (default: a free port on one node, 29500 on several)
  --tag-output            prefix rank 0's stdout with "[rank 0] " too
  --log-dir DIR           the run's log folder, passed to the ranks as MSH_LOG_DIR
                          (default: $MSH_LOG_DIR, else logs/<date>-<time>-<pid>)
  --grace S               seconds between SIGTERM and SIGKILL when stopping ranks (default 5)
  --timeout S             stop every rank after S seconds and exit 124 (default: no limit)
  --collective-timeout S  a collective waiting this long for a peer fails naming it
                          (MSH_COLLECTIVE_TIMEOUT; default 600)
  --plan FILE.json        run a plan (moonshard plan --json): its ranks, nodes, command and flags;
                          other launch options follow it
  --help                  show this help

Rank 0's stdout passes through as is; the other ranks' output and every stderr line are prefixed
with "[rank R] ". The launcher exits with the first failing rank's status. At most
]] .. "%d ranks a node (MSH_MAX_LOCAL_RANKS raises it).\n"

-- The most ranks one launcher starts (each rank is a process with its own threads and model).
M.MAX_LOCAL_RANKS = tonumber(os.getenv("MSH_MAX_LOCAL_RANKS") or "") or 256
M.usage = string.format(M.usage, M.MAX_LOCAL_RANKS)

local SIGNALS = {
  [1] = "SIGHUP", [2] = "SIGINT", [3] = "SIGQUIT", [4] = "SIGILL", [6] = "SIGABRT", [7] = "SIGBUS",
  [8] = "SIGFPE", [9] = "SIGKILL", [10] = "SIGUSR1", [11] = "SIGSEGV", [12] = "SIGUSR2",
  [13] = "SIGPIPE", [14] = "SIGALRM", [15] = "SIGTERM",
}
M.signal_name = function(s) return SIGNALS[s] or ("signal " .. tostring(s)) end

-- M.parse(argv) -> opts, script, script_args | nil, message | "help"
function M.parse(argv)
  local o = { nnodes = 1, node_rank = 0, master_addr = "127.0.0.1", grace = 5 }
  local i = 1
  local function value(name)
    i = i + 1
    local v = argv[i]
    if v == nil then return nil, name .. " needs a value" end
    return v
  end
  local ints = {
    ["-n"] = "nproc", ["--nproc-per-node"] = "nproc", ["--nproc_per_node"] = "nproc", ["--nnodes"] = "nnodes",
    ["--node-rank"] = "node_rank", ["--node_rank"] = "node_rank", ["--master-port"] = "master_port",
    ["--master_port"] = "master_port",
  }
  while i <= #argv do
    local a = argv[i]
    local name, inline = a:match("^(%-%-?[%w%-_]+)=(.*)$")
    if name then a = name end
    local function get()
      if inline then return inline end
      return value(a)
    end
    if a == "--help" or a == "-h" then
      return nil, "help"
    elseif ints[a] then
      local v, err = get()
      if not v then return nil, err end
      local n = tonumber(v)
      if not n or n % 1 ~= 0 or n < 0 then return nil, string.format("%s expects a non-negative integer, got '%s'", a, v) end
      o[ints[a]] = n
    elseif a == "--master-addr" or a == "--master_addr" then
      local v, err = get()
      if not v then return nil, err end
      o.master_addr = v
    elseif a == "--grace" or a == "--timeout" or a == "--collective-timeout" or a == "--collective_timeout" then
      local v, err = get()
      if not v then return nil, err end
      local n = tonumber(v)
      -- finite seconds; a time limit of 0 means none, a collective timeout must be positive
      if not n or n ~= n or n == math.huge or n < 0 or (a:match("collective") and n == 0) then
        return nil, string.format("%s expects a finite number of seconds%s, got '%s'", a,
          a:match("collective") and " above 0" or "", v)
      end
      if a == "--grace" then o.grace = n elseif a == "--timeout" then o.timeout = n else o.collective_timeout = n end
    elseif a == "--tag-output" then
      o.tag_output = true
    elseif a == "--log-dir" or a == "--log_dir" then
      local v, err = get()
      if not v then return nil, err end
      if v == "" then return nil, "--log-dir needs a folder" end
      o.log_dir = v
    elseif a:match("^%-") then
      return nil, "unknown option " .. a
    else
      break
    end
    i = i + 1
  end
  if not o.nproc then return nil, "-n N (ranks on this node) is required" end
  if o.nproc < 1 then return nil, "-n must be at least 1" end
  if o.nproc > M.MAX_LOCAL_RANKS then
    return nil, string.format("-n %d is more ranks than one node runs here (at most %d; MSH_MAX_LOCAL_RANKS raises it)",
      o.nproc, M.MAX_LOCAL_RANKS)
  end
  if o.nnodes < 1 then return nil, "--nnodes must be at least 1" end
  if o.node_rank >= o.nnodes then
    return nil, string.format("--node-rank %d outside %d nodes", o.node_rank, o.nnodes)
  end
  if o.master_port and (o.master_port < 1 or o.master_port > 65535) then
    return nil, "--master-port must be in 1..65535"
  end
  local script = argv[i]
  if not script then return nil, "no script or command to run" end
  local rest = {}
  for k = i + 1, #argv do rest[#rest + 1] = argv[k] end
  return o, script, rest
end

-- A free TCP port on this host (bound then released; another process may take it meanwhile).
-- Drawn below Linux's ephemeral range (32768 and up), where the kernel's own picks for outgoing
-- connections cannot take it before rank 0 binds it; the kernel's pick if none is free.
local function bindable(port)
  local t = uv.new_tcp()
  local ok = t:bind("127.0.0.1", port)
  local got = ok and t:getsockname().port
  t:close()
  return got
end

function M.free_port()
  -- a private generator (math.random's state is the caller's), seeded per process and call
  local x = (os.time() + math.floor(os.clock() * 1e6) + uv.os_getpid() * 7919 +
    (tonumber(tostring({}):match("0x(%x+)") or "0", 16) or 0)) % 2147483648
  for _ = 1, 32 do
    x = (x * 69069 + 12345) % 2147483648
    local p = bindable(20000 + math.floor(x / 65536) % 12000)
    if p then return p end
  end
  return bindable(0) or 29500
end

-- M.log_dir(opts) -> the run's log folder as an absolute path, made | nil, message; and, for the
-- default folder, the folders this call made (deepest first), which M.remove_if_empty takes away
-- after the run (a folder named by --log-dir or MSH_LOG_DIR stays)
function M.log_dir(o)
  local env = os.getenv("MSH_LOG_DIR")
  local named = o.log_dir or (env ~= "" and env)
  local dir = named or string.format("logs/%s-%d", os.date("%Y%m%d-%H%M%S"), uv.os_getpid())
  if dir:sub(1, 1) ~= "/" then dir = uv.cwd() .. "/" .. dir end
  local made, d = {}, dir
  while d ~= "" and d ~= "/" and not uv.fs_stat(d) do
    made[#made + 1] = d
    d = d:match("^(.*)/[^/]*$") or ""
  end
  local ok, err = require("moonshard.telemetry").mkdir_p(dir)
  if not ok then return nil, string.format("cannot make the log folder %s: %s", dir, tostring(err)) end
  return dir, not named and made or {}
end

-- Removes the folders of `made` (deepest first) that are empty; stops at the first that is not.
function M.remove_if_empty(made)
  for _, d in ipairs(made or {}) do
    if not uv.fs_rmdir(d) then return end
  end
end

-- Line tagging: returns feed(data) and flush() writing "[rank R] line\n" to out.
local function tagger(out, tag)
  local partial = ""
  local function feed(data)
    data = partial .. data
    local last = 1
    for line, stop in data:gmatch("([^\n]*)\n()") do
      out:write(tag, line, "\n")
      last = stop
    end
    partial = data:sub(last)
    out:flush()
  end
  local function flush()
    if partial ~= "" then
      out:write(tag, partial, "\n")
      out:flush()
      partial = ""
    end
  end
  return feed, flush
end

local function cpu_count()
  local ok, n = pcall(uv.available_parallelism)
  if ok and n then return n end
  local cpus = uv.cpu_info()
  return cpus and #cpus or 1
end

-- M.run(opts, script, args) -> exit code. Runs the loop until every rank is gone.
function M.run(o, script, args)
  local exe = host.exe
  if not exe then
    io.stderr:write("moonshard launch: cannot find the moonshard executable\n")
    return 1
  end
  local world = o.nproc * o.nnodes
  local port = o.master_port or (o.nnodes == 1 and M.free_port() or 29500)
  local threads = os.getenv("OMP_NUM_THREADS") or tostring(math.max(1, math.floor(cpu_count() / o.nproc)))
  local base_env = {}
  local drop = { RANK = true, WORLD_SIZE = true, LOCAL_RANK = true, LOCAL_WORLD_SIZE = true, MASTER_ADDR = true,
    MASTER_PORT = true, OMP_NUM_THREADS = true, MOONSHARD_LAUNCHER_PID = true, GROUP_RANK = true, MSH_LOG_DIR = true,
    MSH_COLLECTIVE_TIMEOUT = o.collective_timeout ~= nil }
  for k, v in pairs(uv.os_environ()) do
    if not drop[k] then base_env[#base_env + 1] = k .. "=" .. v end
  end
  -- the ranks run `moonshard -e BOOT SCRIPT args...`: die with us, then run the script as usual
  local boot = "require('moonshard.dist').child_setup() return require('moonshard.cli').main({...})"

  local log_dir, made = M.log_dir(o)
  if not log_dir then
    io.stderr:write("moonshard launch: ", made, "\n")
    return 1
  end
  io.stderr:write("moonshard launch: logs in ", log_dir, "\n")
  M.last_log_dir = log_dir
  if o.nproc > cpu_count() then
    io.stderr:write(string.format("moonshard launch: warning: %d ranks on %d cores; each rank gets one thread\n",
      o.nproc, cpu_count()))
  end

  local ranks, alive = {}, 0
  local open_pipes, pipes = 0, {}
  local failure -- { rank, code, signal }
  local stopping = false
  local kill_timer, exit_code
  local signal_handles = {}

  local function say(msg) io.stderr:write("moonshard launch: ", msg, "\n") io.stderr:flush() end

  local function stop_all(sig)
    if stopping then return end
    stopping = true
    for _, r in ipairs(ranks) do
      if r.alive then pcall(r.proc.kill, r.proc, sig or "sigterm") end
    end
    kill_timer = uv.new_timer()
    kill_timer:start(math.floor(o.grace * 1000), 0, function()
      for _, r in ipairs(ranks) do
        if r.alive then
          say(string.format("rank %d did not stop within %g s: killing it", r.rank, o.grace))
          pcall(r.proc.kill, r.proc, "sigkill")
        end
      end
    end)
  end

  -- A rank's death often makes its peers fail a moment later ("rank 1 closed the connection"),
  -- and their exits can be seen first: failures within a short window are weighed together, and
  -- one killed by a signal is taken as the cause before ones that exited with a status.
  local failures, settle_timer = {}, nil
  local function decide()
    if settle_timer then
      settle_timer:close()
      settle_timer = nil
    end
    local pick = failures[1]
    for _, f in ipairs(failures) do
      if f.signal ~= 0 then
        pick = f
        break
      end
    end
    failure = pick
    exit_code = pick.signal ~= 0 and 128 + pick.signal or pick.code
    say(string.format("stopping the other ranks after rank %d's failure", pick.rank))
    stop_all("sigterm")
  end

  local function on_exit(r, code, sig)
    r.alive = false
    alive = alive - 1
    if r.proc and not r.proc:is_closing() then r.proc:close() end
    if code == 0 and sig == 0 then return end
    if sig ~= 0 then
      say(string.format("rank %d exited on signal %d (%s)", r.rank, sig, M.signal_name(sig)))
    else
      say(string.format("rank %d exited with status %d", r.rank, code))
    end
    if failure or stopping then return end
    failures[#failures + 1] = { rank = r.rank, code = code, signal = sig }
    if alive == 0 then return decide() end
    if not settle_timer then
      settle_timer = uv.new_timer()
      settle_timer:start(300, 0, decide)
    end
  end

  -- While rank 0's raw stdout stands in the middle of a line, the other ranks' tagged stdout
  -- lines wait (at most half a second) so that they do not split it.
  local raw_midline, held, hold_timer = false, {}, nil
  local dangling = false -- rank 0's stdout ended without a newline: the next line starts one
  local function release()
    for _, s in ipairs(held) do io.stdout:write(s) end
    held = {}
    io.stdout:flush()
    if hold_timer then
      hold_timer:close()
      hold_timer = nil
    end
  end
  local held_stdout = {
    write = function(_, ...)
      if not raw_midline then
        if dangling then
          io.stdout:write("\n")
          dangling = false
        end
        return io.stdout:write(...)
      end
      held[#held + 1] = table.concat { ... }
      if not hold_timer then
        hold_timer = uv.new_timer()
        hold_timer:start(500, 0, release)
      end
    end,
    flush = function() if not raw_midline then io.stdout:flush() end end,
  }

  local function watch(pipe, out, tag, raw)
    open_pipes = open_pipes + 1
    pipes[#pipes + 1] = pipe
    local feed, flush
    if raw then
      feed = function(data)
        out:write(data)
        out:flush()
        raw_midline = data:sub(-1) ~= "\n"
        if not raw_midline and #held > 0 then release() end
      end
      flush = function()
        dangling = raw_midline
        raw_midline = false
        if dangling and #held > 0 then
          out:write("\n")
          dangling = false
        end
        release()
      end
    else
      feed, flush = tagger(out == io.stdout and held_stdout or out, tag)
    end
    pipe:read_start(function(err, data)
      if data then return feed(data) end
      flush()
      if not pipe:is_closing() then pipe:close() end
      open_pipes = open_pipes - 1
      if err then say("reading a rank's output: " .. tostring(err)) end
    end)
  end

  local devnull = assert(uv.fs_open("/dev/null", "r", 0))
  for lr = 0, o.nproc - 1 do
    local rank = o.node_rank * o.nproc + lr
    local env = { unpack(base_env) }
    for k, v in pairs {
      RANK = rank, WORLD_SIZE = world, LOCAL_RANK = lr, LOCAL_WORLD_SIZE = o.nproc, GROUP_RANK = o.node_rank,
      MASTER_ADDR = o.master_addr, MASTER_PORT = port, OMP_NUM_THREADS = threads,
      MOONSHARD_LAUNCHER_PID = uv.os_getpid(), MSH_LOG_DIR = log_dir,
      MSH_COLLECTIVE_TIMEOUT = o.collective_timeout,
    } do env[#env + 1] = k .. "=" .. tostring(v) end
    local out, err = uv.new_pipe(false), uv.new_pipe(false)
    local argv = { "-e", boot, script }
    for _, a in ipairs(args) do argv[#argv + 1] = a end
    local r = { rank = rank, alive = true }
    local stdin = rank == 0 and 0 or devnull
    local proc, perr = uv.spawn(exe, {
      args = argv, env = env, stdio = { stdin, out, err },
    }, function(code, sig) on_exit(r, code, sig) end)
    if not proc then
      out:close()
      err:close()
      say(string.format("cannot start rank %d: %s", rank, tostring(perr)))
      failure = failure or { rank = rank, code = 1, signal = 0 }
      exit_code = exit_code or 1
      stop_all("sigterm")
      break
    end
    r.proc, r.pid = proc, proc:get_pid()
    ranks[#ranks + 1] = r
    alive = alive + 1
    local tag = "[rank " .. rank .. "] "
    watch(out, io.stdout, tag, rank == 0 and not o.tag_output)
    watch(err, io.stderr, tag, false)
  end
  M.last_pids = {}
  for _, r in ipairs(ranks) do M.last_pids[#M.last_pids + 1] = r.pid end
  -- the launch descriptor: each rank's pid and REPL socket (moonshard.live, moonshard attach)
  local descriptor = log_dir .. "/launch.json"
  do
    local list = {}
    for _, r in ipairs(ranks) do
      list[#list + 1] = { rank = r.rank, pid = r.pid, repl = string.format("%s/rank%d.repl.sock", log_dir, r.rank) }
    end
    local f = io.open(descriptor, "w")
    if f then
      f:write(require("cjson").encode { launcher_pid = uv.os_getpid(), world = world, node_rank = o.node_rank,
        nproc = o.nproc, script = script, log_dir = log_dir, ranks = list }, "\n")
      f:close()
    end
  end

  -- --timeout: the whole run's limit; the ranks still running are named and stopped
  local run_timer
  if o.timeout and o.timeout > 0 and alive > 0 then
    run_timer = uv.new_timer()
    run_timer:start(math.floor(o.timeout * 1000), 0, function()
      if failure or stopping then return end
      local left = {}
      for _, r in ipairs(ranks) do
        if r.alive then left[#left + 1] = r.rank end
      end
      say(string.format("the run timed out after %g s (--timeout); %s still running: stopping %s", o.timeout,
        (#left == 1 and "rank " or "ranks ") .. table.concat(left, ", "), #left == 1 and "it" or "them"))
      failure = { rank = left[1] or -1, code = 124, signal = 0 }
      exit_code = 124
      stop_all("sigterm")
    end)
  end

  -- forward signals sent to the launcher, then stop the ranks
  for _, name in ipairs { "sigint", "sigterm", "sighup" } do
    local h = uv.new_signal()
    h:start(name, function()
      if not failure then
        local num = name == "sigint" and 2 or name == "sigterm" and 15 or 1
        say(string.format("got %s; stopping the ranks", name:upper()))
        failure = { rank = -1, code = 0, signal = num }
        exit_code = 128 + num
      end
      for _, r in ipairs(ranks) do
        if r.alive then pcall(r.proc.kill, r.proc, name) end
      end
      stop_all(name)
    end)
    h:unref()
    signal_handles[#signal_handles + 1] = h
  end

  -- run until every rank has exited and its output is drained (a rank's children could hold a
  -- pipe open: give them a moment once every rank is gone)
  local done_at
  local tick = uv.new_timer()
  tick:start(100, 100, function() end)
  while true do
    uv.run("once")
    if alive == 0 then
      done_at = done_at or uv.hrtime()
      if open_pipes == 0 or uv.hrtime() - done_at > 2e9 then break end
    end
  end
  tick:close()
  if run_timer then run_timer:close() end
  if settle_timer then decide() end
  release()
  for _, p in ipairs(pipes) do
    if not p:is_closing() then p:close() end
  end
  uv.fs_close(devnull)
  if kill_timer and not kill_timer:is_closing() then kill_timer:close() end
  for _, h in ipairs(signal_handles) do h:close() end
  uv.run("nowait")
  -- the ranks are gone: their REPL files and the descriptor go too
  for _, r in ipairs(ranks) do require("moonshard.live").remove_files(log_dir, r.rank) end
  os.remove(descriptor)
  M.remove_if_empty(made)
  return exit_code or 0
end

-- M.main(argv) -> exit code
-- `--plan FILE.json` (moonshard plan --json): the ranks, nodes, command and flags of the plan,
-- ahead of any other launch options and the command's extra arguments.
function M.plan_argv(argv)
  if argv[1] ~= "--plan" and not (argv[1] or ""):match("^%-%-plan=") then return argv end
  local path = argv[1]:match("^%-%-plan=(.*)$") or argv[2]
  local first = argv[1]:match("=") and 2 or 3
  if not path then return nil, "--plan needs a file (moonshard plan --json > plan.json)" end
  local f, err = io.open(path, "rb")
  if not f then return nil, string.format("cannot read '%s': %s", path, err) end
  local p = require("cjson.safe").decode(f:read("*a"))
  f:close()
  local l = type(p) == "table" and p.launch
  if type(l) ~= "table" or type(l.command) ~= "string" or type(l.args) ~= "table" then
    return nil, string.format("'%s' is not a plan (no launch descriptor: write it with moonshard plan --json)", path)
  end
  local out = { "-n", tostring(l.nproc_per_node or 1), "--nnodes", tostring(l.nnodes or 1) }
  local rest = {}
  for i = first, #argv do rest[#rest + 1] = argv[i] end
  for _, a in ipairs(rest) do out[#out + 1] = a end
  out[#out + 1] = l.command
  for _, a in ipairs(l.args) do out[#out + 1] = tostring(a) end
  return out
end

function M.main(argv)
  local perr
  argv, perr = M.plan_argv(argv)
  if not argv then
    io.stderr:write("moonshard launch: ", perr, " (see `moonshard launch --help`)\n")
    return 2
  end
  local o, script, args = M.parse(argv)
  if not o then
    if script == "help" then
      io.stdout:write(M.usage)
      return 0
    end
    io.stderr:write("moonshard launch: ", script, " (see `moonshard launch --help`)\n")
    return 2
  end
  return M.run(o, script, args)
end

return M
