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

-- starts `moonshard serve ARGS --port 0`; returns { pid, port, url, log, dir }
local function start(args)
  local dir = h.tmpdir()
  local log = dir .. "/serve.log"
  local parts = { "exec timeout -k 5 170", h.q(h.exe), "serve", "--model", h.q(h.stories), "--port", "0",
    "--template", "chatml", "--quiet", "--eval-dir", h.q(dir .. "/evals") }
  for _, a in ipairs(args or {}) do parts[#parts + 1] = h.q(a) end
  local out = h.sh("(" .. table.concat(parts, " ") .. " >/dev/null 2>" .. h.q(log) .. " </dev/null) & echo $!")
  local pid = assert(tonumber(out:match("%d+")))
  local port
  for _ = 1, 300 do
    local text = h.read(log) or ""
    port = text:match("listening on http://127%.0%.0%.1:(%d+)")
    if port or not h.running(pid) then break end
    uv.sleep(50)
  end
  assert(port, "serve did not start: " .. tostring(h.read(log)))
  return { pid = pid, port = tonumber(port), url = "http://127.0.0.1:" .. port, log = log, dir = dir }
end

local function stop(s)
  if not s then return end
  h.sh("kill " .. s.pid .. " 2>/dev/null")
  for _ = 1, 100 do
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

describe("moonshard serve's web console routes", function()
  local s
  setup(function() s = start { "--api-key", KEY, "--max-body", "4096" } end)
  teardown(function() stop(s) end)

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

describe("the web console in headless Chromium", function()
  it("chats, stops, evaluates, charts and notices the server gone", function()
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
    local ok, out, code = pcall(h.sh, string.format("timeout -k 5 90 python3 %s %s %s --api-key %s --pid %d "
      .. "--chromium %s --chromedriver %s 2>&1", h.q(h.root .. "/tests/web/console_browser.py"), h.q(s.url), h.q(shots),
      h.q(KEY), s.pid, h.q(chromium), h.q(driver)))
    stop(s)
    print("console_spec: screenshots in " .. shots)
    assert.is_true(ok, out)
    assert.are.equal(0, code, out)
    local seen = cjson.decode(out:match("[^\n]*\n?$"))
    assert.are.equal(1, seen.stop.cancelled)
    assert.is_true(seen.chart_points[2] > seen.chart_points[1])
    assert.truthy(seen.banner:find("not answering", 1, true))
    for _, f in ipairs { "console-chat.png", "console.png", "console-gone.png" } do
      local st = uv.fs_stat(shots .. "/" .. f)
      assert.truthy(st and st.size > 10000, f)
    end
  end)
end)
