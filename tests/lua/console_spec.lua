-- The web console of `moonshard serve` (moonshard.console, web/): its warnings as pure functions,
-- its routes against a serve child on stories260K (static files, traversal refused, the API key,
-- bad input named, the events stream, eval jobs through the engine: the same table as
-- `moonshard eval`, cancelled on request, chat answered meanwhile), and the page itself in
-- headless Chromium (tests/web/console_browser.py, screenshots in build/console-screenshots).
local h = require "helpers"
local cjson = require "cjson"
local uv = require "luv"
local console = require "moonshard.console"
local metrics = require "moonshard.metrics"

local KEY = "console-spec-key"

-- starts `moonshard serve ARGS --port 0`, or with o.n `moonshard launch -n N [o.launch] serve ...`
-- (the run folder dir/logs); returns { pid, port, url, log, dir, logs }
local function start(args, o)
  o = o or {}
  local dir = h.tmpdir()
  local log = dir .. "/serve.log"
  local parts = { "exec timeout -k 5 170", h.q(h.exe) }
  if o.log then parts[1] = "exec env MSH_LOG_DIR=" .. h.q(dir .. "/logs") .. " timeout -k 5 170" end
  if o.n then
    for _, a in ipairs { "launch", "-n", tostring(o.n), "--grace", "3", "--log-dir", dir .. "/logs" } do parts[#parts + 1] = h.q(a) end
    for _, a in ipairs(o.launch or {}) do parts[#parts + 1] = h.q(a) end
  end
  for _, a in ipairs { "serve", "--model", h.stories, "--port", "0", "--template", "chatml", "--quiet", "--eval-dir",
    dir .. "/evals" } do parts[#parts + 1] = h.q(a) end
  for _, a in ipairs(args or {}) do parts[#parts + 1] = h.q(a) end
  local out = h.sh("(" .. table.concat(parts, " ") .. " >/dev/null 2>" .. h.q(log) .. " </dev/null) & echo $!")
  local pid = assert(tonumber(out:match("%d+")))
  local port
  for _ = 1, 400 do
    local text = h.read(log) or ""
    port = text:match("listening on http://127%.0%.0%.1:(%d+)")
    if port or not h.running(pid) then break end
    uv.sleep(50)
  end
  assert(port, "serve did not start: " .. tostring(h.read(log)))
  return { pid = pid, port = tonumber(port), url = "http://127.0.0.1:" .. port, log = log, dir = dir, logs = dir .. "/logs" }
end

local function stop(s)
  if not s then return end
  h.sh("kill " .. s.pid .. " 2>/dev/null")
  for _ = 1, 300 do
    if not h.running(s.pid) then break end
    uv.sleep(20)
  end
  h.rmdir(s.dir)
end

-- curl: status, headers text (lower-cased names), body
local function curl(s, path, opts)
  opts = opts or {}
  local args = { "curl", "-s", "-S", "--path-as-is", "--max-time", tostring(opts.max_time or 30), "-D", "-", "-o", "-" }
  if opts.method then args[#args + 1] = "-X " .. opts.method end
  if opts.key ~= false then args[#args + 1] = "-H " .. h.q("Authorization: Bearer " .. (opts.key or KEY)) end
  for _, hd in ipairs(opts.headers or {}) do args[#args + 1] = "-H " .. h.q(hd) end
  if opts.body then args[#args + 1] = "-H 'Content-Type: application/json' --data-binary " .. h.q(opts.body) end
  if opts.no_buffer then args[#args + 1] = "-N" end
  args[#args + 1] = h.q(s.url .. path)
  local out = h.sh(table.concat(args, " ") .. " 2>/dev/null")
  out = out:gsub("^HTTP/1%.1 100 Continue\r\n\r\n", "")
  local head, body = out:match("^(.-\r\n)\r\n(.*)$")
  local status = tonumber((head or ""):match("^HTTP/1%.1 (%d+)"))
  return status, (head or ""):lower(), body or out
end

local function json(s, path, opts)
  local status, head, body = curl(s, path, opts)
  local ok, v = pcall(cjson.decode, body)
  return status, ok and v or body, head
end

local function post(s, path, obj, opts)
  opts = opts or {}
  opts.body = type(obj) == "string" and obj or cjson.encode(obj)
  return json(s, path, opts)
end

local function metric(s, name)
  local _, _, body = curl(s, "/metrics")
  return metrics.parse(body)[name]
end

-- the events stream's live samples (decoded, in order) read for `secs` seconds while, with load,
-- completions of 48 tokens run one after another from 0.2 s in to 0.6 s before the end
local function samples_during(s, secs, load)
  local out_file = string.format("%s/events-%d.txt", s.dir, uv.hrtime())
  local script = ""
  if load then
    local body = cjson.encode { prompt = "Once upon a time", max_tokens = 48, ignore_eos = true }
    script = string.format("( sleep 0.2; end=$(( $(date +%%s%%N) / 1000000 + %d )); "
      .. "while [ $(( $(date +%%s%%N) / 1000000 )) -lt $end ]; do curl -s -o /dev/null --max-time 5 "
      .. "-H 'Content-Type: application/json' --data-binary %s %s; done ) >/dev/null 2>&1 & ",
      math.floor((secs - 0.8) * 1000), h.q(body), h.q(s.url .. "/v1/completions"))
  end
  script = script .. string.format("curl -s -N --max-time %g %s > %s 2>/dev/null; wait", secs,
    h.q(s.url .. "/v1/console/events"), h.q(out_file))
  h.sh(script)
  local body = h.read(out_file) or ""
  local live = {}
  for block in (body .. "\n\n"):gmatch("(.-)\n\n") do
    local d = block:match("^data: (.*)$")
    if d then live[#live + 1] = cjson.decode(d) end
  end
  return live, body
end

-- the first sample for which pred(sample) holds
local function find(samples, pred)
  for _, x in ipairs(samples) do if pred(x) then return x end end
  return nil
end

-- bytes sent as they are on a new connection; everything the server writes until it closes
local function raw_request(s, text)
  local c, buf, done = uv.new_tcp(), "", false
  c:connect("127.0.0.1", s.port, function(err)
    if err then done = true return end
    c:write(text)
    c:read_start(function(_, data)
      if data then buf = buf .. data else done = true end
    end)
  end)
  h.wait_until(function() return done end, 5)
  c:close()
  uv.run("nowait")
  return buf
end

-- polls an eval job until it leaves queued/running
local function wait_job(s, id, seconds)
  local job
  for _ = 1, (seconds or 60) * 10 do
    local _, j = json(s, "/v1/console/evals/" .. id)
    job = j
    if type(j) == "table" and j.state ~= "running" and j.state ~= "queued" then return j end
    uv.sleep(100)
  end
  error("the eval job did not end: " .. cjson.encode(job))
end

describe("moonshard.console warnings", function()
  local th = require "moonshard.console_thresholds"

  it("flags the telemetry series over their thresholds and skips those without a source", function()
    local w = console.warnings({ queue = 3, kv_used = 10, kv_total = 100, ttft_ms = 20, ranks = { { rank = 0, age_s = 0 } } }, th)
    assert.are.same({}, w)
    w = console.warnings({ queue = 65, kv_used = 99, kv_total = 100, ttft_ms = 6000, bubble = 0.4, prefetch_stall_s = 0.2,
      ranks = { { rank = 0, age_s = 0 }, { rank = 3, age_s = 9 } } }, th)
    local keys = {}
    for _, x in ipairs(w) do keys[#keys + 1] = x.key end
    assert.are.same({ "bubble", "prefetch_stall", "rank_silent", "queue", "kv", "ttft" }, keys)
    assert.truthy(w[1].message:find("40%", 1, true), w[1].message)
    assert.truthy(w[3].message:find("rank 3", 1, true), w[3].message)
    -- no bubble, no prefetch, no ranks: nothing said about them
    assert.are.same({}, console.warnings({ bubble = nil, prefetch_stall_s = nil }, th))
  end)

  it("checks the served mode against what doctor found: GPU memory, host memory, pinned memory, NVLink", function()
    local GiB = 2 ^ 30
    local m = { gpus = { { memory = 80 * GiB }, { memory = 80 * GiB } }, islands = { { kind = "pcie", gpus = { 0, 1 } } },
      memory = { available = 64 * GiB }, pinned = { allowed = 8 * GiB } }
    local w = console.mode_warnings({ device = "cuda", tp = 2, pp = 1, weight_bytes = 200 * GiB, kv_bytes = 0,
      pinned_bytes = 16 * GiB }, m, th)
    local keys = {}
    for _, x in ipairs(w) do keys[#keys + 1] = x.key end
    assert.are.same({ "gpu_memory", "pinned", "nvlink" }, keys)
    assert.truthy(w[1].message:find("100.0 GiB a GPU", 1, true), w[1].message)
    m.islands = { { kind = "nvlink", gpus = { 0, 1 } } }
    assert.are.same({}, console.mode_warnings({ device = "cuda", tp = 2, pp = 1, weight_bytes = 100 * GiB }, m, th))
    w = console.mode_warnings({ device = "cpu", tp = 1, pp = 1, weight_bytes = 70 * GiB }, m, th)
    assert.are.equal("host_memory", w[1].key)
    w = console.mode_warnings({ device = "cuda:0", tp = 1, pp = 1, weight_bytes = GiB }, { gpus = {} }, th)
    assert.are.equal("gpu", w[1].key)
  end)

  it("turns two snapshots of a rank into per-second figures", function()
    local rates = require("moonshard.serve_telemetry").rates
    local a = { t = 10, calls = 5, busy_s = 1, idle_s = 1, pp = 2, coll = { all_reduce = { seconds = 0.5 } },
      stream = { tier = "disk", bytes = 1e9, wait_s = 0.1, queued_sum = 10, queued_n = 5 } }
    local b = { t = 12, calls = 25, busy_s = 1.6, idle_s = 1.2, pp = 2,
      coll = { all_reduce = { seconds = 0.9 }, send = { seconds = 0.02 } },
      stream = { tier = "disk", bytes = 5e9, wait_s = 0.3, queued_sum = 40, queued_n = 15 } }
    local r = rates(a, b)
    assert.are.equal(20, r.calls)
    assert.is_true(math.abs(r.collectives_ms.all_reduce - 200) < 1e-9)
    assert.is_true(math.abs(r.collectives_ms.send - 10) < 1e-9)
    assert.is_true(math.abs(r.bubble - 0.2 / 0.8) < 1e-12) -- 0.2 s idle of 0.8 s in calls
    assert.are.same({ 4e9, 2 }, { r.weight_bytes, r.weight_gbs })
    assert.is_true(math.abs(r.prefetch_stall_s - 0.1) < 1e-12)
    assert.are.equal(3, r.nvme_qd) -- 30 reads queued over 10 fetches
    -- one stage: no bubble; no calls between the two: no bubble either; the same instant: nothing
    b.pp = 1
    assert.is_nil(rates(a, b).bubble)
    b.pp, b.busy_s, b.idle_s = 2, 1, 1
    assert.is_nil(rates(a, b).bubble)
    assert.is_nil(rates(a, a))
    assert.are.equal(1796646811, console.iso_time("2026-12-07T12:33:31Z"))
    assert.are.equal(951782400, console.iso_time("2000-02-29T00:00:00Z"))
  end)

  it("fills thresholds from the defaults and names a bad one", function()
    local t = assert(console.thresholds { bubble = 0.5 })
    assert.are.equal(0.5, t.bubble)
    assert.are.equal(th.queue_length, t.queue_length)
    local ok, err = console.thresholds { bubbel = 0.5 }
    assert.is_nil(ok)
    assert.are.equal("unknown threshold 'bubbel'", err)
    ok, err = console.thresholds { bubble = "high" }
    assert.is_nil(ok)
    assert.truthy(err:find("'bubble' must be a number", 1, true), err)
  end)
end)

describe("the console's eval jobs in process", function()
  it("keeps the last MAX_JOBS ended jobs, without their documents", function()
    local model = assert(require("moonshard").load(h.stories, { batch = 4, kv_blocks = true }))
    local engine = assert(require("moonshard.engine").new(model, { max_batch = 4 }))
    local api = require("moonshard.openai").new(engine, model, {})
    local c = console.attach(api, { interval_ms = 3600 * 1000 })
    engine.on_step = function(info) api:on_step(info) end
    engine:attach(uv)
    local saved = console.MAX_JOBS
    console.MAX_JOBS = 2
    local ids = {}
    local ok, err = pcall(function()
      for i = 1, 4 do
        local res = { send = function(self, status, _, body) self.status, self.body = status, body end }
        c:start_eval({ body = cjson.encode { tasks = { "arc_easy" }, limit = 1 } }, res)
        assert.are.equal(202, res.status, res.body)
        ids[i] = cjson.decode(res.body).id
      end
      assert.is_true(h.wait_until(function() return c.jobs[ids[4]] and c.jobs[ids[4]].state == "done" end, 60))
    end)
    console.MAX_JOBS = saved
    c:close()
    engine:close()
    model:close()
    assert(ok, err)
    -- the two oldest are gone from memory; the kept ones hold their results, not their documents
    assert.are.same({ ids[3], ids[4] }, c.job_order)
    assert.is_nil(c.jobs[ids[1]])
    assert.is_nil(c.jobs[ids[2]])
    for _, id in ipairs { ids[3], ids[4] } do
      local j = c.jobs[id]
      assert.are.equal("done", j.state)
      assert.are.equal(4, j.done)
      assert.is_nil(j.tasks)
      assert.is_nil(j.co)
      assert.truthy(j.results.results.arc_easy, id)
    end
  end)
end)

describe("the console's events stream in process", function()
  it("drops a subscriber that stopped reading once its unsent bytes pass MAX_QUEUED", function()
    local http = require "moonshard.http"
    local model = assert(require("moonshard").load(h.stories, { batch = 2, kv_blocks = true }))
    local engine = assert(require("moonshard.engine").new(model, { max_batch = 2 }))
    local api = require("moonshard.openai").new(engine, model, {})
    local c = console.attach(api, { interval_ms = 3600 * 1000 })
    local srv = assert(http.server { port = 0, handler = api.handler })
    local saved = console.MAX_QUEUED
    console.MAX_QUEUED = 1024 * 1024
    local tcp = uv.new_tcp()
    local ok, err = pcall(function()
      -- a client that asks for the stream and never reads it
      local connected = false
      tcp:connect("127.0.0.1", srv.port, function(e)
        assert(not e, e)
        tcp:write("GET /v1/console/events HTTP/1.1\r\nHost: x\r\n\r\n", function() connected = true end)
      end)
      assert.is_true(h.wait_until(function() return connected and next(c.subscribers) ~= nil end, 5))
      local res = next(c.subscribers)
      local chunk = "data: " .. string.rep("x", 256 * 1024) .. "\n\n"
      for _ = 1, 400 do -- 100 MiB at most: the socket's buffers fill, then the server's queue grows
        if next(c.subscribers) == nil then break end
        c:broadcast(chunk)
        uv.run("nowait")
      end
      assert.is_nil(next(c.subscribers))
      assert.is_true(res:closed())
    end)
    console.MAX_QUEUED = saved
    if not tcp:is_closing() then tcp:close() end
    srv:close()
    c:close()
    engine:close()
    model:close()
    uv.run("nowait")
    assert(ok, err)
  end)
end)

describe("moonshard serve's web console routes", function()
  local s, runs
  setup(function()
    runs = h.tmpdir()
    s = start { "--api-key", KEY, "--max-body", "4096", "--runs-dir", runs }
  end)
  teardown(function()
    stop(s)
    h.rmdir(runs)
  end)

  it("answers HEAD with the file's length and no body, the connection kept for the next request", function()
    local resp = raw_request(s, "HEAD /console.js HTTP/1.1\r\nHost: x\r\n\r\n"
      .. "GET /console.css HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    local head1, head2, body2 = resp:match("^(.-\r\n)\r\n(HTTP/1%.1 .-\r\n)\r\n(.*)$")
    assert.truthy(head1, resp)
    assert.truthy(head1:match("^HTTP/1%.1 200 "), head1)
    assert.truthy(head1:find("Content-Type: text/javascript", 1, true), head1)
    assert.are.equal(#h.read(h.root .. "/web/console.js"), tonumber(head1:match("Content%-Length: (%d+)")))
    -- the GET's answer follows the HEAD's headers directly: no body came between
    assert.truthy(head2:match("^HTTP/1%.1 200 "), head2)
    assert.are.equal(h.read(h.root .. "/web/console.css"), body2)
    resp = raw_request(s, "HEAD / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    local head, rest = resp:match("^(.-\r\n)\r\n(.*)$")
    assert.are.equal(#h.read(h.root .. "/web/index.html"), tonumber(head:match("Content%-Length: (%d+)")))
    assert.are.equal("", rest)
    -- the events stream to HEAD: its head alone (no chunk of samples), and the next request answered
    resp = raw_request(s, "HEAD /v1/console/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " .. KEY .. "\r\n\r\n"
      .. "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head1, head2, body2 = resp:match("^(.-\r\n)\r\n(HTTP/1%.1 .-\r\n)\r\n(.*)$")
    assert.truthy(head1, resp)
    assert.truthy(head1:match("^HTTP/1%.1 200 "), head1)
    assert.truthy(head1:find("Content-Type: text/event-stream", 1, true), head1)
    assert.truthy(head2:match("^HTTP/1%.1 200 "), head2)
    assert.truthy(body2:find("ok", 1, true), body2)
  end)

  it("lists past runs of moonshard sweep (--runs-dir) and eval --jobs (in the eval folder) with their scores", function()
    local sweep_file = runs .. "/mixed.lua"
    h.write(sweep_file, string.format([[return { name = "mixed", command = { "bench", "eval" }, model = %q,
      flags = { bench = { ["gen-len"] = 8, ["prompt-len"] = 16, loops = 2, ["no-ceilings"] = true, threads = 1 },
        eval = { limit = 8, tasks = "arc_easy" } } }]], h.stories))
    local _, err, code = h.run { "sweep", sweep_file, "--dir", runs .. "/mixed", "--no-plots" }
    assert.are.equal(0, code, err)
    _, err, code = h.run { "eval", "--model", h.stories, "--tasks", "arc_easy,piqa", "--limit", "8", "--jobs", "2",
      "--jobs-dir", s.dir .. "/evals/planned", "--output", runs .. "/planned.json" }
    assert.are.equal(0, code, err)
    local status, list = json(s, "/v1/console/evals")
    assert.are.equal(200, status)
    local by = {}
    for _, r in ipairs(list.runs) do by[r.id] = r end
    -- the sweep's points: the eval's scores as its results line has them, the bench's figures
    local lines = {}
    for l in h.read(runs .. "/mixed/results.jsonl"):gmatch("[^\n]+") do lines[#lines + 1] = cjson.decode(l) end
    local ev = by["mixed/p002"]
    assert.truthy(ev, cjson.encode(list.runs))
    assert.are.same({ "sweep eval", "done", 8 }, { ev.kind, ev.state, ev.limit })
    assert.are.equal(lines[2].result.results.arc_easy["acc,none"], ev.scores.arc_easy["acc,none"])
    local bench = by["mixed/p001"]
    assert.are.same({ "sweep bench", "done" }, { bench.kind, bench.state })
    assert.are.equal(lines[1].metrics.decode_tok_s, bench.metrics.decode_tok_s)
    assert.is_true(math.abs(bench.date - os.time()) < 120, tostring(bench.date))
    -- the planned eval: one run of both jobs, the scores of the merged results
    local merged = cjson.decode(h.read(runs .. "/planned.json")).results
    local pl = by.planned
    assert.truthy(pl, cjson.encode(list.runs))
    assert.are.same({ "eval --jobs", "done", 2, 8 }, { pl.kind, pl.state, pl.jobs, pl.limit })
    assert.are.equal(merged.arc_easy["acc,none"], pl.scores.arc_easy["acc,none"])
    assert.are.equal(merged.piqa["acc_norm,none"], pl.scores.piqa["acc_norm,none"])
    -- a job that failed: the run says which
    local f = io.open(s.dir .. "/evals/planned/events.jsonl", "ab")
    f:write(cjson.encode { event = "job_done", job = 2, exit = 1, signal = 0 }, "\n")
    f:close()
    _, list = json(s, "/v1/console/evals")
    for _, r in ipairs(list.runs) do if r.id == "planned" then pl = r end end
    assert.are.same({ "failed", "job 2 exit 1" }, { pl.state, pl.error })
  end)

  it("serves the page's files with their types, an ETag and 304, without the key", function()
    local status, head, body = curl(s, "/", { key = false })
    assert.are.equal(200, status)
    assert.truthy(head:find("content-type: text/html; charset=utf-8", 1, true), head)
    assert.truthy(head:find("content-security-policy: default-src 'self'", 1, true), head)
    assert.truthy(head:find("cache-control: no-cache", 1, true), head)
    assert.truthy(body:find('<script src="console.js"></script>', 1, true))
    local etag = head:match("etag: (\"[^\r\n]+\")")
    assert.truthy(etag, head)
    status = curl(s, "/", { key = false, headers = { "If-None-Match: " .. etag } })
    assert.are.equal(304, status)
    local js_status, js_head, js = curl(s, "/console.js", { key = false })
    assert.are.equal(200, js_status)
    assert.truthy(js_head:find("content-type: text/javascript", 1, true), js_head)
    assert.are.equal(h.read(h.root .. "/web/console.js"), js)
    local _, css_head = curl(s, "/console.css", { key = false })
    assert.truthy(css_head:find("content-type: text/css", 1, true), css_head)
    local st, err = json(s, "/nothing.html", { key = false })
    assert.are.equal(404, st)
    assert.are.equal("not_found", err.error.code)
  end)

  it("refuses paths that leave the web folder", function()
    for _, p in ipairs { "/../run.sh", "/%2e%2e/run.sh", "/..%2frun.sh", "/web/../README.md", "/%2E%2E%5Crun.sh" } do
      local status, err = json(s, p, { key = false })
      assert.are.equal(400, status, p)
      assert.are.equal("bad_path", err.error.code, p)
      assert.truthy(err.error.message:find("leaves the console's folder", 1, true), err.error.message)
    end
    -- a name with a folder, or a type the console does not serve
    assert.are.equal(404, (curl(s, "/lua/moonshard/console.lua", { key = false })))
    assert.are.equal(404, (curl(s, "/console.lua", { key = false })))
  end)

  it("asks for the API key on its /v1/ routes and tells the page the model and placement", function()
    local status, err, head = json(s, "/v1/console/info", { key = false })
    assert.are.equal(401, status)
    assert.are.equal("invalid_api_key", err.error.code)
    assert.truthy(head:find("www-authenticate: bearer", 1, true), head)
    assert.are.equal(401, (json(s, "/v1/console/events", { key = "wrong" })))
    local info
    status, info = json(s, "/v1/console/info")
    assert.are.equal(200, status)
    assert.are.equal("stories260K", info.model.name)
    assert.are.equal(5, info.model.layers)
    assert.are.same({ "cpu", "f32", 1, 1 }, { info.placement.device, info.placement.dtype, info.placement.tp, info.placement.pp })
    assert.is_true(info.placement.weight_bytes > 900000 and info.placement.weight_bytes < 1100000, info.placement.weight_bytes)
    assert.are.same({ 16, 16, 512 }, { info.engine.max_batch, info.engine.block_size, info.engine.kv_blocks })
    assert.truthy(info.machine.memory.total > 0)
    assert.is_true(info.auth)
    local has = {}
    for _, t in ipairs(info.tasks) do has[t] = true end
    assert.is_true(has.arc_easy and has.piqa and has.wikitext)
  end)

  it("names the bad field of an eval request in a 400, and keeps the body limit and methods", function()
    local cases = {
      { "not json", nil, "not valid JSON" },
      { {}, "tasks", "tasks" },
      { { tasks = "arc_easy" }, "tasks", "tasks" },
      { { tasks = { "arc_easy", "no_such_task" } }, "tasks", "unknown task 'no_such_task'" },
      { { tasks = { "arc_easy", "arc_easy" } }, "tasks", "names 'arc_easy' twice" },
      { { tasks = { "arc_easy" }, limit = 0 }, "limit", "limit" },
      { { tasks = { "arc_easy" }, num_fewshot = -1 }, "num_fewshot", "num_fewshot" },
      { { tasks = { "arc_easy" }, batch_size = 99 }, "batch_size", "batch_size" },
      { { tasks = { "arc_easy" }, limt = 5 }, "limt", "unknown field 'limt'" },
    }
    for _, c in ipairs(cases) do
      local status, err = post(s, "/v1/console/evals", c[1])
      assert.are.equal(400, status, cjson.encode(c[1]))
      assert.are.equal(c[2] or cjson.null, err.error.param, cjson.encode(err))
      assert.truthy(err.error.message:find(c[3], 1, true), err.error.message)
      assert.are.equal("invalid_request_error", err.error.type)
    end
    local status = post(s, "/v1/console/evals", { tasks = { string.rep("x", 5000) } })
    assert.are.equal(413, status)
    local st, err, head = json(s, "/v1/console/info", { method = "DELETE" })
    assert.are.equal(405, st)
    assert.truthy(head:find("allow: get", 1, true), head)
    assert.are.equal("method_not_allowed", err.error.code)
    st, err = json(s, "/v1/console/evals/eval-none")
    assert.are.equal(404, st)
    assert.truthy(err.error.message:find("eval-none", 1, true))
  end)

  it("runs an eval job through the engine: the same table as moonshard eval, kept as a past run", function()
    local status, job, head = post(s, "/v1/console/evals", { tasks = { "arc_easy" }, limit = 20 })
    assert.are.equal(202, status, cjson.encode(job))
    assert.truthy(head:find("location: /v1/console/evals/" .. job.id:lower(), 1, true), head)
    assert.are.equal(80, job.total) -- 20 questions, 4 choices each
    job = wait_job(s, job.id)
    assert.are.equal("done", job.state, cjson.encode(job))
    assert.are.same({ 80, 80 }, { job.done, job.total })
    -- moonshard eval on the same model and items
    local out_json = s.dir .. "/cli.json"
    local _, err, code = h.run { "eval", "--model", h.stories, "--tasks", "arc_easy", "--limit", "20", "--output", out_json }
    assert.are.equal(0, code, err)
    local cli = cjson.decode(h.read(out_json)).results.arc_easy
    local got = job.results.results.arc_easy
    assert.are.equal(cli["acc,none"], got["acc,none"])
    assert.are.equal(cli["acc_norm,none"], got["acc_norm,none"])
    assert.are.equal(cli["acc_stderr,none"], got["acc_stderr,none"])
    assert.truthy(job.markdown:find("|arc_easy      |", 1, true), job.markdown)
    -- its folder: results.json and the descriptor; the list shows it with its scores
    local saved = cjson.decode(h.read(s.dir .. "/evals/" .. job.id .. "/results.json"))
    assert.are.equal(got["acc,none"], saved.results.arc_easy["acc,none"])
    assert.are.equal("done", cjson.decode(h.read(s.dir .. "/evals/" .. job.id .. "/eval.json")).state)
    local _, list = json(s, "/v1/console/evals")
    local run
    for _, r in ipairs(list.runs) do if r.id == job.id then run = r end end
    assert.truthy(run, cjson.encode(list))
    assert.are.equal(got["acc,none"], run.scores.arc_easy["acc,none"])
    assert.are.equal(20, run.limit)
    -- the engine is idle again and freed every block
    assert.are.equal(0, metric(s, "moonshard_running_sequences"))
    assert.are.equal(0, metric(s, "moonshard_kv_blocks_used"))
  end)

  it("answers chat while a long eval runs, and cancels the eval on DELETE", function()
    local status, job = post(s, "/v1/console/evals", { tasks = { "piqa" }, limit = 1000 })
    assert.are.equal(202, status, cjson.encode(job))
    local st, chat = post(s, "/v1/chat/completions", { messages = { { role = "user", content = "Hi" } }, max_tokens = 8,
      temperature = 0 })
    assert.are.equal(200, st, cjson.encode(chat))
    assert.are.equal(8, chat.usage.completion_tokens)
    local _, mid = json(s, "/v1/console/evals/" .. job.id)
    assert.are.equal("running", mid.state) -- the chat answer came while the eval was scoring
    local _, del = json(s, "/v1/console/evals/" .. job.id, { method = "DELETE" })
    assert.are.equal("cancelled", del.state)
    job = wait_job(s, job.id, 5)
    assert.are.equal("cancelled", job.state)
    assert.is_true(job.done < job.total)
    for _ = 1, 50 do
      if metric(s, "moonshard_running_sequences") == 0 then break end
      uv.sleep(20)
    end
    assert.are.equal(0, metric(s, "moonshard_running_sequences"))
    assert.are.equal(0, metric(s, "moonshard_queue_length"))
    assert.are.equal(0, metric(s, "moonshard_kv_blocks_used"))
  end)

  it("streams telemetry samples once a second after the history, counting the tokens made meanwhile", function()
    -- the stream read for 3.5 s while a 64-token completion runs in its second second
    local out_file = s.dir .. "/events.txt"
    h.sh(string.format("(curl -s -N --max-time 3.5 -D - -H %s %s > %s 2>/dev/null &) ; sleep 1.2; "
      .. "curl -s -o /dev/null -H %s -H 'Content-Type: application/json' --data-binary %s %s; sleep 2.6",
      h.q("Authorization: Bearer " .. KEY), h.q(s.url .. "/v1/console/events"), h.q(out_file),
      h.q("Authorization: Bearer " .. KEY), h.q(cjson.encode { prompt = "Once", max_tokens = 64, ignore_eos = true }),
      h.q(s.url .. "/v1/completions")))
    local out = h.read(out_file)
    local head, body = out:match("^(.-\r\n)\r\n(.*)$")
    assert.truthy(head, out)
    assert.truthy(head:lower():find("content-type: text/event-stream", 1, true), head)
    -- chunked framing is undone by curl; events are separated by blank lines
    local history = body:match("event: history\ndata: ([^\n]*)\n\n")
    assert.truthy(history, body)
    assert.are.equal("table", type(cjson.decode(history).samples))
    local live = {}
    for block in (body .. "\n\n"):gmatch("(.-)\n\n") do
      local d = block:match("^data: (.*)$")
      if d then live[#live + 1] = cjson.decode(d) end
    end
    assert.is_true(#live >= 2, body)
    local last = live[#live]
    assert.are.equal(512, last.kv_total)
    for _, k in ipairs { "prefill_tps", "decode_tps", "batch", "queue", "kv_used" } do
      assert.are.equal("number", type(last[k]), k)
    end
    assert.is_false(last.sources.collectives)
    assert.is_false(last.sources.bubble)
    assert.is_true(live[#live].t > live[#live - 1].t)
    -- the completion's 64 tokens (63 decode steps after its prompt) show up in the samples
    local decoded, ttft = 0, nil
    for _, x in ipairs(live) do
      decoded = decoded + (x.decode_tps or 0) * 1.0 -- one second a sample
      ttft = ttft or x.ttft_ms
    end
    assert.is_true(decoded > 40 and decoded < 90, tostring(decoded))
    assert.are.equal("number", type(ttft))
  end)
end)

-- the ranks' pids from the launcher's descriptor in the run folder
local function rank_pids(s)
  local desc = cjson.decode(h.read(s.logs .. "/launch.json"))
  local pids = {}
  for _, r in ipairs(desc.ranks) do pids[r.rank] = r.pid end
  return pids
end

-- the "sample" events of a rank's JSON Lines file
local function jsonl_samples(path)
  local out = {}
  for l in (h.read(path) or ""):gmatch("[^\n]+") do
    local e = cjson.decode(l)
    if e.event == "sample" then out[#out + 1] = e end
  end
  return out
end

describe("the console's telemetry of every rank", function()
  it("launch -n 2 serve --tp 2: collective time by kind from both ranks; thresholds from --console-thresholds; "
    .. "a stopped follower flagged silent, then heard again", function()
    local th_dir = h.tmpdir()
    local th_file = th_dir .. "/thresholds.lua"
    h.write(th_file, "return { rank_silent_s = 2, queue_length = 32 }\n")
    local s = start({ "--tp", "2", "--console-thresholds", th_file }, { n = 2, launch = { "--collective-timeout", "3" } })
    local pids
    local ok, err = pcall(function()
      local _, info = json(s, "/v1/console/info")
      assert.are.same({ 2, 32, 0.25 }, { info.thresholds.rank_silent_s, info.thresholds.queue_length, info.thresholds.bubble })
      assert.are.same({ 2, 1, 2 }, { info.placement.tp, info.placement.pp, info.placement.world })
      local live = samples_during(s, 3.5, true)
      local both = find(live, function(x)
        return #x.ranks == 2 and x.ranks[1].collectives_ms and x.ranks[2].collectives_ms
          and (x.ranks[1].collectives_ms.all_reduce or 0) > 0 and (x.ranks[2].collectives_ms.all_reduce or 0) > 0
      end)
      assert.truthy(both, cjson.encode(live))
      assert.is_true(both.sources.collectives)
      assert.is_false(both.sources.bubble) -- no pipeline
      assert.are.same({ 0, 1 }, { both.ranks[1].rank, both.ranks[2].rank })
      assert.is_true(both.collectives_ms.all_reduce > 0)
      assert.are.same({}, both.warnings)
      -- each rank's log file: a sample a second with its collectives so far
      for r = 0, 1 do
        local samples = jsonl_samples(string.format("%s/rank%d.jsonl", s.logs, r))
        assert.is_true(#samples >= 2, "rank " .. r)
        assert.is_true(samples[#samples].collectives.all_reduce.seconds > 0, "rank " .. r)
        assert.are.equal(r, samples[#samples].rank)
      end
      -- rank 1 stopped: rank 0 goes on sampling and says so once 2 s have passed without its figures
      pids = rank_pids(s)
      h.sh("kill -STOP " .. pids[1])
      live = samples_during(s, 3.6, false)
      local silent = find(live, function(x) return #x.warnings > 0 end)
      assert.truthy(silent, cjson.encode(live))
      assert.are.equal("rank_silent", silent.warnings[1].key)
      assert.truthy(silent.warnings[1].message:find("rank 1 has been silent for", 1, true), silent.warnings[1].message)
      assert.is_true(silent.ranks[2].age_s > 2)
      assert.is_nil(silent.ranks[2].collectives_ms) -- no figures from a silent rank
      assert.is_true(silent.ranks[1].age_s < 1e-3)
      h.sh("kill -CONT " .. pids[1])
      live = samples_during(s, 2.2, false)
      assert.are.same({}, live[#live].warnings)
      assert.is_true(live[#live].ranks[2].age_s < 2)
    end)
    if pids then h.sh("kill -CONT " .. pids[1] .. " 2>/dev/null") end
    stop(s)
    h.rmdir(th_dir)
    assert(ok, err)
  end)

  it("launch -n 2 serve --pp 2: each stage's pipeline bubble", function()
    local s = start({ "--pp", "2" }, { n = 2 })
    local ok, err = pcall(function()
      local live = samples_during(s, 3.5, true)
      local x = find(live, function(y) return type(y.ranks[1].bubble) == "number" and type(y.ranks[2].bubble) == "number" end)
      assert.truthy(x, cjson.encode(live))
      assert.is_true(x.sources.bubble)
      for _, r in ipairs(x.ranks) do assert.is_true(r.bubble > 0 and r.bubble < 1, cjson.encode(r)) end
      assert.is_true(math.abs(x.bubble - (x.ranks[1].bubble + x.ranks[2].bubble) / 2) < 1e-9)
      -- the stages pass activations: sends on stage 0, receives on stage 1
      assert.is_true((x.ranks[1].collectives_ms.send or 0) > 0, cjson.encode(x.ranks[1]))
      assert.is_true((x.ranks[2].collectives_ms.recv or 0) > 0, cjson.encode(x.ranks[2]))
      -- idle between requests is no bubble: no figure while no runner call is made
      live = samples_during(s, 2.2, false)
      assert.is_nil(live[#live].bubble, cjson.encode(live[#live]))
    end)
    stop(s)
    assert(ok, err)
  end)

  -- the bytes of stories260K's layers as a streaming stage packs them
  local layer_bytes = 0
  setup(function()
    local model = assert(require("moonshard").load(h.stories, { offload = "host" }))
    for _, b in pairs(model.net.stage:stats().layer_bytes) do layer_bytes = layer_bytes + b end
    model:close()
    assert(layer_bytes > 5 * 100000, layer_bytes)
  end)

  for _, case in ipairs { { "--cpu-offload" }, { "--disk-offload", "--offload-dir" } } do
    it("serve " .. case[1] .. ": the weight stream in GB/s" .. (case[2] and ", the disk reads queued" or ""), function()
      local off
      local args = { case[1] }
      if case[2] then
        off = h.tmpdir()
        args[2], args[3] = case[2], off
      end
      local s = start(args, { log = true })
      local ok, err = pcall(function()
        local _, info = json(s, "/v1/console/info")
        assert.are.equal(case[2] and "disk" or "host", info.placement.offload)
        local live = samples_during(s, 3, true)
        local x = find(live, function(y) return (y.weight_gbs or 0) > 0 end)
        assert.truthy(x, cjson.encode(live))
        assert.is_true(x.sources.weight_stream and x.sources.prefetch)
        assert.is_false(x.sources.collectives)
        assert.are.equal(x.weight_gbs, x.ranks[1].weight_gbs)
        assert.are.equal("number", type(x.prefetch_stall_s))
        -- every runner call (one pass) brings each of the 5 layers in once
        local r = x.ranks[1]
        assert.is_true(r.calls > 10, cjson.encode(r))
        local per_call = r.weight_bytes / r.calls
        assert.is_true(math.abs(per_call - layer_bytes) < 0.02 * layer_bytes, per_call .. " vs " .. layer_bytes)
        -- the rank's JSON Lines samples: each layer's fetch waits and bytes, which add up to the stream's
        local samples = jsonl_samples(s.logs .. "/rank0.jsonl")
        local st = assert(samples[#samples].stream, h.read(s.logs .. "/rank0.jsonl"))
        assert.are.equal(0, st.first_layer)
        assert.are.equal(5, #st.layer_wait_s)
        assert.are.equal(5, #st.layer_bytes)
        local sum, waits = 0, 0
        for i = 1, 5 do
          assert.is_true(st.layer_bytes[i] > 0 and st.layer_wait_s[i] >= 0, cjson.encode(st))
          sum, waits = sum + st.layer_bytes[i], waits + st.layer_wait_s[i]
        end
        assert.are.equal(st.bytes, sum)
        assert.is_true(math.abs(waits - st.wait_s) <= 1e-9 * math.max(1, st.wait_s), cjson.encode(st))
        if case[2] then
          assert.is_true(x.sources.nvme)
          assert.is_true(x.nvme_qd > 0, tostring(x.nvme_qd))
        else
          assert.is_false(x.sources.nvme)
          assert.is_nil(x.nvme_qd)
        end
      end)
      stop(s)
      if off then h.rmdir(off) end
      assert(ok, err)
    end)
  end
end)

describe("the web console in headless Chromium", function()
  it("chats, stops, evaluates, charts, notices the server gone, and charts collectives of two ranks", function()
    local chromium = h.sh("command -v chromium || command -v chromium-browser"):match("%S+")
    local driver = h.sh("command -v chromedriver"):match("%S+")
    local _, has_selenium = h.sh("python3 -c 'import selenium' 2>/dev/null")
    local missing = not chromium and "chromium" or not driver and "chromium-driver"
      or has_selenium ~= 0 and "the selenium Python package" or nil
    if missing then
      if os.getenv("CI") == "true" then
        error(missing .. " is missing, and CI must run the browser test (./run.sh test installs it)")
      end
      pending(missing .. " is not installed (./run.sh test installs chromium, chromium-driver and selenium)")
      return
    end
    local shots = h.root .. "/build/console-screenshots"
    h.sh("mkdir -p " .. h.q(shots))
    local s = start { "--api-key", KEY }
    local s2 = start({ "--tp", "2" }, { n = 2 })
    local ok, out, code = pcall(h.sh, string.format("timeout -k 5 90 python3 %s %s %s --api-key %s --pid %d "
      .. "--chromium %s --chromedriver %s --ranks-url %s 2>&1", h.q(h.root .. "/tests/web/console_browser.py"), h.q(s.url),
      h.q(shots), h.q(KEY), s.pid, h.q(chromium), h.q(driver), h.q(s2.url)))
    stop(s)
    stop(s2)
    print("console_spec: screenshots in " .. shots)
    assert.is_true(ok, out)
    assert.are.equal(0, code, out)
    local seen = cjson.decode(out:match("[^\n]*\n?$"))
    assert.are.equal(1, seen.stop.cancelled)
    assert.is_true(seen.chart_points[2] > seen.chart_points[1])
    assert.truthy(seen.banner:find("not answering", 1, true))
    -- two ranks: a line of points per rank and kind
    assert.is_true(seen.ranks.values > 0, out)
    local series = {}
    for _, x in ipairs(seen.ranks.series) do series[x] = true end
    assert.is_true(series["r0 all_reduce"] and series["r1 all_reduce"], out)
    for _, f in ipairs { "console-chat.png", "console.png", "console-gone.png", "console-ranks.png" } do
      local st = uv.fs_stat(shots .. "/" .. f)
      assert.truthy(st and st.size > 10000, f)
    end
  end)
end)
