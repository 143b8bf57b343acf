-- `moonshard serve` as a child process on loopback: curl for the routes and the errors, SSE
-- framing, the openai Python SDK, concurrent streaming clients, cancellation, 429, and a real
-- Prometheus scraping /metrics. Also moonshard.http's parser and moonshard.metrics in process.
local h = require "helpers"
local cjson = require "cjson"
local uv = require "luv"
local http = require "moonshard.http"
local metrics = require "moonshard.metrics"

local function free_port()
  local t = uv.new_tcp()
  assert(t:bind("127.0.0.1", 0))
  local port = t:getsockname().port
  t:close()
  return port
end

-- starts `moonshard serve ARGS --port 0`; returns { pid, port, url, log }
local function start(args)
  local dir = h.tmpdir()
  local log = dir .. "/serve.log"
  local parts = { "exec timeout -k 5 170", h.q(h.exe), "serve", "--model", h.q(h.stories), "--port", "0" }
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
  print("serve_spec: moonshard serve on 127.0.0.1:" .. port)
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

-- curl: returns status, headers text, body
local function curl(s, path, opts)
  opts = opts or {}
  local args = { "curl", "-s", "-S", "--max-time", "30", "-D", "-", "-o", "-" }
  if opts.method then args[#args + 1] = "-X " .. opts.method end
  for _, hd in ipairs(opts.headers or {}) do args[#args + 1] = "-H " .. h.q(hd) end
  if opts.body then args[#args + 1] = "--data-binary " .. h.q(opts.body) end
  if opts.file then args[#args + 1] = "--data-binary @" .. h.q(opts.file) end
  args[#args + 1] = h.q(s.url .. path)
  local out = h.sh(table.concat(args, " "))
  -- a 100 Continue head comes first for large bodies
  out = out:gsub("^HTTP/1%.1 100 Continue\r\n\r\n", "")
  local head, body = out:match("^(.-\r\n)\r\n(.*)$")
  local status = tonumber((head or ""):match("^HTTP/1%.1 (%d+)"))
  return status, head or "", body or out
end

local function post(s, path, obj, headers)
  return curl(s, path, { body = type(obj) == "string" and obj or cjson.encode(obj),
    headers = headers or { "Content-Type: application/json" } })
end

-- the data: events of an SSE body
local function events(body)
  local list = {}
  for line in body:gmatch("([^\n]*)\n") do
    local d = line:match("^data: (.*)$")
    if d then list[#list + 1] = d end
  end
  return list
end

local function metric(s, name)
  local _, _, body = curl(s, "/metrics")
  return metrics.parse(body)[name]
end

describe("moonshard.http parser", function()
  it("reads a request in pieces and refuses what is malformed or too large", function()
    local p = http.parser("request", { max_head = 1024, max_body = 8, max_headers = 8 })
    local req = "POST /v1/x?a=1&b=%20c HTTP/1.1\r\nHost: h\r\nX-A: 1\r\nx-a: 2\r\nContent-Length: 3\r\n\r\nabc"
    local state
    for i = 1, #req do
      local used
      state, used = p:feed(req:sub(i, i))
      assert.are.equal(1, used)
    end
    assert.are.equal(2, state)
    local head = p:head()
    assert.are.equal("POST", head.method)
    assert.are.equal("1, 2", head.headers["x-a"])
    assert.are.equal("abc", p:body())
    local path, q = http.split_target(head.target)
    assert.are.equal("/v1/x", path)
    assert.are.same({ a = "1", b = " c" }, q)
    p:next()
    local ok, msg, status, name = p:feed("POST / HTTP/1.1\r\nContent-Length: 9\r\n\r\n")
    assert.is_nil(ok)
    assert.are.equal(413, status)
    assert.are.equal("MSH_BODY_TOO_LARGE", name)
    assert.truthy(msg:find("8 bytes", 1, true))
    p:reset()
    ok, msg, status, name = p:feed("GET / HTTP/1.1\r\nBad Header\r\n\r\n")
    assert.is_nil(ok)
    assert.are.equal(400, status)
    assert.are.equal("HPE_INVALID_HEADER_TOKEN", name)
    p:close()
  end)
end)

describe("moonshard.metrics", function()
  it("renders counters, gauges and histograms in the text format", function()
    local reg = metrics.new()
    local c = reg:counter("x_total", "things", { "status" })
    c:inc(2, { status = "200" })
    c:inc(1, { status = "400" })
    reg:gauge("g", "a gauge", function() return 0.5 end)
    local hist = reg:histogram("lat_seconds", "latency", { 0.1, 1 })
    hist:observe(0.05)
    hist:observe(0.5)
    hist:observe(5)
    local m = metrics.parse(reg:render())
    assert.are.equal(2, m['x_total{status="200"}'])
    assert.are.equal(0.5, m.g)
    assert.are.equal(1, m['lat_seconds_bucket{le="0.1"}'])
    assert.are.equal(2, m['lat_seconds_bucket{le="1"}'])
    assert.are.equal(3, m['lat_seconds_bucket{le="+Inf"}'])
    assert.are.equal(3, m.lat_seconds_count)
    assert.truthy(reg:render():find("# TYPE lat_seconds histogram", 1, true))
    assert.has_error(function() c:inc(-1) end)
  end)
end)

describe("moonshard serve", function()
  local s
  setup(function() s = start { "--template", "chatml", "--max-batch", "8", "--max-body", "4096", "--quiet" } end)
  teardown(function() stop(s) end)

  it("answers /health, /v1/models and /metrics", function()
    local status, _, body = curl(s, "/health")
    assert.are.equal(200, status)
    assert.are.same({ status = "ok" }, cjson.decode(body))
    status, _, body = curl(s, "/v1/models")
    assert.are.equal(200, status)
    local m = cjson.decode(body)
    assert.are.equal("list", m.object)
    assert.are.equal("stories260K", m.data[1].id)
    local head
    status, head, body = curl(s, "/metrics")
    assert.are.equal(200, status)
    assert.truthy(head:find("text/plain; version=0.0.4", 1, true))
    for _, name in ipairs { "moonshard_queue_length", "moonshard_kv_blocks_free", "moonshard_prefix_cache_hit_rate",
      "moonshard_time_to_first_token_seconds_count", "moonshard_inter_token_latency_seconds_count",
      "moonshard_running_batch_size" } do
      assert.is_not_nil(metrics.parse(body)[name], name)
    end
  end)

  it("completes a prompt greedily like moonshard generate", function()
    local status, _, body = post(s, "/v1/completions", { prompt = "Once upon a time", max_tokens = 30, temperature = 0 })
    assert.are.equal(200, status)
    local r = cjson.decode(body)
    assert.are.equal("text_completion", r.object)
    assert.are.equal("length", r.choices[1].finish_reason)
    assert.are.equal(30, r.usage.completion_tokens)
    local gen = h.run { "generate", "--model", h.stories, "--prompt", "Once upon a time", "--max-tokens", "30",
      "--temperature", "0" }
    assert.are.equal((gen:gsub("\n$", "")), r.choices[1].text) -- generate prints the generated text alone
  end)

  it("takes token ids, lists of prompts, n, stop strings and echo", function()
    local status, _, body = post(s, "/v1/completions", { prompt = { { 1, 403, 407 }, "Lily" }, n = 2, max_tokens = 4,
      temperature = 0 })
    assert.are.equal(200, status)
    local r = cjson.decode(body)
    assert.are.equal(4, #r.choices)
    assert.are.equal(r.choices[1].text, r.choices[2].text) -- greedy: n copies agree
    assert.are.same({ 0, 1, 2, 3 }, { r.choices[1].index, r.choices[2].index, r.choices[3].index, r.choices[4].index })
    status, _, body = post(s, "/v1/completions", { prompt = "Once upon a time", max_tokens = 40, temperature = 0,
      stop = { "Lily" } })
    r = cjson.decode(body)
    assert.are.equal("stop", r.choices[1].finish_reason)
    assert.is_nil(r.choices[1].text:find("Lily", 1, true))
    assert.are.equal(", there was a little girl named ", r.choices[1].text)
    status, _, body = post(s, "/v1/completions", { prompt = "Once upon", max_tokens = 0, echo = true, logprobs = 2 })
    r = cjson.decode(body)
    assert.are.equal("Once upon", r.choices[1].text)
    local lp = r.choices[1].logprobs
    assert.are.equal(cjson.null, lp.token_logprobs[1]) -- nothing before the first token
    assert.are.equal(#lp.tokens, #lp.token_logprobs)
    assert.is_true(lp.token_logprobs[2] < 0)
    assert.are.same({ 0, 0, 4 }, lp.text_offset)
  end)

  it("streams server-sent events ending in [DONE], with usage when asked", function()
    local status, head, body = post(s, "/v1/chat/completions", { messages = { { role = "user", content = "Hi" } },
      max_tokens = 5, temperature = 0, stream = true, stream_options = { include_usage = true } })
    assert.are.equal(200, status)
    assert.truthy(head:lower():find("content%-type: text/event%-stream"))
    assert.truthy(head:lower():find("transfer%-encoding: chunked"))
    assert.truthy(body:find("^data: "))
    assert.truthy(body:find("\n\ndata: %[DONE%]\n\n$"))
    local ev = events(body)
    assert.are.equal("[DONE]", ev[#ev])
    local first, usage = cjson.decode(ev[1]), cjson.decode(ev[#ev - 1])
    assert.are.equal("assistant", first.choices[1].delta.role)
    assert.are.equal("chat.completion.chunk", first.object)
    assert.are.equal(0, #usage.choices)
    assert.are.equal(5, usage.usage.completion_tokens)
    local fin = cjson.decode(ev[#ev - 2])
    assert.are.equal("length", fin.choices[1].finish_reason)
  end)

  it("answers bad requests with OpenAI's error object naming the field", function()
    local cases = {
      { { prompt = "x", max_tokens = -1 }, "max_tokens" },
      { { prompt = "x", temperature = "hot" }, "temperature" },
      { { prompt = "x", top_p = 2 }, "top_p" },
      { { prompt = "x", n = 0 }, "n" },
      { { prompt = "x", stop = { 1 } }, "stop" },
      { { prompt = "x", logprobs = 99 }, "logprobs" },
      { { prompt = "x", seed = 1.5 }, "seed" },
      { { prompt = { 1, 99999 } }, "prompt" },
      { { prompt = {} }, "prompt" },
      { { max_tokens = 3 }, "prompt" },
      { { prompt = "x", max_tokens = 100000 }, "max_tokens" },
      { { prompt = "x", model = "gpt-4" }, "model" },
    }
    for _, c in ipairs(cases) do
      local status, _, body = post(s, "/v1/completions", c[1])
      local e = cjson.decode(body).error
      assert.are.equal(c[2], e.param, body)
      assert.are.equal(c[2] == "model" and 404 or 400, status, body)
      assert.are.equal("string", type(e.message))
      assert.are.equal("invalid_request_error", e.type)
    end
    local status, _, body = post(s, "/v1/chat/completions", { messages = { { role = "robot", content = "x" } } })
    assert.are.equal(400, status)
    assert.are.equal("messages", cjson.decode(body).error.param)
    status, _, body = post(s, "/v1/completions", "{not json")
    assert.are.equal(400, status)
    assert.truthy(cjson.decode(body).error.message:find("JSON"))
    status = curl(s, "/v1/nothing")
    assert.are.equal(404, status)
    local head
    status, head = curl(s, "/v1/completions")
    assert.are.equal(405, status)
    assert.truthy(head:find("Allow: POST", 1, true))
    -- a body over --max-body: 413 before it is read
    local f = s.dir .. "/big.json"
    h.write(f, '{"prompt": "' .. string.rep("a", 5000) .. '"}')
    status, _, body = curl(s, "/v1/completions", { file = f, headers = { "Content-Type: application/json" } })
    assert.are.equal(413, status)
    assert.are.equal("MSH_BODY_TOO_LARGE", cjson.decode(body).error.code)
    -- a malformed request line
    local out = h.sh(string.format("printf 'FROB / HTTP/1.1\\r\\n\\r\\n' | timeout 5 python3 -c %s %d",
      h.q("import socket,sys; s=socket.create_connection(('127.0.0.1', int(sys.argv[1]))); "
        .. "s.sendall(sys.stdin.buffer.read()); print(s.recv(200).decode().split('\\r\\n')[0])"), s.port))
    assert.truthy(out:find("HTTP/1.1 400", 1, true), out)
  end)

  it("gives the openai Python SDK a streamed chat answer, logprobs and echo", function()
    local out, code = h.sh("timeout 120 python3 " .. h.q(h.root .. "/tests/python/openai_client.py") .. " "
      .. h.q(s.url .. "/v1") .. " stories260K 2>&1")
    if code == 77 then
      pending("the openai Python package is not installed (./run.sh test installs it from PyPI)")
      return
    end
    assert.are.equal(0, code, out)
    local r = cjson.decode(out:match("[^\n]*\n?$"))
    assert.are.same({ "assistant" }, r.chat.roles)
    assert.are.equal("length", r.chat.finish)
    assert.are.equal(12, r.chat.usage.completion_tokens)
    assert.are.equal(r.chat_whole.text, r.chat.text) -- greedy: streamed and whole agree
    assert.is_true(#r.chat.text > 0)
    assert.are.equal(8, #r.completion.tokens)
    assert.are.equal(table.concat(r.completion.tokens), r.completion.text)
    for i, top in ipairs(r.completion.top_logprobs) do
      local n = 0
      for _, v in pairs(top) do
        n = n + 1
        assert.is_true(v <= r.completion.token_logprobs[i] + 1e-9) -- greedy picks the most likely
      end
      assert.are.equal(3, n)
    end
    assert.are.equal("Once upon a time there was", r.echo.text)
    assert.are.equal(cjson.null, r.echo.token_logprobs[1])
    for i = 2, #r.echo.token_logprobs do assert.is_true(r.echo.token_logprobs[i] <= 0) end
    assert.are.same({ status = 400, param = "max_tokens" }, r.bad)
  end)

  it("serves 32 concurrent streaming clients, each answer as the prompt alone gets", function()
    local prompts = { "Once upon a time", "Lily saw a cat", "The sun was hot", "Tom had a red ball" }
    local alone = {}
    for i, p in ipairs(prompts) do
      local _, _, body = post(s, "/v1/completions", { prompt = p, max_tokens = 24, temperature = 0 })
      alone[i] = cjson.decode(body).choices[1].text
    end
    local dir = s.dir
    local cmds = {}
    for k = 1, 32 do
      local body = cjson.encode { prompt = prompts[(k - 1) % #prompts + 1], max_tokens = 24, temperature = 0, stream = true }
      cmds[#cmds + 1] = string.format("curl -s -N --max-time 30 -H 'Content-Type: application/json' --data-binary %s %s > %s &",
        h.q(body), h.q(s.url .. "/v1/completions"), h.q(dir .. "/c" .. k))
    end
    local t0 = uv.hrtime()
    h.sh(table.concat(cmds, "\n") .. "\nwait")
    assert.is_true((uv.hrtime() - t0) / 1e9 < 30)
    for k = 1, 32 do
      local body = h.read(dir .. "/c" .. k) or ""
      local ev = events(body)
      assert.are.equal("[DONE]", ev[#ev], "client " .. k .. ": " .. body)
      local text = {}
      for i = 1, #ev - 1 do text[#text + 1] = cjson.decode(ev[i]).choices[1].text end
      assert.are.equal(alone[(k - 1) % #prompts + 1], table.concat(text), "client " .. k)
    end
    local running
    for _ = 1, 50 do -- the last finish may still be on its way through the loop
      running = metric(s, "moonshard_running_sequences") + metric(s, "moonshard_queue_length")
      if running == 0 then break end
      uv.sleep(40)
    end
    assert.are.equal(0, running)
  end)

  it("cancels a request whose client closes the connection mid-stream", function()
    local before = metric(s, "moonshard_requests_cancelled_total") or 0
    local got, done_err = 0, nil
    local req
    req = http.request(s.url .. "/v1/completions", { method = "POST", headers = { ["Content-Type"] = "application/json" },
      body = cjson.encode { prompt = "Once", max_tokens = 400, ignore_eos = true, stream = true } }, {
      on_data = function(b)
        got = got + #b
        req.close() -- after the first bytes of the stream
      end,
      on_done = function(err) done_err = err end,
    })
    local deadline = uv.hrtime() + 10e9
    while done_err == nil and uv.hrtime() < deadline do uv.run("once") end
    assert.are.equal("aborted", done_err)
    assert.is_true(got > 0)
    local cancelled
    for _ = 1, 100 do
      cancelled = metric(s, "moonshard_requests_cancelled_total")
      if cancelled > before and metric(s, "moonshard_running_sequences") == 0 then break end
      uv.sleep(50)
    end
    assert.are.equal(before + 1, cancelled)
    assert.are.equal(0, metric(s, "moonshard_running_sequences"))
    assert.is_true(metric(s, "moonshard_generation_tokens_total") > 0)
  end)

  it("is measured by bench-serve, against the server and in process", function()
    local out, err, code = h.run { "bench-serve", "--url", s.url, "--num-requests", "8", "--input-len", "16",
      "--output-len", "8", "--request-rate", "100" }
    assert.are.equal(0, code, err)
    local r = cjson.decode(out)
    assert.are.equal(8, r.completed)
    assert.is_true(r.output_tokens > 0 and r.output_tok_s > 0)
    assert.is_number(r.ttft_ms.p99)
    out, err, code = h.run { "bench-serve", "--model", h.stories, "--num-requests", "6", "--input-len", "12",
      "--output-len", "10", "--range-ratio", "0", "--max-batch", "4" }
    assert.are.equal(0, code, err)
    r = cjson.decode(out)
    assert.are.equal(60, r.output_tokens) -- ignore_eos: every request its full length
    assert.are.equal(72, r.prompt_tokens)
    assert.is_true(r.itl_ms.p50 <= r.itl_ms.p99)
  end)

  it("is scraped by Prometheus", function()
    if select(2, h.sh("command -v prometheus >/dev/null 2>&1")) ~= 0 then
      pending("prometheus not installed (./run.sh test installs Debian's)")
      return
    end
    local dir = h.tmpdir()
    local pport = free_port()
    h.write(dir .. "/prometheus.yml", string.format([[
global:
  scrape_interval: 1s
scrape_configs:
  - job_name: moonshard
    static_configs:
      - targets: ["127.0.0.1:%d"]
]], s.port))
    local out = h.sh(string.format("(exec timeout -k 2 25 prometheus --config.file=%s --storage.tsdb.path=%s "
      .. "--web.listen-address=127.0.0.1:%d >%s 2>&1 </dev/null) & echo $!", h.q(dir .. "/prometheus.yml"),
      h.q(dir .. "/data"), pport, h.q(dir .. "/log")))
    local pid = tonumber(out:match("%d+"))
    local value
    local deadline = uv.hrtime() + 20e9
    while uv.hrtime() < deadline do
      local q = h.sh(string.format("curl -s --max-time 2 'http://127.0.0.1:%d/api/v1/query?query=moonshard_generation_tokens_total'",
        pport))
      local ok, r = pcall(cjson.decode, q)
      if ok and type(r) == "table" and r.data and r.data.result and r.data.result[1] then
        value = tonumber(r.data.result[1].value[2])
        break
      end
      uv.sleep(250)
    end
    h.sh("kill " .. pid .. " 2>/dev/null")
    for _ = 1, 100 do
      if not h.running(pid) then break end
      uv.sleep(20)
    end
    local log = h.read(dir .. "/log") or ""
    h.rmdir(dir)
    assert.is_not_nil(value, "no scrape within 20 s: " .. log:sub(-800))
    assert.is_true(value > 0)
  end)
end)

describe("moonshard serve with --api-key, --max-batch 1 --max-queue 0", function()
  local s
  setup(function() s = start { "--api-key", "sekret", "--max-batch", "1", "--max-queue", "0", "--quiet" } end)
  teardown(function() stop(s) end)

  it("wants the key on /v1/ paths", function()
    local status, head, body = curl(s, "/v1/models")
    assert.are.equal(401, status)
    assert.are.equal("invalid_api_key", cjson.decode(body).error.code)
    assert.truthy(head:find("WWW-Authenticate: Bearer", 1, true))
    status = curl(s, "/v1/models", { headers = { "Authorization: Bearer wrong" } })
    assert.are.equal(401, status)
    status = curl(s, "/v1/models", { headers = { "Authorization: Bearer sekret" } })
    assert.are.equal(200, status)
    assert.are.equal(200, (curl(s, "/health")))
  end)

  it("answers 429 with Retry-After while the batch and queue are full", function()
    local status429, head429
    local done_err
    local req
    req = http.request(s.url .. "/v1/completions", { method = "POST", headers = { Authorization = "Bearer sekret" },
      body = cjson.encode { prompt = "Once", max_tokens = 480, ignore_eos = true, stream = true } }, {
      on_data = function()
        if status429 then return end
        -- the first request runs; a second one finds no room (a blocking curl: the server is another process)
        status429, head429 = post(s, "/v1/completions", { prompt = "x", max_tokens = 2 },
          { "Authorization: Bearer sekret", "Content-Type: application/json" })
        req.close()
      end,
      on_done = function(err) done_err = err end,
    })
    local deadline = uv.hrtime() + 20e9
    while done_err == nil and uv.hrtime() < deadline do uv.run("once") end
    assert.are.equal(429, status429)
    assert.truthy(head429:find("Retry-After: 1", 1, true))
  end)
end)
