-- moonshard sweep (lua/moonshard/sweep.lua, scripts/sweep.lua), the eval batch planner
-- (lua/moonshard/policy/eval_jobs.lua) and `moonshard eval --jobs` (lua/moonshard/jobs.lua).
local h = require "helpers"
local cjson = require "cjson"
local sweep = require "moonshard.sweep"
local policy = require "moonshard.policy.eval_jobs"

local function lines(path)
  local out = {}
  local f = io.open(path, "rb")
  if not f then return out end
  for l in f:lines() do out[#out + 1] = cjson.decode(l) end
  f:close()
  return out
end

local function exists(path)
  local f = io.open(path, "rb")
  if f then f:close() end
  return f ~= nil
end

describe("eval jobs policy", function()
  local function tasks(costs)
    local t = {}
    for i, c in ipairs(costs) do t[i] = { name = "t" .. i, cost = c } end
    return t
  end
  local cpu2 = { nodes = { { cores = 2 } }, memory = { available = 16 * 2 ^ 30 }, gpus = {} }

  it("cuts tasks longest first to the least loaded job on CPU cores", function()
    local p = assert(policy.plan(tasks { 10, 7, 5, 4 }, cpu2, { device = "cpu" }))
    assert.equal(2, p.slots)
    assert.equal(2, #p.jobs)
    -- 10 -> job 1, 7 -> job 2, 5 -> job 2 (7 < 10), 4 -> job 1 (10 < 12); tasks in the order asked
    assert.same({ "t1", "t4" }, p.jobs[1].tasks)
    assert.same({ "t2", "t3" }, p.jobs[2].tasks)
    assert.equal(14, p.jobs[1].cost)
    assert.equal(12, p.jobs[2].cost)
    assert.equal(1, p.jobs[1].threads)
  end)

  it("fits ranks, a job cap and RAM on the CPU", function()
    local cpu16 = { nodes = { { cores = 16 } }, memory = { available = 10 * 2 ^ 30 }, gpus = {} }
    local p = assert(policy.plan(tasks { 1, 1, 1, 1, 1, 1 }, cpu16, { device = "cpu", ranks = 2 }))
    assert.equal(6, #p.jobs) -- 8 slots of 2 ranks, 6 tasks
    assert.equal(1, p.jobs[1].threads)
    p = assert(policy.plan(tasks { 1, 1, 1, 1, 1, 1 }, cpu16, { device = "cpu", ranks = 2, jobs = 2 }))
    assert.equal(2, #p.jobs)
    assert.equal(4, p.jobs[1].threads) -- 16 cores over 2 jobs of 2 ranks
    -- 3 GiB a rank, 2 ranks a job: RAM for one job at once
    p = assert(policy.plan(tasks { 1, 1, 1 }, cpu16, { device = "cpu", ranks = 2, need_bytes = 3 * 2 ^ 30 }))
    assert.equal(1, #p.jobs)
    assert.same({ "t1", "t2", "t3" }, p.jobs[1].tasks)
    local none, err = policy.plan(tasks { 1 }, cpu16, { device = "cpu", ranks = 2, need_bytes = 6 * 2 ^ 30 })
    assert.is_nil(none)
    assert.matches("needs 12.0 GiB of RAM, 10.0 GiB available", err, 1, true)
  end)

  it("takes free GPUs, tensor-parallel ranks inside one island", function()
    local gpus = {}
    for i = 0, 7 do
      gpus[#gpus + 1] = { index = i, node = 0, island = i < 4 and 0 or 1, memory = 80e9,
        memory_free = i == 3 and 1e9 or 79e9 }
    end
    local topo = { nodes = { { cores = 64 } }, gpus = gpus }
    local p = assert(policy.plan(tasks { 5, 4, 3, 2, 1 }, topo, { device = "cuda", ranks = 2, need_bytes = 10e9 }))
    -- GPU 3 is too full: island 0 gives {0,1} (2 is left alone), island 1 gives {4,5} and {6,7}
    assert.equal(3, p.slots)
    assert.same({ 0, 1 }, p.jobs[1].gpus)
    assert.same({ 4, 5 }, p.jobs[2].gpus)
    assert.same({ 6, 7 }, p.jobs[3].gpus)
    assert.same({ "t1" }, p.jobs[1].tasks)
    assert.same({ "t2", "t5" }, p.jobs[2].tasks)
    assert.same({ "t3", "t4" }, p.jobs[3].tasks)
    -- one GPU a job: 7 free GPUs, 5 tasks -> 5 jobs
    p = assert(policy.plan(tasks { 5, 4, 3, 2, 1 }, topo, { device = "cuda", need_bytes = 10e9 }))
    assert.equal(7, p.slots)
    assert.equal(5, #p.jobs)
    local none, err = policy.plan(tasks { 1 }, topo, { device = "cuda", need_bytes = 100e9 })
    assert.is_nil(none)
    assert.matches("no 1 free GPU for a job", err, 1, true)
  end)

  it("plans over a described machine (topology fixture: 8 GPUs on NVSwitch)", function()
    local topo = assert(require("moonshard.topology").discover { topology = h.root .. "/tests/fixtures/topology/dgx8.xml" })
    local p = assert(policy.plan(tasks { 9, 8, 7, 6, 5, 4, 3, 2, 1, 1 }, topo, { device = "cuda", ranks = 4, need_bytes = 20e9 }))
    assert.equal(2, #p.jobs)
    assert.same({ 0, 1, 2, 3 }, p.jobs[1].gpus)
    assert.same({ 4, 5, 6, 7 }, p.jobs[2].gpus)
    assert.is_true(math.abs(p.jobs[1].cost - p.jobs[2].cost) <= 2)
  end)
end)

describe("sweep files", function()
  local dir
  before_each(function() dir = h.tmpdir() end)
  after_each(function() h.rmdir(dir) end)

  local function load(body)
    local path = dir .. "/s.lua"
    h.write(path, body)
    return sweep.load(path)
  end

  it("names the file and the field of bad input", function()
    local cases = {
      { "return 5", "s.lua: a sweep file returns a table (got number)" },
      { [[return { command = "bench", model = "m", axes = { batchsize = { 1 } } }]],
        "s.lua: field 'axes.batchsize': unknown axis type 'batchsize'" },
      { [[return { command = "bench", model = "m", axes = { batch = {} } }]], "s.lua: field 'axes.batch': no values" },
      { [[return { command = "train", model = "m" }]], "s.lua: field 'command': unknown command 'train'" },
      { [[return { command = "bench", model = "m", axes = { batch = { 1, 0 } } }]],
        "s.lua: field 'axes.batch': value 2 ('0') is not a positive integer" },
      { [[return { command = "bench", model = "m", axes = { tasks = { "piqa" } } }]],
        "s.lua: field 'axes.tasks': does not apply to command 'bench'" },
      { [[return { command = "eval", model = "m", axes = { tasks = { "piqa", "nosuch" } } }]],
        "s.lua: field 'axes.tasks': value 2: unknown task 'nosuch'" },
      { [[return { command = "bench", axes = { batch = { 1 } } }]], "s.lua: field 'model': a model path is required" },
      { [[return { command = "bench", model = "m", axis = {} }]], "s.lua: field 'axis': unknown field" },
    }
    for _, c in ipairs(cases) do
      local s, err = load(c[1])
      assert.is_nil(s, c[1])
      assert.matches(c[2], err, 1, true)
      assert.is_nil(err:find("\n"), err)
    end
    -- through the command: one line, exit 2
    h.write(dir .. "/bad.lua", [[return { command = "bench", model = "m", axes = { batch = {} } }]])
    local out, err, code = h.run { "sweep", dir .. "/bad.lua" }
    assert.equal(2, code)
    assert.equal("", out)
    assert.matches("^moonshard sweep: [^\n]*bad%.lua: field 'axes%.batch': no values\n$", err)
  end)

  it("makes the cartesian product, filtered by where, with launch for ranks", function()
    local s = assert(load([[return { command = "bench", model = "m", flags = { loops = 2, ["no-ceilings"] = true },
      axes = { tp = { 1, 2 }, pp = { 1, 2 }, batch = { 1, 8 }, ["--gen-len"] = { 16 } },
      where = function(p) return p.world < 4 and p.gen_len == 16 end }]]))
    local pts = assert(sweep.points(s))
    assert.equal(6, #pts) -- 8 less the two tp=2 pp=2
    assert.same({ pp = 1, tp = 1, batch = 8, command = "bench", ["--gen-len"] = 16 }, pts[2].values)
    assert.same({ "--batch-size", "8", "--gen-len", "16", "--loops", "2", "--no-ceilings", "--pp", "1", "--tp", "1" },
      pts[2].flags)
    local argv = sweep.argv(pts[3], "R")
    assert.same({ "launch", "-n", "2", "--log-dir", "R/p003.logs", "bench" }, { unpack(argv, 2, 7) })
    assert.equal(1, #sweep.argv(pts[1], "R") - #pts[1].flags - 3) -- exe, bench, --model, m: no launch
  end)
end)

describe("moonshard sweep", function()
  local dir
  before_each(function() dir = h.tmpdir() end)
  after_each(function() h.rmdir(dir) end)

  it("records results, a failed point, resumes after a killed point and plots", function()
    -- 4 points: batch 1, 2 x gen-len 8 (runs) and 2000 (beyond stories260K's context of 512: fails)
    local file = dir .. "/four.lua"
    h.write(file, string.format([[return { name = "four", command = "bench", model = %q,
      flags = { ["prompt-len"] = 16, loops = 400, ["no-ceilings"] = true, threads = 1 },
      axes = { batch = { 1, 2 }, ["--gen-len"] = { 8, 2000 } } }]], h.stories))
    local run = dir .. "/run"
    local out = h.run { "sweep", file, "--dir", run, "--dry-run" }
    assert.matches("sweep four: 4 points in " .. run:gsub("%p", "%%%0") .. " %(4 to run%)", out)
    assert.equal(4, select(2, out:gsub("to run ", "")))

    -- the first run: the third point's child is killed as soon as it has started
    local sh = string.format([[
      : >%s/err1
      %s sweep %s --dir %s >%s/out1 2>%s/err1 &
      S=$!
      i=0
      while ! grep -q '\[3/4\].*(pid [0-9]*)' %s/err1; do i=$((i+1)); [ $i -gt 1500 ] && break; sleep 0.02; done
      P=$(sed -n 's/.*\[3\/4\].*(pid \([0-9]*\)).*/\1/p' %s/err1)
      kill -KILL "$P"
      wait $S
      echo "code=$?"
    ]], h.q(dir), h.q(h.exe), h.q(file), h.q(run), h.q(dir), h.q(dir), h.q(dir), h.q(dir))
    local res = h.sh(sh)
    local err1 = h.read(dir .. "/err1")
    assert.equal("1", res:match("code=(%d+)"), err1)
    assert.matches("killed by SIGKILL: no result recorded", err1, 1, true)
    -- every point's descriptor was written before it started, the killed one's too
    for i = 1, 4 do
      local d = cjson.decode(h.read(string.format("%s/p%03d.json", run, i)))
      assert.equal("bench", d.command)
      assert.equal(h.stories, d.model)
      assert.equal(1, d.topology.ranks)
      assert.equal("string", type(d.time))
      assert.equal("number", type(d.machine.cores))
      assert.equal(d.command, d.launch.command)
      assert.same(d.args, d.launch.args)
      if d.commit ~= cjson.null then assert.matches("^%x+$", d.commit.hash) end
    end
    assert.equal("", h.read(run .. "/p003.out")) -- killed before it printed a result
    local recs = lines(run .. "/results.jsonl")
    assert.equal(3, #recs)
    local by = {}
    for _, r in ipairs(recs) do by[r.sweep_point] = r end
    assert.equal("ok", by.p001.status)
    assert.is_true(by.p001.metrics.decode_tok_s > 0)
    assert.equal(1, by.p001.result.batch_size)
    for _, id in ipairs { "p002", "p004" } do
      assert.equal("failed", by[id].status)
      assert.equal(1, by[id].exit)
      assert.matches("exceeds the context of 512", by[id].stderr_tail[#by[id].stderr_tail], 1, true)
    end
    assert.is_nil(by.p003)

    -- the rerun runs the killed point only
    local out2, err2, code2 = h.run { "sweep", file, "--dir", run }
    assert.equal(1, code2) -- two points stay failed
    assert.matches("4 points, 1 to run", err2, 1, true)
    assert.matches("[3/4]", err2, 1, true)
    for _, n in ipairs { "[1/4]", "[2/4]", "[4/4]" } do assert.is_nil(err2:find(n, 1, true), err2) end
    recs = lines(run .. "/results.jsonl")
    assert.equal(4, #recs)
    assert.equal("p003", recs[4].sweep_point)
    assert.equal("ok", recs[4].status)
    assert.equal(2, recs[4].result.batch_size)
    -- the table: one row a point
    assert.matches("| 3 | bench   | 2     | 8         | ok ", out2, 1, true)
    assert.matches("| 2 | bench   | 1     | 2000      | failed (exit 1) |", out2, 1, true)
    -- throughput against batch size, with its script and data
    local png = run .. "/plots/throughput_vs_batch.png"
    assert.matches("plot: " .. png, out2, 1, true)
    local img = h.read(png)
    assert.is_true(#img > 1000)
    assert.equal("\137PNG\r\n\26\n", img:sub(1, 8))
    local dat = h.read(run .. "/plots/throughput_vs_batch.dat")
    assert.matches("# %-%-gen%-len=8\n0 [%d.e+]+ 1\n1 [%d.e+]+ 2\n", dat)
    assert.matches('plot "throughput_vs_batch.dat" index 0', h.read(run .. "/plots/throughput_vs_batch.gp"), 1, true)

    -- a third run has nothing left to do
    local _, err3 = h.run { "sweep", file, "--dir", run, "--no-plots" }
    assert.matches("4 points, 0 to run", err3, 1, true)
    assert.equal(4, #lines(run .. "/results.jsonl"))
  end)

  it("stops the running point with itself on SIGTERM, recording nothing for it", function()
    local file = dir .. "/long.lua"
    h.write(file, string.format([[return { name = "long", command = "bench", model = %q,
      flags = { ["prompt-len"] = 16, ["gen-len"] = 8, loops = 1000000, ["no-ceilings"] = true, threads = 1 },
      axes = { batch = { 1, 2 } } }]], h.stories))
    local run = dir .. "/long-run"
    local res = h.sh(string.format([[
      : >%s/lerr
      %s sweep %s --dir %s >/dev/null 2>%s/lerr &
      S=$!
      i=0
      while ! grep -q '\[1/2\].*(pid [0-9]*)' %s/lerr; do i=$((i+1)); [ $i -gt 1500 ] && break; sleep 0.02; done
      P=$(sed -n 's/.*\[1\/2\].*(pid \([0-9]*\)).*/\1/p' %s/lerr)
      sleep 0.5
      kill -TERM "$S"
      wait $S
      echo "code=$? child=$P"
    ]], h.q(dir), h.q(h.exe), h.q(file), h.q(run), h.q(dir), h.q(dir), h.q(dir)))
    local err = h.read(dir .. "/lerr")
    local child = tonumber(res:match("child=(%d+)"))
    assert.truthy(child, err)
    assert.equal("143", res:match("code=(%d+)"), err)
    assert.matches("SIGTERM: p001 stopped with no result recorded", err, 1, true)
    -- the point's child ended with the sweep (not left running beside the next run's)
    for _ = 1, 100 do
      if not h.running(child) then break end
      os.execute("sleep 0.05")
    end
    local alive = h.running(child)
    if alive then h.sh("kill -KILL " .. child) end
    assert.is_false(alive)
    assert.is_false(exists(run .. "/results.jsonl"))
    assert.is_nil(err:find("[2/2]", 1, true), err)
  end)

  it("runs a task-list axis as one planned eval, a job's descriptor and events per task", function()
    local file = dir .. "/tasks.lua"
    h.write(file, string.format([[return { command = "eval", model = %q, flags = { limit = 8 },
      axes = { tasks = { "arc_easy", "piqa,copa" } } }]], h.stories))
    local run = dir .. "/run"
    local out, err, code = h.run { "sweep", file, "--dir", run }
    assert.equal(0, code, err)
    assert.matches("one planned run", err, 1, true)
    local recs = lines(run .. "/results.jsonl")
    assert.equal(2, #recs)
    assert.is_number(recs[1].metrics["arc_easy.acc"])
    assert.is_nil(recs[1].metrics["piqa.acc"])
    assert.is_number(recs[2].metrics["piqa.acc"])
    assert.is_number(recs[2].metrics["copa.acc"])
    assert.matches("arc_easy.acc", out, 1, true)
    -- the planner's jobs: every task once, each job's descriptor before its events
    local jobs_l = lines(run .. "/g001.jobs/jobs.jsonl")
    local seen = {}
    for _, j in ipairs(jobs_l) do
      assert.equal("eval", j.launch.command)
      for _, t in ipairs(j.tasks) do seen[#seen + 1] = t end
    end
    table.sort(seen)
    assert.same({ "arc_easy", "copa", "piqa" }, seen)
    local done = {}
    for _, e in ipairs(lines(run .. "/g001.jobs/events.jsonl")) do
      if e.event == "task_done" then done[e.task] = e.job end
    end
    for _, j in ipairs(jobs_l) do
      for _, t in ipairs(j.tasks) do assert.equal(j.job, done[t]) end
    end
  end)

  it("eval --jobs: a replaced policy, pipeline stages reporting, results as one run", function()
    local pol = dir .. "/one.lua"
    h.write(pol, [[return { plan = function(tasks, topo, opts)
      local names = {}
      for _, t in ipairs(tasks) do names[#names + 1] = t.name end
      return { jobs = { { id = 1, tasks = names, cost = 0, ranks = opts.ranks, threads = 1 } }, slots = 1, reason = "one" }
    end }]])
    local jd = dir .. "/jobs"
    local out, err, code = h.run { "eval", "--model", h.stories, "--tasks", "arc_easy,piqa", "--limit", "8", "--pp", "2",
      "--jobs", "auto", "--jobs-policy", pol, "--jobs-dir", jd, "--output", dir .. "/res.json" }
    assert.equal(0, code, err)
    local jl = lines(jd .. "/jobs.jsonl")
    assert.equal(1, #jl)
    assert.same({ "arc_easy", "piqa" }, jl[1].tasks)
    assert.equal(2, jl[1].launch.nproc_per_node)
    assert.equal("launch", jl[1].argv[2])
    local stages = {}
    for _, e in ipairs(lines(jd .. "/events.jsonl")) do
      if e.event == "task_done" then stages[e.task .. ":" .. e.stage] = true end
    end
    assert.same({ ["arc_easy:0"] = true, ["arc_easy:1"] = true, ["piqa:0"] = true, ["piqa:1"] = true }, stages)
    local res = cjson.decode(h.read(dir .. "/res.json"))
    assert.is_number(res.results.arc_easy["acc,none"])
    assert.is_number(res.results.piqa["acc,none"])
    assert.matches("|arc_easy", out, 1, true)
    -- the same scores without the planner
    local one = dir .. "/one.json"
    local _, e2, c2 = h.run { "eval", "--model", h.stories, "--tasks", "arc_easy,piqa", "--limit", "8", "--output", one }
    assert.equal(0, c2, e2)
    local ref = cjson.decode(h.read(one))
    assert.equal(ref.results.arc_easy["acc,none"], res.results.arc_easy["acc,none"])
    assert.equal(ref.results.piqa["acc_norm,none"], res.results.piqa["acc_norm,none"])
  end)
end)

describe("jobs.stop", function()
  it("ends every child still running (SIGTERM, then SIGKILL for one that ignores it) and returns", function()
    local jobs = require "moonshard.jobs"
    local uv = require "luv"
    local tmp = h.tmpdir()
    local grace = jobs.GRACE
    jobs.GRACE = 0.5
    local a = assert(jobs.start { argv = { "/bin/sleep", "30" }, out = tmp .. "/a.out", err = tmp .. "/a.err" })
    local b = assert(jobs.start { argv = { "/bin/sh", "-c", "trap '' TERM; echo ready; while :; do sleep 1; done" },
      out = tmp .. "/b.out", err = tmp .. "/b.err" })
    assert.is_true(h.wait_until(function() return (h.read(tmp .. "/b.out") or ""):find("ready") ~= nil end, 5))
    local t0 = uv.hrtime()
    jobs.stop { a, b }
    jobs.GRACE = grace
    local secs = (uv.hrtime() - t0) / 1e9
    h.rmdir(tmp)
    assert.is_true(a.done and b.done)
    assert.are.equal(15, a.signal)
    assert.are.equal(9, b.signal)
    assert.is_true(secs < 5, secs)
  end)
end)
