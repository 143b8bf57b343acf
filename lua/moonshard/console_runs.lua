-- moonshard.console_runs: the past runs the web console lists (moonshard.console): its own eval
-- jobs' folders and results files, `moonshard eval --jobs` folders (jobs.jsonl) and `moonshard
-- sweep` folders (results.jsonl), read from the eval dir and the runs dir as plain tables.
local cjson = require "cjson"
local uv = require "luv"

local M = {}

local null = cjson.null
local read_file = require("moonshard.jobs").read -- (path) -> text | nil

-- M.file_exists(path) -> is a regular file, its stat
function M.file_exists(path)
  local st = uv.fs_stat(path)
  return st and st.type == "file", st
end
local file_exists = M.file_exists

local function decode_file(path)
  local text = read_file(path)
  if not text then return nil end
  local ok, v = pcall(cjson.decode, text)
  return ok and type(v) == "table" and v or nil
end

local jsonl = require("moonshard.jobs").jsonl

local function list_dir(dir)
  local names = {}
  local h = uv.fs_scandir(dir)
  while h do
    local n, kind = uv.fs_scandir_next(h)
    if not n then break end
    names[#names + 1] = { n, kind }
  end
  table.sort(names, function(a, b) return a[1] > b[1] end)
  return names
end

local function mtime(path)
  local st = uv.fs_stat(path)
  return st and st.mtime.sec or nil
end

-- "2026-12-07T12:30:00Z" -> unix seconds (days from the civil date, as in Howard Hinnant's algorithm)
function M.iso_time(s)
  local y, mo, d, h, mi, se = tostring(s):match("^(%d%d%d%d)%-(%d%d)%-(%d%d)T(%d%d):(%d%d):(%d%d)")
  if not y then return nil end
  y, mo, d = tonumber(y), tonumber(mo), tonumber(d)
  if mo <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local doy = math.floor((153 * (mo + (mo > 2 and -3 or 9)) + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  local days = era * 146097 + doe - 719468
  return days * 86400 + tonumber(h) * 3600 + tonumber(mi) * 60 + tonumber(se)
end

-- a results table's numbers by task (stderr columns left out)
local function scores_of(results)
  local scores = {}
  for task, m in pairs(type(results) == "table" and results or {}) do
    local row = {}
    if type(m) == "table" then
      for key, v in pairs(m) do
        if type(v) == "number" and not key:find("_stderr", 1, true) then row[key] = v end
      end
    end
    scores[task] = row
  end
  return scores
end

-- the value of a flag in an argument list ({ ..., "--limit", "20", ... })
local function flag_value(args, name)
  for i, a in ipairs(type(args) == "table" and args or {}) do
    if a == name then return args[i + 1] end
  end
  return nil
end

-- a console eval job's folder (eval.json, results.json) or a results file
local function console_run(path, desc, name)
  local r = path and decode_file(path)
  if r and type(r.results) == "table" then
    return { id = desc and desc.id or name, kind = "console", file = path, date = r.date or (desc and desc.finished) or null,
      model = desc and desc.model or (type(r.config) == "table" and r.config.model_path) or null,
      limit = type(r.config) == "table" and r.config.limit or null, n_shot = r["n-shot"] or null,
      state = desc and desc.state or "done", scores = scores_of(r.results) }
  end
  if desc then
    return { id = desc.id or name, kind = "console", state = desc.state, date = desc.finished or desc.created or null,
      model = desc.model or null, error = desc.error or null, scores = {} }
  end
end

-- `moonshard eval --jobs` folder: its jobs' descriptors (jobs.jsonl), their ends (events.jsonl) and
-- each job's results (job-N.results.json once it has written them): one run
function M.eval_jobs_run(dir, name)
  local descs = jsonl(dir .. "/jobs.jsonl")
  if #descs == 0 then return nil end
  local ends, started = {}, {}
  for _, e in ipairs(jsonl(dir .. "/events.jsonl")) do
    if e.event == "job_done" and e.job then ends[e.job] = e end
    if e.event == "job_start" and e.job then started[e.job] = true end
  end
  local scores, failed, open, tasks = {}, {}, 0, {}
  for _, d in ipairs(descs) do
    for _, t in ipairs(type(d.tasks) == "table" and d.tasks or {}) do tasks[#tasks + 1] = t end
    local e = ends[d.job]
    local res = decode_file(string.format("%s/job-%s.results.json", dir, tostring(d.job)))
    if res and type(res.results) == "table" then
      for task, row in pairs(scores_of(res.results)) do scores[task] = row end
    end
    if not e then
      open = open + 1
    elseif e.exit ~= 0 or (e.signal or 0) ~= 0 then
      failed[#failed + 1] = string.format("job %s %s", tostring(d.job),
        (e.signal or 0) ~= 0 and ("killed by signal " .. tostring(e.signal)) or ("exit " .. tostring(e.exit)))
    end
  end
  local d1 = descs[1]
  local limit = tonumber(flag_value(d1.args, "--limit"))
  return { id = name, kind = "eval --jobs", file = dir .. "/jobs.jsonl", jobs = #descs,
    date = mtime(dir .. "/events.jsonl") or M.iso_time(d1.time) or null, model = d1.model or null, limit = limit or null,
    tasks = tasks, state = open > 0 and "running" or #failed > 0 and "failed" or "done",
    error = #failed > 0 and table.concat(failed, "; ") or null, scores = scores }
end

-- a `moonshard sweep` folder: one run per line of results.jsonl (its point's descriptor beside it)
function M.sweep_runs(dir, name)
  local out = {}
  for _, r in ipairs(jsonl(dir .. "/results.jsonl")) do
    local point = r.sweep_point or ("p" .. tostring(r.index))
    local desc = decode_file(dir .. "/" .. point .. ".json") or {}
    local run = { id = name .. "/" .. point, kind = "sweep " .. tostring(r.command or desc.command or "?"),
      file = dir .. "/results.jsonl", date = M.iso_time(r.date) or null, model = desc.model or null,
      state = r.status == "ok" and "done" or "failed", axes = r.axes or null, label = r.label or null,
      limit = tonumber(flag_value(desc.args, "--limit")) or null, scores = {} }
    if r.status ~= "ok" then
      local tail = type(r.stderr_tail) == "table" and r.stderr_tail[#r.stderr_tail] or nil
      run.error = (r.timed_out and "timed out" or ("exit " .. tostring(r.exit))) .. (tail and (": " .. tail) or "")
    elseif r.command == "eval" then
      run.scores = scores_of(type(r.result) == "table" and r.result.results)
    else
      local m = {}
      for k, v in pairs(type(r.metrics) == "table" and r.metrics or {}) do
        if type(v) == "number" then m[k] = v end
      end
      run.metrics = m
    end
    out[#out + 1] = run
  end
  table.sort(out, function(a, b) return a.id > b.id end)
  return out
end

-- M.past_runs(eval_dir, runs_dir, busy(id)) -> runs: in the eval dir, the console's jobs (<id>/eval.json with results.json) and results
-- files (*.json); in the eval dir and the runs dir, to two folders down, `moonshard eval --jobs`
-- folders (jobs.jsonl) and `moonshard sweep` folders (results.jsonl)
function M.past_runs(eval_dir, runs_dir, busy)
  local out = {}
  local function add(run)
    if run and not busy(run.id) then
      out[#out + 1] = run
    end
  end
  local function folder(dir, name)
    if file_exists(dir .. "/jobs.jsonl") then add(M.eval_jobs_run(dir, name)) return true end
    if file_exists(dir .. "/results.jsonl") then
      for _, r in ipairs(M.sweep_runs(dir, name)) do add(r) end
      return true
    end
    return false
  end
  local function scan(dir, prefix, depth, console)
    for _, e in ipairs(list_dir(dir)) do
      local name, kind = e[1], e[2]
      local path = dir .. "/" .. name
      if kind == "directory" then
        local desc = console and decode_file(path .. "/eval.json")
        if desc or (console and file_exists(path .. "/results.json")) then
          add(console_run(path .. "/results.json", desc, name))
        elseif not folder(path, prefix .. name) and depth < 2 then
          scan(path, prefix .. name .. "/", depth + 1, false)
        end
      elseif console and name:match("%.json$") then
        add(console_run(path, nil, name))
      end
    end
  end
  local seen = {}
  for i, dir in ipairs { eval_dir or false, runs_dir or false } do
    if dir and not seen[dir] then
      seen[dir] = true
      if not folder(dir, dir:match("([^/]+)/*$") or dir) then scan(dir, "", 1, i == 1) end
    end
  end
  return out
end

return M
