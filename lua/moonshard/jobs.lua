-- moonshard.jobs: child processes with launch descriptors, for `moonshard sweep` and
-- `moonshard eval --jobs`.
--
--   local jobs = require "moonshard.jobs"
--   local c = assert(jobs.start { argv = { exe, "bench", ... }, out = "p1.out", err = "p1.err", timeout = 600 })
--   jobs.wait { c }   -- c.code, c.signal, c.timed_out, c.seconds
--   jobs.descriptor { command = "bench", args = {...}, world = 2, ... } -> the JSON table written
--     before a child starts (model, topology, flags, commit, machine, time; its `launch` field is
--     what `moonshard launch --plan FILE.json` runs)
--   jobs.eval(opts, tasks, argv) -> exit code: `moonshard eval --jobs`: the suite cut by the
--     planner (moonshard.policy.eval_jobs or --jobs-policy), one child a job, results merged
local cjson = require "cjson"
local uv = require "luv"

local M = {}

-- ------------------------------------------------------------------------------- files

M.mkdir_p = require("moonshard.telemetry").mkdir_p -- mkdir_p(path) -> true | nil, message

-- M.jsonl(path) -> the JSON objects of a JSON Lines file, in order ({} without the file; a line
-- that is not an object is skipped: a record cut by a crash, say)
function M.jsonl(path)
  local out = {}
  local f = io.open(path, "rb")
  if not f then return out end
  for line in f:lines() do
    local ok, v = pcall(cjson.decode, line)
    if ok and type(v) == "table" then out[#out + 1] = v end
  end
  f:close()
  return out
end

function M.read(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("*a")
  f:close()
  return s
end

function M.write_json(path, t)
  local f, err = io.open(path .. ".part", "wb")
  if not f then return nil, string.format("cannot write '%s': %s", path, tostring(err)) end
  f:write(cjson.encode(t), "\n")
  f:close()
  local ok, rerr = os.rename(path .. ".part", path)
  if not ok then return nil, rerr end
  return true
end

-- One JSON object a line, appended with one write (lines from concurrent writers do not interleave).
function M.append_jsonl(path, t)
  local f, err = io.open(path, "ab")
  if not f then return nil, string.format("cannot write '%s': %s", path, tostring(err)) end
  f:setvbuf("full", 65536)
  f:write(cjson.encode(t) .. "\n")
  f:close()
  return true
end

-- The last n non-empty lines of a file.
function M.tail(path, n)
  local s = M.read(path) or ""
  local lines = {}
  for l in s:gmatch("[^\n]+") do
    if l:match("%S") then lines[#lines + 1] = l end
  end
  local out = {}
  for i = math.max(1, #lines - n + 1), #lines do out[#out + 1] = lines[i] end
  return out
end

-- The last line of text that decodes as a JSON object.
function M.last_json(text)
  local safe = require "cjson.safe"
  local found
  for l in (text or ""):gmatch("[^\n]+") do
    if l:match("^%s*{") then
      local v = safe.decode(l)
      if type(v) == "table" then found = v end
    end
  end
  return found
end

function M.quote(s)
  s = tostring(s)
  if s:match("^[%w%-%._/=:,+@]+$") then return s end
  return "'" .. s:gsub("'", "'\\''") .. "'"
end

function M.command_line(argv)
  local parts = {}
  for i, a in ipairs(argv) do parts[i] = M.quote(a) end
  return table.concat(parts, " ")
end

-- --------------------------------------------------------------------- what ran where

local function popen_line(cmd)
  local p = io.popen(cmd .. " 2>/dev/null")
  if not p then return nil end
  local s = p:read("*a")
  p:close()
  return s
end

-- { hash, dirty } of the checkout moonshard runs from (nil outside git)
function M.commit()
  local root = require("moonshard.host").root
  local q = M.quote(root)
  local h = popen_line("git -C " .. q .. " rev-parse --short HEAD")
  h = h and h:match("^(%x+)")
  if not h then return nil end
  local st = popen_line("git -C " .. q .. " status --porcelain --untracked-files=no") or ""
  return { hash = h, dirty = st:match("%S") ~= nil }
end

-- The machine in a few fields (moonshard.topology); discovered once.
local machine_cache
function M.machine()
  if machine_cache then return machine_cache end
  local m = { hostname = uv.os_gethostname() }
  local ok, topo = pcall(function() return require("moonshard.topology").discover() end)
  if ok and topo then
    local n = topo.nodes and topo.nodes[1] or {}
    m.cores, m.memory, m.cpu_model = n.cores, n.memory, n.cpu_model
    m.gpus = setmetatable({}, cjson.empty_array_mt)
    for _, g in ipairs(topo.gpus or {}) do m.gpus[#m.gpus + 1] = { index = g.index, name = g.name, memory = g.memory } end
    if topo.nvml and topo.nvml.driver then m.driver = topo.nvml.driver end
  end
  machine_cache = m
  return m
end

function M.now_iso() return os.date("!%Y-%m-%dT%H:%M:%SZ") end

-- The launch descriptor of a child: d.command, d.args (the command's flags), d.world (ranks),
-- d.model, d.topology, plus any fields given (sweep, point, axes, tasks ...).
function M.descriptor(d)
  local out = {}
  for k, v in pairs(d) do out[k] = v end
  out.launch = { nproc_per_node = d.world or 1, nnodes = 1, command = d.command, args = d.args }
  out.commit = M.commit() or cjson.null
  out.machine = M.machine()
  out.time = M.now_iso()
  out.moonshard = require("moonshard.host").version
  return out
end

-- --------------------------------------------------------------------- child processes

-- M.start(spec) -> child | nil, message
--   spec.argv     { program, args... }
--   spec.out, spec.err  files for stdout and stderr (truncated)
--   spec.env      extra environment variables { NAME = value }
--   spec.timeout  seconds, then SIGTERM (SIGKILL spec.grace seconds later, default 5)
--   spec.on_exit(child)
-- child: { pid, code, signal, timed_out, seconds, done }
function M.start(spec)
  local out_fd, oerr = uv.fs_open(spec.out, "w", 420)
  if not out_fd then return nil, oerr end
  local err_fd, eerr = uv.fs_open(spec.err, "w", 420)
  if not err_fd then uv.fs_close(out_fd) return nil, eerr end
  local env
  if spec.env then
    env = {}
    for k, v in pairs(uv.os_environ()) do
      if spec.env[k] == nil then env[#env + 1] = k .. "=" .. v end
    end
    for k, v in pairs(spec.env) do env[#env + 1] = k .. "=" .. tostring(v) end
  end
  local args = {}
  for i = 2, #spec.argv do args[#args + 1] = spec.argv[i] end
  local child = { done = false, t0 = uv.hrtime() }
  local handle, pid
  handle, pid = uv.spawn(spec.argv[1], { args = args, stdio = { nil, out_fd, err_fd }, env = env },
    function(code, signal)
      child.code, child.signal, child.done = code, signal, true
      child.seconds = (uv.hrtime() - child.t0) / 1e9
      handle:close()
      for _, t in ipairs { child.timer, child.kill_timer } do
        if t and not t:is_closing() then t:stop() t:close() end
      end
      if spec.on_exit then spec.on_exit(child) end
    end)
  uv.fs_close(out_fd)
  uv.fs_close(err_fd)
  if not handle then return nil, string.format("cannot start %s: %s", spec.argv[1], tostring(pid)) end
  child.pid, child.handle = pid, handle
  if spec.timeout then
    child.timer = uv.new_timer()
    child.timer:start(math.floor(spec.timeout * 1000), 0, function()
      if child.done then return end
      child.timed_out = true
      handle:kill("sigterm")
      child.kill_timer = uv.new_timer()
      child.kill_timer:start(math.floor((spec.grace or 5) * 1000), 0, function()
        if not child.done then handle:kill("sigkill") end
      end)
    end)
  end
  return child
end

M.GRACE = 5 -- seconds the children of an interrupted wait get before SIGKILL

local function each_live(children, fn)
  for _, c in ipairs(children) do
    if not c.done and c.handle and not c.handle:is_closing() then pcall(fn, c.handle) end
  end
end

-- signal to every child still running, SIGKILL M.GRACE seconds later to any left: the timer
local function terminate(children, signal)
  each_live(children, function(hd) hd:kill(signal) end)
  local killer = uv.new_timer()
  killer:start(math.floor(M.GRACE * 1000), 0, function() each_live(children, function(hd) hd:kill("sigkill") end) end)
  return killer
end

-- runs the loop until every child has ended
local function until_ended(children)
  while true do
    local left = false
    for _, c in ipairs(children) do
      if not c.done then left = true break end
    end
    if not left then return end
    uv.run("once")
  end
end

-- M.wait(children) -> nil | "SIGINT" | "SIGTERM": runs the loop until every child has ended. A
-- SIGINT or SIGTERM meanwhile goes on to the children still running (SIGKILL M.GRACE seconds
-- later), and once they have ended wait returns its name: the caller stops there, and no child
-- is left running on its own (a sweep rerun would start its point a second time beside it).
function M.wait(children)
  local got, handles, killer = nil, {}, nil
  for _, name in ipairs { "sigint", "sigterm" } do
    local h = uv.new_signal()
    h:start(name, function()
      got = got or name:upper()
      if killer then each_live(children, function(hd) hd:kill(name) end) else killer = terminate(children, name) end
    end)
    handles[#handles + 1] = h
  end
  until_ended(children)
  if killer then handles[#handles + 1] = killer end
  for _, h in ipairs(handles) do
    if not h:is_closing() then h:close() end
  end
  return got
end

-- M.stop(children): SIGTERM to every child still running, SIGKILL M.GRACE seconds later to any
-- left, and back once all have ended (when a later one could not start, say)
function M.stop(children)
  local killer = terminate(children, "sigterm")
  until_ended(children)
  killer:close()
end

-- ------------------------------------------------------------------- eval --jobs

-- M.events(path, model) -> function(event, task, fields): appends one JSON line to path (a no-op
-- without a path) tagged with the job ($MSH_EVAL_JOB), this rank, its pipeline stage and
-- tensor-parallel index; every rank writes its own lines, so with pp > 1 each stage reports.
-- task_progress lines are written at most every 0.5 s, and for the last batch.
function M.events(path, model)
  if not path then return function() end end
  local pg = model and model.dist
  local coords = pg and pg.grid and pg.grid.coords and pg.grid.coords[pg.rank] or {}
  local base = { job = tonumber(os.getenv("MSH_EVAL_JOB") or ""), rank = pg and pg.rank or 0,
    stage = coords.pp or 0, tp_rank = coords.tp or 0, pid = uv.os_getpid() }
  local last = 0
  return function(event, task, fields)
    local now = uv.hrtime() / 1e9
    if event == "task_progress" and fields.done < fields.total and now - last < 0.5 then return end
    last = now
    local line = { event = event, task = task, date = M.now_iso(), t = now }
    for k, v in pairs(base) do line[k] = v end
    for k, v in pairs(fields or {}) do line[k] = v end
    M.append_jsonl(path, line)
  end
end

-- A task's work in rough tokens: what the planner balances.
function M.task_cost(task, docs)
  local cost = 0
  local ot = task.output_type
  for _, doc in ipairs(docs) do
    local ok, c = pcall(function()
      if ot == "multiple_choice" then
        local text = task.multiple_input and "" or task.doc_to_text(doc)
        local n = 0
        for _, ch in ipairs(task.doc_to_choice(doc)) do n = n + (#text + #tostring(ch)) / 4 end
        return n
      elseif ot == "loglikelihood" then
        return (#task.doc_to_text(doc) + #tostring(task.doc_to_target(doc))) / 4
      elseif ot == "loglikelihood_rolling" then
        return #tostring(task.doc_to_target(doc)) / 4
      else -- generate_until: the prompt, then decode steps (each costs about as much as 8 prompt tokens)
        local gen = task.generation and task.generation.max_gen_toks or 256
        return #task.doc_to_text(doc) / 4 + gen * 8
      end
    end)
    cost = cost + (ok and c or 1)
  end
  return math.max(1, math.floor(cost))
end

-- bytes of a model's weight files (a file, or the weight files of a folder)
function M.model_bytes(path)
  local st = uv.fs_stat(path)
  if not st then return 0 end
  if st.type ~= "directory" then return st.size end
  local total = 0
  local req = uv.fs_scandir(path)
  while req do
    local name = uv.fs_scandir_next(req)
    if not name then break end
    if name:match("%.safetensors$") or name:match("%.bin$") or name:match("%.gguf$") or name:match("%.pt$") then
      local s = uv.fs_stat(path .. "/" .. name)
      if s then total = total + s.size end
    end
  end
  return total
end

M.POLICY = "moonshard.policy.eval_jobs"

function M.load_policy(path)
  if not path then return require(M.POLICY) end
  local chunk, err = loadfile(path)
  if not chunk then return nil, err end
  local ok, p = pcall(chunk)
  if not ok then return nil, string.format("%s: %s", path, tostring(p)) end
  if type(p) ~= "table" or type(p.plan) ~= "function" then
    return nil, string.format("%s: a jobs policy returns a table with plan(tasks, topo, opts)", path)
  end
  return p
end

-- the eval flags a job gets from its parent: all but those the jobs set themselves
local DROP = { jobs = true, ["jobs-policy"] = true, ["jobs-dir"] = true, tasks = true, output = true, events = true,
  threads = true, topology = true }

local function forward_args(argv)
  local out, i = {}, 1
  while i <= #argv do
    local a = argv[i]
    local name, eq = a:match("^%-%-([%w%-]+)(=?)")
    if name and DROP[name] then
      if eq == "" and not (name == "jobs" and argv[i + 1] and argv[i + 1]:match("^%-%-")) then i = i + 1 end
    else
      out[#out + 1] = a
    end
    i = i + 1
  end
  return out
end

local function merge(into, res)
  for _, k in ipairs { "results", "versions", "n-shot", "n-samples", "configs", "higher_is_better", "group_subtasks",
    "samples" } do
    if res[k] then
      into[k] = into[k] or {}
      for name, v in pairs(res[k]) do into[k][name] = v end
    end
  end
end

-- M.eval(opts, tasks, argv) -> exit code. opts: eval's options (jobs, jobs_policy, jobs_dir,
-- output, tp, pp, device, model, topology); tasks: { { task, docs } } as eval loaded them; argv:
-- eval's command line (forwarded to each job without the flags the jobs set).
function M.eval(opts, tasks, argv)
  local function fail(msg)
    io.stderr:write("moonshard eval: ", msg, "\n")
    return 1
  end
  local policy, perr = M.load_policy(opts.jobs_policy)
  if not policy then return fail("--jobs-policy " .. perr) end
  local want = opts.jobs == "auto" and "auto" or tonumber(opts.jobs)
  if not want or (want ~= "auto" and (want < 1 or want % 1 ~= 0)) then
    return fail(string.format("--jobs expects 'auto' or a positive integer, got '%s'", tostring(opts.jobs)))
  end
  local topo, terr = require("moonshard.topology").discover { topology = opts.topology }
  if not topo then return fail(terr) end
  local ranks = opts.tp * opts.pp
  local device = opts.device:match("^cuda") and "cuda" or "cpu"
  local bytes = M.model_bytes(opts.model)
  local ptasks = {}
  for _, tk in ipairs(tasks) do ptasks[#ptasks + 1] = { name = tk.task.name, cost = M.task_cost(tk.task, tk.docs) } end
  local ok, plan, why = pcall(policy.plan, ptasks, topo, { ranks = ranks, device = device, jobs = want,
    need_bytes = math.floor(bytes * 1.2 / ranks) })
  if not ok then return fail("jobs policy: " .. tostring(plan)) end
  if not plan then return fail("jobs policy: " .. tostring(why)) end
  local dir = opts.jobs_dir or string.format("logs/eval-jobs-%s-%d", os.date("%Y%m%d-%H%M%S"), uv.os_getpid())
  local mk, merr = M.mkdir_p(dir)
  if not mk then return fail(merr) end
  local exe = require("moonshard.host").exe
  local base = forward_args(argv)
  local events = dir .. "/events.jsonl"
  io.stderr:write(string.format("moonshard eval: %d job%s (%s) in %s\n", #plan.jobs, #plan.jobs == 1 and "" or "s",
    plan.reason or "", dir))
  local children = {}
  for _, job in ipairs(plan.jobs) do
    local args = {}
    for _, a in ipairs(base) do args[#args + 1] = a end
    -- the job's results, beside (never over) its descriptor job-N.json
    local out = string.format("%s/job-%d.results.json", dir, job.id)
    for _, a in ipairs { "--tasks", table.concat(job.tasks, ","), "--output", out, "--events", events } do
      args[#args + 1] = a
    end
    if job.threads then
      args[#args + 1] = "--threads"
      args[#args + 1] = tostring(job.threads)
    end
    local env = { MSH_EVAL_JOB = tostring(job.id) }
    if job.gpus then
      local ids = {}
      for i, g in ipairs(job.gpus) do ids[i] = tostring(g) end
      env.CUDA_VISIBLE_DEVICES = table.concat(ids, ",")
    end
    local full = { exe }
    if ranks > 1 then
      for _, a in ipairs { "launch", "-n", tostring(ranks), "--log-dir", string.format("%s/job-%d.logs", dir, job.id) } do
        full[#full + 1] = a
      end
    end
    full[#full + 1] = "eval"
    for _, a in ipairs(args) do full[#full + 1] = a end
    local d = M.descriptor { job = job.id, tasks = job.tasks, cost = job.cost, model = opts.model, command = "eval",
      args = args, world = ranks, argv = full, env = env, policy = opts.jobs_policy or M.POLICY,
      topology = { device = device, tp = opts.tp, pp = opts.pp, ranks = ranks, gpus = job.gpus or cjson.null,
        threads = job.threads or cjson.null } }
    M.write_json(string.format("%s/job-%d.json", dir, job.id), d)
    M.append_jsonl(dir .. "/jobs.jsonl", d)
    local c, serr = M.start { argv = full, out = string.format("%s/job-%d.out", dir, job.id),
      err = string.format("%s/job-%d.err", dir, job.id), env = env }
    if not c then
      if #children > 0 then
        M.stop(children)
        serr = string.format("%s (the %d job%s already started were stopped)", serr, #children, #children > 1 and "s" or "")
      end
      return fail(serr)
    end
    c.job = job
    c.result = out
    M.append_jsonl(events, { event = "job_start", job = job.id, pid = c.pid, tasks = job.tasks, date = M.now_iso() })
    children[#children + 1] = c
  end
  local interrupted = M.wait(children)
  if interrupted then
    for _, c in ipairs(children) do
      M.append_jsonl(events, { event = "job_done", job = c.job.id, exit = c.code, signal = c.signal, seconds = c.seconds,
        date = M.now_iso() })
    end
    io.stderr:write(string.format("moonshard eval: %s: the jobs were stopped (their folder: %s)\n", interrupted, dir))
    return 128 + (interrupted == "SIGINT" and 2 or 15)
  end
  local merged, failed = nil, {}
  for _, c in ipairs(children) do
    M.append_jsonl(events, { event = "job_done", job = c.job.id, exit = c.code, signal = c.signal, seconds = c.seconds,
      date = M.now_iso() })
    local text = c.code == 0 and M.read(c.result)
    local res = text and require("cjson.safe").decode(text)
    if type(res) ~= "table" or type(res.results) ~= "table" or type(res.config) ~= "table" then
      local tail = M.tail(string.format("%s/job-%d.err", dir, c.job.id), 1)[1] or "no output"
      failed[#failed + 1] = string.format("job %d (%s) %s: %s", c.job.id, table.concat(c.job.tasks, ","),
        c.signal ~= 0 and ("killed by signal " .. c.signal) or ("exit " .. tostring(c.code)), tail)
    else
      if not merged then
        merged = res
        merged.jobs = {}
      else
        merge(merged, res)
        local t = tonumber(res.total_evaluation_time_seconds)
        if t and t > (tonumber(merged.total_evaluation_time_seconds) or 0) then merged.total_evaluation_time_seconds = res.total_evaluation_time_seconds end
      end
      merged.jobs[#merged.jobs + 1] = { job = c.job.id, tasks = c.job.tasks, seconds = c.seconds, gpus = c.job.gpus,
        threads = c.job.threads }
    end
  end
  if merged then
    merged.config.jobs_dir = dir
    if opts.output then
      local f, ferr = io.open(opts.output, "wb")
      if not f then return fail(string.format("cannot write %s: %s", opts.output, tostring(ferr))) end
      f:write(cjson.encode(merged), "\n")
      f:close()
    end
    io.stdout:write(string.format("moonshard (model=%s, device=%s, tp=%d, pp=%d), %d job%s, limit: %s\n", opts.model,
      opts.device, opts.tp, opts.pp, #plan.jobs, #plan.jobs == 1 and "" or "s", tostring(opts.limit)))
    io.stdout:write(require("moonshard.eval").markdown(merged))
  end
  for _, f in ipairs(failed) do io.stderr:write("moonshard eval: ", f, "\n") end
  return #failed > 0 and 1 or 0
end

return M
