-- moonshard.sweep: `moonshard sweep FILE.lua`. A sweep file returns a table:
--
--   return {
--     name = "batch",                -- the run folder runs/<name>/ (default: the file's name)
--     command = "bench",             -- bench, eval, bench-serve, or a list of them (an axis)
--     model = "../shared/data/models/stories260K",
--     flags = { ["gen-len"] = 32, ["no-ceilings"] = true,   -- every point's fixed flags
--               eval = { limit = 100 } },                    -- ... and one command's
--     axes = { batch = { 1, 2, 4, 8 }, ["--loops"] = { 3 } },
--     where = function(p) return p.batch <= 4 or p.tp == 1 end,  -- optional filter
--     timeout = 600,                 -- seconds a point may run (optional)
--   }
--
-- Axes (M.AXES): command, preset, tasks, tier (resident, cpu-offload, disk-offload, zero3),
-- quant_bits (native, 4, 8, 16, 32), dp, pp, tp, context, batch, and any flag written "--name".
-- Points are the cartesian product in that order (the last axis varies fastest), less those
-- where() refuses. A point with tp*pp*dp > 1 runs under `moonshard launch -n tp*pp*dp`.
--
-- Each point: its launch descriptor (model, topology, flags, commit, machine, time) is written
-- to <dir>/pNNN.json before it starts; the child's stdout and stderr go to pNNN.out / pNNN.err;
-- one line goes to <dir>/results.jsonl when it ends (status ok or failed with its exit status
-- and last stderr lines). A point killed by a signal from outside the sweep writes no line and
-- runs again on the next run; a rerun skips points with a line (failed ones too, unless
-- retry_failed). A point is known by its command, model and flags (M.key), not by its number.
-- Eval points with a `tasks` axis that differ only in their tasks run as one
-- `moonshard eval --jobs` (moonshard.policy.eval_jobs): each job loads the model once.
--
-- At the end: a table (M.table) and gnuplot plots (M.plots): throughput against batch size,
-- latency against tp, accuracy (and speed) against quantization bits, strong and weak scaling
-- against the ideal line, each with its .gp script and .dat data beside the PNG.
local cjson = require "cjson"
local jobs = require "moonshard.jobs"

local M = {}

M.COMMANDS = { bench = true, eval = true, ["bench-serve"] = true }
local COMMAND_LIST = "bench, eval, bench-serve"

-- How an axis value becomes a command's flags: AXES[name].flags(value, command) -> { flag, value ... }
-- (nil: the axis does not apply to that command).
local function quant_flags(v, cmd)
  if v == "native" or v == 0 then return {} end
  if cmd ~= "bench-serve" and (v == 4 or v == 8) then return { "--quant-bits", v } end
  local dtype = ({ [4] = "i4g64", [8] = "i8g64", [16] = "bf16", [32] = "f32" })[v]
  return { "--dtype", dtype }
end

local TIERS = { resident = {}, ["cpu-offload"] = { "--cpu-offload" }, ["disk-offload"] = { "--disk-offload" },
  zero3 = { "--zero", 3 } }

local function posint(v) return type(v) == "number" and v >= 1 and v % 1 == 0 end

M.AXES = {
  command = { check = function(v) return M.COMMANDS[v] ~= nil, "a command (" .. COMMAND_LIST .. ")" end },
  preset = { commands = { bench = true },
    check = function(v) return type(v) == "string", "a preset name or FILE.lua" end,
    flags = function(v) return { "--preset", v } end },
  tasks = { commands = { eval = true },
    check = function(v)
      if type(v) == "string" then return v:match("%S") ~= nil, "task names" end
      if type(v) ~= "table" or #v == 0 then return false, "task names (a string or a list)" end
      for _, t in ipairs(v) do if type(t) ~= "string" then return false, "task names (a string or a list)" end end
      return true
    end,
    flags = function(v) return { "--tasks", type(v) == "table" and table.concat(v, ",") or v } end },
  tier = { commands = { bench = true, eval = true },
    check = function(v) return TIERS[v] ~= nil, "a tier (resident, cpu-offload, disk-offload, zero3)" end,
    flags = function(v) return TIERS[v] end },
  quant_bits = { commands = { bench = true, eval = true, ["bench-serve"] = true },
    check = function(v) return v == "native" or v == 0 or v == 4 or v == 8 or v == 16 or v == 32,
      "quantization bits (native, 4, 8, 16, 32)" end,
    flags = quant_flags },
  dp = { commands = { bench = true, eval = true }, check = function(v) return posint(v), "a positive integer" end,
    flags = function() return {} end },
  pp = { commands = { bench = true, eval = true }, check = function(v) return posint(v), "a positive integer" end,
    flags = function(v) return { "--pp", v } end },
  tp = { commands = { bench = true, eval = true }, check = function(v) return posint(v), "a positive integer" end,
    flags = function(v) return { "--tp", v } end },
  context = { commands = { bench = true, eval = true, ["bench-serve"] = true },
    check = function(v) return posint(v), "a positive integer" end,
    flags = function(v, cmd)
      return { cmd == "bench" and "--prompt-len" or cmd == "eval" and "--max-length" or "--input-len", v }
    end },
  batch = { commands = { bench = true, eval = true, ["bench-serve"] = true },
    check = function(v) return posint(v), "a positive integer" end,
    flags = function(v, cmd) return { cmd == "bench-serve" and "--max-batch" or "--batch-size", v } end },
}
M.ORDER = { "command", "preset", "tasks", "tier", "quant_bits", "dp", "pp", "tp", "context", "batch" }
local AXIS_LIST = table.concat(M.ORDER, ", ") .. ", or a flag written \"--name\""

local FIELDS = { name = true, command = true, model = true, flags = true, axes = true, where = true, timeout = true }

-- ------------------------------------------------------------------------------ loading

local function is_list(t)
  if type(t) ~= "table" then return false end
  local n = 0
  for _ in pairs(t) do n = n + 1 end
  return n == #t
end

local function scalar(v) return type(v) == "string" or type(v) == "number" or type(v) == "boolean" end

-- an axis value as written in labels and messages (a list: comma-separated)
local function show(v)
  if type(v) == "table" then return table.concat(v, ",") end
  return tostring(v)
end
M.show = show

-- M.load(path, overrides) -> sweep | nil, message. overrides: { model = PATH }.
-- The file runs with the usual globals (require works); errors name the file and the field.
function M.load(path, overrides)
  overrides = overrides or {}
  local function bad(field, fmt, ...)
    return nil, string.format("%s: field '%s': " .. fmt, path, field, ...)
  end
  local chunk, err = loadfile(path)
  if not chunk then return nil, err end
  local env = setmetatable({}, { __index = _G })
  setfenv(chunk, env)
  local ok, spec = pcall(chunk)
  if not ok then return nil, string.format("%s: %s", path, tostring(spec)) end
  if type(spec) ~= "table" then
    return nil, string.format("%s: a sweep file returns a table (got %s)", path, type(spec))
  end
  for k in pairs(spec) do
    if not FIELDS[k] then
      return bad(tostring(k), "unknown field (name, command, model, flags, axes, where, timeout)")
    end
  end
  local s = { path = path, fixed = {}, per_command = {}, axes = {}, flag_axes = {} }
  s.name = spec.name or path:match("([^/]+)%.lua$") or path:match("([^/]+)$")
  if type(s.name) ~= "string" or not s.name:match("^[%w][%w%._%-]*$") then
    return bad("name", "'%s' is not a folder name (letters, digits, . _ -)", tostring(s.name))
  end
  s.model = overrides.model or spec.model
  if type(s.model) ~= "string" or s.model == "" then return bad("model", "a model path is required") end
  if spec.timeout ~= nil and (type(spec.timeout) ~= "number" or spec.timeout <= 0) then
    return bad("timeout", "seconds > 0, got %s", tostring(spec.timeout))
  end
  s.timeout = spec.timeout
  if spec.where ~= nil and type(spec.where) ~= "function" then
    return bad("where", "a function(point) -> boolean, got %s", type(spec.where))
  end
  s.where = spec.where

  -- axes (command may also be given at the top: a string, or a list that is an axis)
  local axes = spec.axes or {}
  if type(axes) ~= "table" then return bad("axes", "a table of axis = { values }, got %s", type(axes)) end
  local values = {}
  if spec.command ~= nil then
    if axes.command ~= nil then return bad("command", "given both at the top and in axes") end
    if type(spec.command) == "string" then
      values.command = { spec.command }
    elseif is_list(spec.command) then
      values.command = spec.command
    else
      return bad("command", "a command (%s) or a list of them", COMMAND_LIST)
    end
  end
  for name, vals in pairs(axes) do
    if type(name) ~= "string" then return bad("axes", "axis names are strings, got %s", tostring(name)) end
    local field = "axes." .. name
    local flag = name:match("^%-%-([%w][%w%-]*)$")
    if not M.AXES[name] and not flag then
      return bad(field, "unknown axis type '%s' (%s)", name, AXIS_LIST)
    end
    if type(vals) ~= "table" then vals = { vals } end
    if not is_list(vals) then return bad(field, "a list of values") end
    if #vals == 0 then return bad(field, "no values") end
    for i, v in ipairs(vals) do
      if flag then
        if not scalar(v) then return bad(field, "value %d is a %s (a flag's value is a string, number or boolean)", i, type(v)) end
      else
        local okv, what = M.AXES[name].check(v)
        if not okv then return bad(field, "value %d ('%s') is not %s", i, show(v), what) end
      end
    end
    values[name] = vals
  end
  if not values.command then return bad("command", "a command (%s) is required", COMMAND_LIST) end
  if values.tasks then
    local tdir = type(spec.flags) == "table" and (spec.flags["tasks-dir"] or type(spec.flags.eval) == "table"
      and spec.flags.eval["tasks-dir"]) or nil
    for i, v in ipairs(values.tasks) do
      for name in (type(v) == "table" and table.concat(v, ",") or v):gmatch("[^,%s]+") do
        local t, terr = require("moonshard.eval").load_task(name, { tasks_dir = tdir })
        if not t then return bad("axes.tasks", "value %d: %s", i, terr) end
      end
    end
  end
  for i, c in ipairs(values.command) do
    if not M.COMMANDS[c] then
      return bad("command", "unknown command '%s'%s (%s)", tostring(c), #values.command > 1 and (" (value " .. i .. ")") or "",
        COMMAND_LIST)
    end
  end
  for _, name in ipairs(M.ORDER) do
    if values[name] then
      s.axes[#s.axes + 1] = { name = name, values = values[name] }
      if name ~= "command" then
        for _, c in ipairs(values.command) do
          if not M.AXES[name].commands[c] then
            return bad("axes." .. name, "does not apply to command '%s'", c)
          end
        end
      end
    end
  end
  local fnames = {}
  for name in pairs(values) do
    if name:match("^%-%-") then fnames[#fnames + 1] = name end
  end
  table.sort(fnames)
  for _, name in ipairs(fnames) do s.axes[#s.axes + 1] = { name = name, values = values[name], flag = true } end

  -- fixed flags: name = value, and a table per command
  local flags = spec.flags or {}
  if type(flags) ~= "table" then return bad("flags", "a table of flag = value, got %s", type(flags)) end
  for k, v in pairs(flags) do
    if type(k) ~= "string" then return bad("flags", "flag names are strings, got %s", tostring(k)) end
    if M.COMMANDS[k] then
      if type(v) ~= "table" then return bad("flags." .. k, "a table of flag = value") end
      s.per_command[k] = {}
      for fk, fv in pairs(v) do
        if type(fk) ~= "string" or not scalar(fv) then
          return bad("flags." .. k .. "." .. tostring(fk), "a flag's value is a string, number or boolean")
        end
        s.per_command[k][(fk:gsub("^%-%-", ""))] = fv
      end
    elseif not scalar(v) then
      return bad("flags." .. k, "a flag's value is a string, number or boolean (or a table under a command's name)")
    else
      s.fixed[(k:gsub("^%-%-", ""))] = v
    end
  end
  return s
end

-- ------------------------------------------------------------------------------ points

-- a flag list from name -> value (true: the flag alone; false: left out), names sorted
local function flag_list(map)
  local names = {}
  for k in pairs(map) do names[#names + 1] = k end
  table.sort(names)
  local out = {}
  for _, k in ipairs(names) do
    local v = map[k]
    if v ~= false then
      out[#out + 1] = "--" .. k
      if v ~= true then out[#out + 1] = tostring(v) end
    end
  end
  return out
end

-- The point's identity: its command, model and flags (not paths of the run folder).
function M.key(p)
  return p.command .. " " .. p.model .. " " .. table.concat(p.flags, " ") .. " @" .. p.world
end

-- M.points(s) -> { point... } | nil, message. A point: { index, values = { axis = value },
-- command, model, flags (the command's flags without run-folder paths), world, tp, pp, dp, key, label }
function M.points(s)
  local combos = { {} }
  for _, ax in ipairs(s.axes) do
    local nxt = {}
    for _, c in ipairs(combos) do
      for _, v in ipairs(ax.values) do
        local n = {}
        for k, x in pairs(c) do n[k] = x end
        n[ax.name] = v
        nxt[#nxt + 1] = n
      end
    end
    combos = nxt
  end
  local out = {}
  for _, vals in ipairs(combos) do
    local cmd = vals.command
    local tp, pp, dp = vals.tp or 1, vals.pp or 1, vals.dp or 1
    local keep = true
    if s.where then
      local view = { command = cmd, world = tp * pp * dp }
      for k, v in pairs(vals) do
        view[k] = v
        if k:match("^%-%-") then view[(k:sub(3):gsub("-", "_"))] = v end
      end
      view.tp, view.pp, view.dp = tp, pp, dp
      local ok, r = pcall(s.where, view)
      if not ok then return nil, string.format("%s: field 'where': %s", s.path, tostring(r)) end
      keep = r and true or false
    end
    if keep then
      local map = {}
      for k, v in pairs(s.fixed) do map[k] = v end
      for k, v in pairs(s.per_command[cmd] or {}) do map[k] = v end
      for _, ax in ipairs(s.axes) do
        local v = vals[ax.name]
        if ax.flag then
          map[ax.name:sub(3)] = v
        elseif ax.name ~= "command" then
          local f = M.AXES[ax.name].flags(v, cmd)
          for i = 1, #f, 2 do map[f[i]:sub(3)] = f[i + 1] == nil and true or f[i + 1] end
        end
      end
      local p = { values = vals, command = cmd, model = s.model, flags = flag_list(map), tp = tp, pp = pp, dp = dp,
        world = tp * pp * dp, device = type(map.device) == "string" and map.device or "cpu" }
      p.key = M.key(p)
      local parts = {}
      for _, ax in ipairs(s.axes) do
        if #ax.values > 1 then parts[#parts + 1] = ax.name .. "=" .. show(vals[ax.name]) end
      end
      p.label = table.concat(parts, " ")
      out[#out + 1] = p
      p.index = #out
      p.id = string.format("p%03d", p.index)
    end
  end
  if #out == 0 then return nil, string.format("%s: no points (where() refused all %d)", s.path, #combos) end
  return out
end

-- the child's argv for a point in run folder dir (eval writes its results JSON there)
function M.argv(p, dir, extra)
  local exe = require("moonshard.host").exe
  local argv = { exe }
  if p.world > 1 and not (extra and extra.jobs) then
    for _, a in ipairs { "launch", "-n", tostring(p.world), "--log-dir", dir .. "/" .. p.id .. ".logs" } do
      argv[#argv + 1] = a
    end
  end
  argv[#argv + 1] = p.command
  argv[#argv + 1] = "--model"
  argv[#argv + 1] = p.model
  for _, a in ipairs(p.flags) do argv[#argv + 1] = a end
  for _, a in ipairs(extra and extra.args or {}) do argv[#argv + 1] = a end
  return argv
end

-- ------------------------------------------------------------------------------ results

-- the records of results.jsonl by key (the last line of a key wins)
function M.read_results(path)
  local recs = {}
  for _, r in ipairs(jobs.jsonl(path)) do
    if type(r.key) == "string" then recs[r.key] = r end
  end
  return recs
end

local function flatten(t, prefix, out)
  for k, v in pairs(t) do
    local name = prefix and (prefix .. "." .. k) or tostring(k)
    if type(v) == "number" then out[name] = v
    elseif type(v) == "table" and not is_list(v) then flatten(v, name, out) end
  end
  return out
end

-- M.metrics(command, result) -> flat { name = number }: bench and bench-serve's numbers
-- (ttft_ms.p50 ...); eval's per task ("arc_easy.acc") and the mean of the tasks' acc ("acc").
function M.metrics(command, result)
  if command ~= "eval" then
    local m = flatten(result, nil, {})
    if m.time_to_first_token_s then m.ttft_ms = m.time_to_first_token_s * 1e3 end
    return m
  end
  local m, accs = {}, {}
  local names = {}
  for task in pairs(result.results or {}) do names[#names + 1] = task end
  table.sort(names)
  for _, task in ipairs(names) do
    for k, v in pairs(result.results[task]) do
      local metric = type(v) == "number" and k:match("^([^,]+),") or nil
      if metric and not metric:match("_stderr$") then m[task .. "." .. metric] = v end
    end
    local acc = m[task .. ".acc"]
    if acc then accs[#accs + 1] = acc end
  end
  if #accs > 0 then
    local s = 0
    for _, a in ipairs(accs) do s = s + a end
    m.acc = s / #accs
  end
  return m
end

-- ------------------------------------------------------------------------------ running

local function log(fmt, ...) io.stderr:write(string.format(fmt, ...), "\n") end

local function signal_name(n)
  return ({ [1] = "SIGHUP", [2] = "SIGINT", [9] = "SIGKILL", [15] = "SIGTERM", [6] = "SIGABRT", [11] = "SIGSEGV" })[n]
    or ("signal " .. n)
end

local function descriptor(s, p, argv, dir)
  local args = {}
  local first = p.world > 1 and argv[2] == "launch" and 8 or 3
  for i = first, #argv do args[#args + 1] = argv[i] end
  return jobs.descriptor { sweep = s.name, sweep_file = s.path, point = p.index, id = p.id, key = p.key,
    axes = p.values, command = p.command, model = p.model, flags = p.flags, args = args, world = p.world,
    topology = { tp = p.tp, pp = p.pp, dp = p.dp, ranks = p.world,
      tier = p.values.tier or "resident", device = p.device },
    argv = argv, out = dir .. "/" .. p.id .. ".out", err = dir .. "/" .. p.id .. ".err" }
end

local function record(dir, p, fields)
  local r = { key = p.key, sweep_point = p.id, index = p.index, command = p.command, axes = p.values, world = p.world,
    label = p.label, date = jobs.now_iso() }
  for k, v in pairs(fields) do r[k] = v end
  jobs.append_jsonl(dir .. "/results.jsonl", r)
  return r
end

-- Ends a child: a result line (ok or failed) or none (killed from outside: it reruns).
local function finish(s, dir, p, c, result_text)
  local tail = jobs.tail(dir .. "/" .. p.id .. ".err", 10)
  if c.signal and c.signal ~= 0 and not c.timed_out then
    log("  killed by %s: no result recorded (the next run runs it again)", signal_name(c.signal))
    return nil, "killed"
  end
  if c.code == 0 then
    local result = result_text
    if type(result) ~= "table" then result = jobs.last_json(jobs.read(dir .. "/" .. p.id .. ".out")) end
    if type(result) == "table" then
      local m = M.metrics(p.command, result)
      local keep = result
      if p.command == "eval" then keep = { results = result.results, ["n-samples"] = result["n-samples"] } end
      log("  ok in %.1f s", c.seconds)
      return record(dir, p, { status = "ok", exit = 0, seconds = c.seconds, metrics = m, result = keep })
    end
    tail[#tail + 1] = "(exit 0 but no JSON result on stdout)"
  end
  local why = c.timed_out and string.format("timed out after %s s", tostring(s.timeout)) or
    (c.signal and c.signal ~= 0) and signal_name(c.signal) or ("exit " .. tostring(c.code))
  log("  failed (%s): %s", why, tail[#tail] or "")
  return record(dir, p, { status = "failed", exit = c.code, signal = c.signal ~= 0 and c.signal or nil,
    timed_out = c.timed_out or nil, seconds = c.seconds, stderr_tail = tail })
end

-- the sweep was sent SIGINT or SIGTERM while a point ran: the point's child was stopped too
local function interrupted_run(signame, id)
  return nil, string.format("%s: %s stopped with no result recorded (the next run runs it again)", signame, id),
    signame == "SIGINT" and 130 or 143
end

local function run_child(s, p, argv, dir)
  local c, err = jobs.start { argv = argv, out = dir .. "/" .. p.id .. ".out", err = dir .. "/" .. p.id .. ".err",
    timeout = s.timeout }
  if not c then return nil, err end
  return c
end

-- eval points that differ only in their tasks: one `moonshard eval --jobs auto` for the group
local function group_key(p)
  local f = {}
  local skip = false
  for _, a in ipairs(p.flags) do
    if skip then skip = false
    elseif a == "--tasks" then skip = true
    else f[#f + 1] = a end
  end
  return table.concat(f, " ") .. " @" .. p.world
end

local function tasks_of(p)
  local t = p.values.tasks
  if type(t) == "table" then return t end
  local out = {}
  for n in t:gmatch("[^,%s]+") do out[#out + 1] = n end
  return out
end

local function run_eval_group(s, dir, group, total)
  local names, seen = {}, {}
  for _, p in ipairs(group) do
    for _, t in ipairs(tasks_of(p)) do
      if not seen[t] then seen[t] = true names[#names + 1] = t end
    end
  end
  local lead = group[1]
  local gid = "g" .. lead.id:sub(2)
  local out = dir .. "/" .. gid .. ".eval.json"
  local flags = {}
  local skip = false
  for _, a in ipairs(lead.flags) do
    if skip then skip = false elseif a == "--tasks" then skip = true else flags[#flags + 1] = a end
  end
  local exe = require("moonshard.host").exe
  local argv = { exe, "eval", "--model", lead.model }
  for _, a in ipairs(flags) do argv[#argv + 1] = a end
  for _, a in ipairs { "--tasks", table.concat(names, ","), "--jobs", "auto", "--jobs-dir", dir .. "/" .. gid .. ".jobs",
    "--output", out } do argv[#argv + 1] = a end
  for _, p in ipairs(group) do
    local d = descriptor(s, p, argv, dir)
    d.group = gid
    d.tasks = tasks_of(p)
    jobs.write_json(dir .. "/" .. p.id .. ".json", d)
  end
  local ids = {}
  for _, p in ipairs(group) do ids[#ids + 1] = p.id end
  log("sweep %s: [%s/%d] eval of tasks %s as one planned run (%s)", s.name, table.concat(ids, ","), total,
    table.concat(names, ","), gid)
  os.remove(out)
  local c, err = jobs.start { argv = argv, out = dir .. "/" .. gid .. ".out", err = dir .. "/" .. gid .. ".err",
    timeout = s.timeout }
  if not c then return nil, err end
  log("  (pid %d)", c.pid)
  local interrupted = jobs.wait { c }
  if interrupted then return interrupted_run(interrupted, gid) end
  -- the merged results of the jobs that finished (written even when another job failed)
  local res = require("cjson.safe").decode(jobs.read(out) or "")
  local recs = {}
  for _, p in ipairs(group) do
    -- each point: its tasks' part of the run
    local part, complete = nil, type(res) == "table" and type(res.results) == "table"
    if complete then
      part = { results = {}, ["n-samples"] = {} }
      for _, t in ipairs(tasks_of(p)) do
        part.results[t] = res.results[t]
        part["n-samples"][t] = res["n-samples"] and res["n-samples"][t]
        if not res.results[t] then complete = false end
      end
    end
    -- the point's stdout and stderr are the group's; a point whose tasks all have results is ok
    local cp = { code = complete and 0 or c.code, signal = c.signal, timed_out = c.timed_out, seconds = c.seconds }
    if not complete and cp.code == 0 then cp.code = 1 end
    local function copy(ext)
      local text = jobs.read(dir .. "/" .. gid .. ext) or ""
      local f = io.open(dir .. "/" .. p.id .. ext, "wb")
      if f then f:write(text) f:close() end
    end
    copy(".out")
    copy(".err")
    recs[#recs + 1] = finish(s, dir, p, cp, part)
  end
  return recs
end

-- M.run(s, opts) -> { points, records = { key = record }, ran, failed, killed } | nil, message,
-- exit status (130 / 143: the sweep was sent SIGINT / SIGTERM, which stopped the running point)
--   opts.dir (default runs/<name>), opts.retry_failed, opts.dry_run (list only)
function M.run(s, opts)
  opts = opts or {}
  local points, perr = M.points(s)
  if not points then return nil, perr end
  local dir = opts.dir or ("runs/" .. s.name)
  local recs = M.read_results(dir .. "/results.jsonl")
  local todo = {}
  for _, p in ipairs(points) do
    local r = recs[p.key]
    if not r or (r.status ~= "ok" and opts.retry_failed) then todo[#todo + 1] = p end
  end
  if opts.dry_run then return { points = points, records = recs, todo = todo, dir = dir } end
  local ok, merr = jobs.mkdir_p(dir)
  if not ok then return nil, merr end
  log("sweep %s: %d point%s, %d to run, in %s", s.name, #points, #points == 1 and "" or "s", #todo, dir)
  local stats = { ran = 0, failed = 0, killed = 0 }
  local function count(r)
    if r == nil then stats.killed = stats.killed + 1
    else
      recs[r.key] = r
      if r.status ~= "ok" then stats.failed = stats.failed + 1 end
    end
  end
  -- eval points with a tasks axis go by groups through the planner
  local grouped, groups, order = {}, {}, {}
  for _, p in ipairs(todo) do
    if p.command == "eval" and p.values.tasks ~= nil then
      local g = group_key(p)
      if not groups[g] then groups[g] = {} order[#order + 1] = g end
      table.insert(groups[g], p)
      grouped[p] = groups[g]
    end
  end
  local done_group = {}
  for _, p in ipairs(todo) do
    local g = grouped[p]
    if g then
      if not done_group[g] then
        done_group[g] = true
        local rs, err, code = run_eval_group(s, dir, g, #points)
        if not rs then return nil, err, code end
        for i = 1, #g do
          stats.ran = stats.ran + 1
          count(rs[i])
        end
      end
    else
      local argv = M.argv(p, dir, p.command == "eval" and { args = { "--output", dir .. "/" .. p.id .. ".eval.json" } })
      jobs.write_json(dir .. "/" .. p.id .. ".json", descriptor(s, p, argv, dir))
      if p.command == "eval" then os.remove(dir .. "/" .. p.id .. ".eval.json") end
      io.stderr:write(string.format("sweep %s: [%d/%d] %s %s", s.name, p.index, #points, p.command, p.label))
      local c, err = run_child(s, p, argv, dir)
      if not c then
        io.stderr:write("\n")
        return nil, err
      end
      io.stderr:write(string.format(" (pid %d)\n", c.pid))
      local interrupted = jobs.wait { c }
      if interrupted then return interrupted_run(interrupted, p.id) end
      local result
      if p.command == "eval" and c.code == 0 then
        result = require("cjson.safe").decode(jobs.read(dir .. "/" .. p.id .. ".eval.json") or "")
      end
      stats.ran = stats.ran + 1
      count(finish(s, dir, p, c, result))
    end
  end
  return { points = points, records = recs, dir = dir, ran = stats.ran, failed = stats.failed, killed = stats.killed }
end

-- ------------------------------------------------------------------------------ the table

-- the columns shown for each command's metrics, in order
M.SHOWN = {
  bench = { { "decode_tok_s", "decode tok/s" }, { "prefill_tok_s", "prefill tok/s" }, { "ttft_ms", "TTFT ms" },
    { "decode_step_ms", "step ms" } },
  ["bench-serve"] = { { "output_tok_s", "output tok/s" }, { "ttft_ms.p50", "TTFT p50 ms" },
    { "itl_ms.p50", "ITL p50 ms" } },
}

local function fmt_num(v)
  if v == nil then return "" end
  if v ~= v then return "nan" end
  local a = math.abs(v)
  if a >= 1000 then return string.format("%.0f", v) end
  if a >= 100 then return string.format("%.1f", v) end
  if a >= 1 then return string.format("%.2f", v) end
  return string.format("%.4f", v)
end

-- M.table(s, run) -> markdown text: one row a point (its axes, status, seconds, metrics)
function M.table(s, run)
  local cols = { { "#", function(p) return tostring(p.index) end } }
  for _, ax in ipairs(s.axes) do
    if #ax.values > 1 or ax.name == "command" then
      cols[#cols + 1] = { ax.name, function(p) return show(p.values[ax.name]) end }
    end
  end
  cols[#cols + 1] = { "status", function(p, r)
    if not r then return "not run" end
    if r.status == "ok" then return "ok" end
    return r.timed_out and "timed out" or r.signal and ("failed (" .. signal_name(r.signal) .. ")")
      or ("failed (exit " .. tostring(r.exit) .. ")")
  end }
  cols[#cols + 1] = { "s", function(_, r) return r and r.seconds and string.format("%.1f", r.seconds) or "" end }
  -- metric columns of the commands present; eval: each task's first metric
  local present, tasks_metrics, seen = {}, {}, {}
  for _, p in ipairs(run.points) do
    present[p.command] = true
    local r = run.records[p.key]
    if p.command == "eval" and r and r.metrics then
      for k in pairs(r.metrics) do
        local task, metric = k:match("^(.+)%.([^.]+)$")
        if task and not seen[task] and (metric == "acc" or metric == "exact_match" or metric == "word_perplexity") then
          seen[task] = true
          tasks_metrics[#tasks_metrics + 1] = k
        end
      end
    end
  end
  for _, cmd in ipairs { "bench", "bench-serve" } do
    if present[cmd] then
      for _, m in ipairs(M.SHOWN[cmd]) do
        cols[#cols + 1] = { m[2], function(p, r)
          return p.command == cmd and r and r.metrics and fmt_num(r.metrics[m[1]]) or ""
        end }
      end
    end
  end
  table.sort(tasks_metrics)
  for _, k in ipairs(tasks_metrics) do
    cols[#cols + 1] = { k, function(_, r) return r and r.metrics and fmt_num(r.metrics[k]) or "" end }
  end
  local rows = {}
  for _, p in ipairs(run.points) do
    local r = run.records[p.key]
    local row = {}
    for i, c in ipairs(cols) do row[i] = c[2](p, r) end
    rows[#rows + 1] = row
  end
  local width = {}
  for i, c in ipairs(cols) do
    width[i] = #c[1]
    for _, row in ipairs(rows) do width[i] = math.max(width[i], #row[i]) end
  end
  local lines = {}
  local function line(cells, sep)
    local parts = {}
    for i, v in ipairs(cells) do
      parts[i] = sep and string.rep("-", width[i]) or string.format("%-" .. width[i] .. "s", v)
    end
    lines[#lines + 1] = "| " .. table.concat(parts, " | ") .. " |"
  end
  local head = {}
  for i, c in ipairs(cols) do head[i] = c[1] end
  line(head)
  line(head, true)
  for _, row in ipairs(rows) do line(row) end
  return table.concat(lines, "\n") .. "\n"
end

-- ------------------------------------------------------------------------------ plots

-- gnuplot plots of a run (moonshard.sweep_plot)
local plot = require "moonshard.sweep_plot"
M.plot_specs, M.write_plot, M.plots = plot.plot_specs, plot.write_plot, plot.plots

return M
