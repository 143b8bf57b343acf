-- `moonshard launch -n N serve --tp/--pp` on CPU ranks: rank 0 serves and the others follow its
-- runner calls (moonshard.follow). Greedy answers of prompts batched together with ragged lengths
-- equal a one-rank serve's answers to each prompt alone (--tp 2, --pp 2, --tp 2 --pp 2);
-- streaming and /metrics; SIGTERM to the launcher stops every rank; a follower killed makes rank 0
-- answer 503 and exit naming it; and live changes on a --tp 2 job: `:all`, a policy switch on
-- rank 0 at the next step, `:all!` broadcasts, refusals with their reasons. Also the call
-- channel's encoding, in process.
local h = require "helpers"
local cjson = require "cjson"
local uv = require "luv"
local attach = require "moonshard.attach"
local follow = require "moonshard.follow"
local metrics = require "moonshard.metrics"

local PROMPTS = {
  "Once upon a time",
  "Lily and Ben went to the park. They saw a big dog",
  "The sun",
  "One day, a little bird named Tweet flew over the tall trees and the blue lake and saw",
  "Tom had a red ball. He",
  "The cat sat",
}
local MAX_TOKENS = 32

local spin = h.wait_until

-- POST path on the loop; done(status, body) when the whole response is in
local function fire(port, path, obj, done)
  local body = cjson.encode(obj)
  local c, buf = uv.new_tcp(), ""
  c:connect("127.0.0.1", port, function(err)
    if err then return done(nil, err) end
    c:write(string.format("POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
      .. "Content-Length: %d\r\nConnection: close\r\n\r\n%s", path, #body, body))
    c:read_start(function(_, data)
      if data then buf = buf .. data return end
      c:read_stop()
      if not c:is_closing() then c:close() end
      local head, rest = buf:match("^(.-)\r\n\r\n(.*)$")
      done(tonumber((head or ""):match("^HTTP/1%.1 (%d+)")), rest or buf)
    end)
  end)
end

-- a chunked body's data
local function unchunk(body)
  local out, i = {}, 1
  while true do
    local len, at = body:match("^(%x+)\r\n()", i)
    if not len or tonumber(len, 16) == 0 then break end
    out[#out + 1] = body:sub(at, at + tonumber(len, 16) - 1)
    i = at + tonumber(len, 16) + 2
  end
  return #out > 0 and table.concat(out) or body
end

local function completion(port, prompt, extra)
  local obj = { prompt = prompt, max_tokens = MAX_TOKENS, temperature = 0 }
  for k, v in pairs(extra or {}) do obj[k] = v end
  local status, body
  fire(port, "/v1/completions", obj, function(s, b) status, body = s, b end)
  assert(spin(function() return status or body end, 120), "no answer")
  return status, unchunk(body)
end

local function values(r)
  assert(r and r.ok, r and r.err)
  return r.values
end

-- an output stream that keeps what is written
local function sink()
  local parts = {}
  return { write = function(self, ...) for _, s in ipairs { ... } do parts[#parts + 1] = tostring(s) end return self end,
    flush = function() end, text = function() return table.concat(parts) end }
end

-- starts `moonshard launch -n N [LAUNCH_ARGS] serve ARGS` (or `moonshard serve ARGS` for n == 1); returns
-- { pid (the launcher's), port, dir, err = path of stderr }
local function start(n, args, launch_args)
  local dir = h.tmpdir()
  local parts = { "exec timeout -k 5 170", h.q(h.exe) }
  if n > 1 then for _, a in ipairs { "launch", "-n", tostring(n), "--grace", "3", "--log-dir", dir } do parts[#parts + 1] = h.q(a) end end
  for _, a in ipairs(launch_args or {}) do parts[#parts + 1] = h.q(a) end
  for _, a in ipairs { "serve", "--model", h.stories, "--port", "0", "--quiet" } do parts[#parts + 1] = h.q(a) end
  for _, a in ipairs(args or {}) do parts[#parts + 1] = h.q(a) end
  local env = n == 1 and ("MSH_LOG_DIR=" .. h.q(dir) .. " ") or ""
  local out = h.sh("(" .. env .. table.concat(parts, " ") .. " >" .. h.q(dir .. "/out") .. " 2>" .. h.q(dir .. "/err")
    .. " </dev/null) & echo $!")
  local pid = assert(tonumber(out:match("%d+")))
  local port
  for _ = 1, 600 do
    local text = io.open(dir .. "/err") and h.read(dir .. "/err") or ""
    port = tonumber(text:match("listening on http://127%.0%.0%.1:(%d+)"))
    if (port and uv.fs_stat(dir .. "/rank0.repl.json") and (n == 1 or uv.fs_stat(dir .. "/rank" .. (n - 1) .. ".repl.json")))
      or not h.running(pid) then break end
    uv.sleep(50)
  end
  assert(port, "serve did not start: " .. h.read(dir .. "/err"))
  return { pid = pid, port = port, dir = dir, err = dir .. "/err", n = n }
end

-- the ranks' pids from the launcher's descriptor
local function rank_pids(s)
  local desc = cjson.decode(h.read(s.dir .. "/launch.json"))
  local pids = {}
  for _, r in ipairs(desc.ranks) do pids[r.rank] = r.pid end
  return pids
end

-- waits for the launcher (or server) to exit; true when it did
local function wait_exit(s, secs)
  for _ = 1, math.floor(secs * 20) do
    if not h.running(s.pid) then return true end
    uv.sleep(50)
  end
  return not h.running(s.pid)
end

local function kill(s)
  if not s then return end
  if h.running(s.pid) then
    h.sh("kill " .. s.pid .. " 2>/dev/null")
    wait_exit(s, 10)
  end
  h.rmdir(s.dir)
end

-- each prompt's greedy answer from one rank, alone
local reference
local function references()
  if reference then return reference end
  local s = start(1)
  local answers = {}
  local ok, err = pcall(function()
    for i, p in ipairs(PROMPTS) do
      local status, body = completion(s.port, p)
      assert.equal(200, status, body)
      answers[i] = cjson.decode(body).choices[1].text
    end
  end)
  kill(s)
  assert(ok, err)
  reference = answers -- kept only whole: a failed attempt leaves the next test to try again
  return reference
end

-- every prompt at once, queued before the first step (rank 0's engine paused through its REPL),
-- so that steps batch prompts of different lengths; returns the answers in prompt order and the
-- tokens generated
local function batched_answers(s, session)
  values(session:eval("engine:detach()"))
  local answers, n, tokens = {}, 0, 0
  for i, p in ipairs(PROMPTS) do
    fire(s.port, "/v1/completions", { prompt = p, max_tokens = MAX_TOKENS, temperature = 0 }, function(status, body)
      assert.equal(200, status, body)
      local j = cjson.decode(body)
      answers[i] = j.choices[1].text
      tokens = tokens + j.usage.completion_tokens
      n = n + 1
    end)
  end
  assert.truthy(spin(function() return tonumber(values(session:eval("#scheduler.waiting"))) == #PROMPTS end, 30))
  -- one step by hand: it holds every prompt (chunks of different lengths in one batch)
  values(session:eval("engine:step()"))
  assert.equal(tostring(#PROMPTS), values(session:eval("#scheduler.running")))
  values(session:eval("engine:attach(uv)"))
  assert.truthy(spin(function() return n == #PROMPTS end, 60), "answers: " .. n)
  return answers, tokens
end

describe("the call channel's encoding", function()
  it("carries plain values exactly, keeps a step entry's request on rank 0, refuses what is not data", function()
    local v = { 1, 2, -3, 0, 2 ^ 40, -2 ^ 53, 0.1, -1.5e-300, 1 / 0, "x\0y", "", true, false,
      { slot = 3, pos = 0, tokens = { 5, 6, 7 }, blocks = { 0, 9 } }, [20] = 7, nested = { a = { b = { "c" } } } }
    local back = follow.decode(follow.encode(v))
    assert.same(v, back)
    local nan = follow.decode(follow.encode(0 / 0))
    assert.is_true(nan ~= nan)
    local entry = { slot = 1, pos = 4, tokens = { 9 }, seq = { prompt_ids = { 1, 2 }, on_token = print } }
    assert.same({ slot = 1, pos = 4, tokens = { 9 } }, follow.decode(follow.encode(entry)))
    local ok, err = pcall(follow.encode, { { slot = 0, f = print } }, "runner:step argument")
    assert.is_false(ok)
    assert.equal("runner:step argument[1].f is a function (a mirrored call carries plain data only)", err)
    local cyc = {}
    cyc.me = cyc
    ok, err = pcall(follow.encode, cyc)
    assert.is_false(ok)
    assert.truthy(err:find("contains itself", 1, true), err)
    -- frames split anywhere reassemble
    local got = {}
    local feed = follow.reader(function(m) got[#got + 1] = m end)
    local stream = follow.frame(follow.encode { op = "call", m = "step" }) .. follow.frame(follow.encode { op = "stop" })
    for i = 1, #stream do feed(stream:sub(i, i)) end
    assert.same({ { op = "call", m = "step" }, { op = "stop" } }, got)
  end)

  it("needs exactly tp x pp ranks", function()
    local w, err = follow.check_world(2, 1, {})
    assert.is_nil(w)
    assert.equal("--tp 2 --pp 1 needs 2 ranks, this job has 1: start it with moonshard launch -n 2 serve ...", err)
    w, err = follow.check_world(2, 2, { RANK = "0", WORLD_SIZE = "8", MASTER_PORT = "1" })
    assert.is_nil(w)
    assert.truthy(err:find("needs 4 ranks, this job has 8", 1, true), err)
    assert.equal(2, follow.check_world(1, 2, { RANK = "1", WORLD_SIZE = "2", MASTER_PORT = "1" }))
    local out, serr, code = h.run { "serve", "--model", h.stories, "--tp", "2" }
    assert.equal(1, code, out)
    assert.truthy(serr:find("moonshard serve: --tp 2 --pp 1 needs 2 ranks, this job has 1", 1, true), serr)
  end)
end)

describe("the engine over ranks that follow rank 0's runner calls", function()
  -- tests/lua/follow_rank.lua: greedy outputs and an echo request's prompt scores (forward_slot,
  -- or forward_blocks over a paged cache), alone and under launch
  local function run(n, tp, pp, kv_blocks)
    local dir = h.tmpdir()
    local args = { h.root .. "/tests/lua/follow_rank.lua", h.stories, tostring(tp), tostring(pp), tostring(kv_blocks) }
    if n > 1 then
      for i, a in ipairs { "launch", "-n", tostring(n), "--log-dir", dir } do table.insert(args, i, a) end
    end
    local out, err, code = h.run(args)
    h.rmdir(dir)
    assert.equal(0, code, err)
    return cjson.decode(out:match("[^\n]*{[^\n]*"))
  end
  for _, case in ipairs { { 2, 1, 0 }, { 2, 1, 64 }, { 1, 2, 64 } } do
    local tp, pp, kv = case[1], case[2], case[3]
    it(string.format("tp %d x pp %d, %s: the outputs and prompt scores of one rank", tp, pp,
      kv > 0 and "paged KV cache" or "KV slots"), function()
      local want = run(1, 1, 1, kv)
      local got = run(tp * pp, tp, pp, kv)
      assert.same(want.outputs, got.outputs)
      assert.equal(#want.echo, #got.echo)
      assert.truthy(#want.echo > 8)
      assert.truthy(h.max_abs_diff(want.echo, got.echo) < 1e-4, "prompt scores differ")
      assert.equal(0, want.calls)
      assert.truthy(got.calls >= 24, "calls mirrored: " .. tostring(got.calls))
    end)
  end
end)

describe("moonshard launch -n N serve", function()
  for _, case in ipairs {
    { 2, { "--tp", "2" } }, { 2, { "--pp", "2" } }, { 4, { "--tp", "2", "--pp", "2" } },
  } do
    local n, extra = case[1], case[2]
    it(string.format("-n %d %s: batched greedy answers as one rank's, streaming, /metrics; SIGTERM stops every rank",
      n, table.concat(extra, " ")), function()
      local want = references()
      local s = start(n, extra)
      local ok, err = pcall(function()
        local session = assert(attach.connect(assert(attach.find(s.dir, 0))))
        local got, tokens = batched_answers(s, session)
        for i = 1, #PROMPTS do assert.equal(want[i], got[i], "prompt " .. i .. ": " .. PROMPTS[i]) end
        -- streaming: the events put together are the same answer
        local status, body = completion(s.port, PROMPTS[2], { stream = true, stream_options = { include_usage = true } })
        assert.equal(200, status)
        local text, done = {}, false
        for line in body:gmatch("([^\n]*)\n") do
          local d = line:match("^data: (.*)$")
          if d == "[DONE]" then done = true
          elseif d then
            local j = cjson.decode(d)
            if j.usage then tokens = tokens + j.usage.completion_tokens end
            if j.choices[1] then text[#text + 1] = j.choices[1].text end
          end
        end
        assert.is_true(done)
        assert.equal(want[2], table.concat(text))
        -- /metrics counts what rank 0 served
        local m = metrics.parse(h.sh(string.format("curl -s --max-time 10 http://127.0.0.1:%d/metrics", s.port)))
        assert.equal(#PROMPTS + 1, m['moonshard_requests_total{status="200"}'])
        assert.equal(tokens, m.moonshard_generation_tokens_total)
        assert.truthy(tokens > #PROMPTS)
        assert.truthy(m.moonshard_engine_steps > 1)
        session:close()
        -- SIGTERM to the launcher: every rank stops cleanly (none fails), none is left behind
        local pids = rank_pids(s)
        h.sh("kill -TERM " .. s.pid)
        assert.is_true(wait_exit(s, 20), "the launcher did not exit")
        for r = 0, n - 1 do assert.is_false(h.running(pids[r]), "rank " .. r .. " left behind") end
        local log = h.read(s.err)
        assert.is_nil(log:find("exited with status", 1, true), log)
        assert.is_nil(log:find("exited on signal", 1, true), log)
        assert.truthy(log:find("[rank 0] moonshard serve: SIGTERM, stopping", 1, true), log)
      end)
      kill(s)
      assert(ok, err)
    end)
  end

  it("a follower killed: rank 0 answers 503 and exits naming it", function()
    local s = start(2, { "--tp", "2" })
    local ok, err = pcall(function()
      local session = assert(attach.connect(assert(attach.find(s.dir, 0))))
      values(session:eval("engine:detach()"))
      local status, body
      fire(s.port, "/v1/completions", { prompt = "Once upon a time", max_tokens = 8 }, function(st, b) status, body = st, b end)
      assert.truthy(spin(function() return tonumber(values(session:eval("#scheduler.waiting"))) == 1 end, 20))
      session:close()
      local pids = rank_pids(s)
      h.sh("kill -KILL " .. pids[1])
      assert.truthy(spin(function() return status ~= nil end, 20), "no answer")
      assert.equal(503, status)
      local e = cjson.decode(body).error
      assert.equal("rank_gone", e.code)
      assert.equal(string.format("rank 1 (pid %d) is gone (its connection closed)", pids[1]), e.message)
      assert.is_true(wait_exit(s, 20))
      assert.is_false(h.running(pids[0]))
      local log = h.read(s.err)
      assert.truthy(log:find(string.format("[rank 0] moonshard serve: rank 1 (pid %d) is gone (its connection closed); "
        .. "stopping (serving needs every rank)\n", pids[1]), 1, true), log)
      assert.truthy(log:find("rank 0 exited with status 1", 1, true), log)
    end)
    kill(s)
    assert(ok, err)
  end)
end)

describe("a follower that stops answering", function()
  it("is found by the collective waiting for it: rank 0 answers 503 naming it, within the collective timeout", function()
    local s = start(2, { "--tp", "2" }, { "--collective-timeout", "2" })
    local ok, err = pcall(function()
      local pids = rank_pids(s)
      h.sh("kill -STOP " .. pids[1])
      local t0 = uv.hrtime()
      local status, body
      fire(s.port, "/v1/completions", { prompt = "Once upon a time", max_tokens = 8 }, function(st, b) status, body = st, b end)
      assert.truthy(spin(function() return status ~= nil end, 20), "no answer")
      local secs = (uv.hrtime() - t0) / 1e9
      assert.equal(503, status)
      local e = cjson.decode(body).error
      assert.equal("rank_gone", e.code)
      assert.truthy(e.message:find("runner:step failed on rank 0: .*timed out after 2 s waiting for rank 1"), e.message)
      assert.truthy(secs >= 1.5 and secs < 10, secs)
      assert.is_true(wait_exit(s, 20)) -- the launcher kills the stopped rank after its grace
      assert.is_false(h.running(pids[0]))
      assert.is_false(h.running(pids[1]))
      assert.truthy(h.read(s.err):find("rank 0 exited with status 1", 1, true))
    end)
    kill(s)
    assert(ok, err)
  end)
end)

describe("live changes on `moonshard launch -n 2 serve --tp 2`", function()
  it(":all shows both ranks; a policy switch on rank 0 takes the next step; :all! changes every rank; refusals say why", function()
    local want = references()
    local s = start(2, { "--tp", "2", "--max-batch", "1" })
    local ok, err = pcall(function()
      local s0 = assert(attach.connect(assert(attach.find(s.dir, 0))))
      local s1 = assert(attach.connect(assert(attach.find(s.dir, 1))))
      assert.equal(1, s1.info.rank)
      local o, e = sink(), sink()
      local c = attach.client(s1, o, e)
      assert.truthy(c.command(":all pg.rank, pg.coords.tp, runner.tp_size, runner.n_heads"))
      local text = o:text()
      assert.truthy(text:find("^rank 0 +| rank 1\n"), text)
      assert.truthy(text:find("\n0  0  2  4 +| 1  1  2  4\n"), text)

      -- the scheduler is rank 0's: a follower refuses, saying where it is
      local r = s1:eval("scheduler:use('spf')")
      assert.is_false(r.ok)
      assert.truthy(r.err:find("the scheduler runs on rank 0 only", 1, true), r.err)
      -- a follower's runner takes no calls from its own REPL
      r = s1:eval("runner:reset()")
      assert.is_false(r.ok)
      assert.truthy(r.err:find("rank 1 follows rank 0", 1, true), r.err)

      -- shortest prompt first, switched on rank 0 between two steps: the next step takes it.
      -- Four prompts queued one after the other, longest first (one KV slot: one at a time)
      values(s0:eval("engine:detach()"))
      local order, n = {}, 0
      local sent = { 4, 2, 1, 3 }
      for k, i in ipairs(sent) do
        fire(s.port, "/v1/completions", { prompt = PROMPTS[i], max_tokens = MAX_TOKENS, temperature = 0 }, function(st, b)
          assert.equal(200, st, b)
          order[#order + 1] = i
          assert.equal(want[i], cjson.decode(b).choices[1].text, "prompt " .. i)
          n = n + 1
        end)
        assert.truthy(spin(function() return tonumber(values(s0:eval("#scheduler.waiting"))) == k end, 20))
      end
      r = s0:eval("scheduler:use('spf')")
      assert.truthy(r.ok, r.err)
      assert.truthy(table.concat(r.notes, "\n"):find("fcfs -> spf: takes effect at the next step", 1, true))
      values(s0:eval("engine:step()"))
      local first = tonumber(values(s0:eval("scheduler.running[1].prompt_len")))
      local lens = values(s0:eval("local t = {} for _, q in ipairs(scheduler.waiting) do t[#t + 1] = q.prompt_len end "
        .. "return table.concat(t, ' ')"))
      for l in lens:gmatch("%d+") do assert.truthy(first < tonumber(l), first .. " before " .. lens) end
      values(s0:eval("engine:attach(uv)"))
      assert.truthy(spin(function() return n == 4 end, 60))
      assert.same({ 3, 1, 2, 4 }, order) -- shortest first (first come would be 4, 2, 1, 3)
      -- the follower made every call rank 0 made (the engine's and the ones typed at rank 0)
      local calls = tonumber(values(s0:eval("live.group.calls")))
      assert.truthy(calls > 4 * 8, tostring(calls))
      assert.truthy(spin(function() return tonumber(values(s1:eval("live.follower.calls"))) == calls end, 10))

      -- a field the ranks share: refused on rank 0's mirror, changed on every rank by :all!
      r = s0:eval("runner.chunk = 8")
      assert.is_false(r.ok)
      assert.truthy(r.err:find("the runner is mirrored on 2 ranks", 1, true), r.err)
      o = sink()
      c = attach.client(s1, o, e)
      assert.truthy(c.command(":all! runner.chunk = 8"))
      text = o:text()
      assert.truthy(text:find("runner.chunk (%d+) %-> 8 +| %-%- runner.chunk %1 %-> 8"), text)
      o = sink()
      c = attach.client(s1, o, e)
      assert.truthy(c.command(":all! runner.chunk = 100000"))
      text = o:text()
      local _, refusals = text:gsub("refused: runner.chunk cannot be 100000 live", "")
      assert.equal(2, refusals, text)
      assert.equal("8", values(s0:eval("runner.chunk")))
      assert.equal("8", values(s1:eval("runner.chunk")))
      -- a broadcast refused on every rank alike: the process group and the runner's sizes
      r = s0:eval("live.broadcast('pg.world = 1; runner.batch = 99')")
      local line = values(r)
      assert.truthy(line:find("refused: pg.world cannot change live", 1, true), line)
      assert.truthy(line:find("refused: runner.batch cannot change live", 1, true), line)
      local seq = line:match("broadcast #(%d+)")
      assert.truthy(spin(function() return values(s1:eval("live.result(" .. seq .. ")")) ~= '"pending"' end, 10))
      assert.truthy(values(s1:eval("live.result(" .. seq .. ")")):find("refused: runner.batch cannot change live", 1, true))
      r = s0:eval("engine.max_batch = 4")
      assert.truthy(table.concat(r.notes, "\n"):find("refused: engine.max_batch cannot change live", 1, true))
      -- a follower cannot broadcast
      r = s1:eval("live.broadcast('x = 1')")
      assert.is_false(r.ok)
      assert.truthy(r.err:find("rank 1 follows rank 0; broadcast from rank 0", 1, true), r.err)
      -- prompts longer than the new chunk are computed in chunks of 8 on both ranks, in step
      local status, body = completion(s.port, PROMPTS[4])
      assert.equal(200, status, body)
      assert.truthy(#cjson.decode(body).choices[1].text > 0)
      c.close()
      s1:close()
      s0:close()
    end)
    kill(s)
    assert(ok, err)
  end)
end)
