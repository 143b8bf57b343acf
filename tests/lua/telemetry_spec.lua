-- Telemetry: device timers and stage probes on the CPU, the JSON Lines file of a rank, the run's
-- log folder made by the launcher, and the events of tensor- and pipeline-parallel runs on CPU
-- ranks (collective counts, stage busy/idle, bubble).
local h = require "helpers"
local telemetry = require "moonshard.telemetry"
local cjson = require "cjson"
local uv = require "luv"

local N_LAYERS = 5 -- stories260K

-- Every line of a rank's file parses and carries the rank and an event name.
local function events_of(path, rank)
  local evs = assert(telemetry.read(path))
  assert.is_true(#evs > 0, path)
  for _, ev in ipairs(evs) do
    assert.are.equal(rank, ev.rank)
    assert.is_string(ev.event)
    assert.is_number(ev.t)
  end
  return evs
end

local function select_events(evs, name, pred)
  local out = {}
  for _, ev in ipairs(evs) do
    if ev.event == name and (not pred or pred(ev)) then out[#out + 1] = ev end
  end
  return out
end

describe("telemetry", function()
  local dir
  before_each(function() dir = h.tmpdir() end)
  after_each(function() h.rmdir(dir) end)

  it("times spans on the CPU and refuses unrecorded or mixed timers", function()
    local a, b = assert(telemetry.timer("cpu")), assert(telemetry.timer("cpu"))
    assert.has_error(function() telemetry.elapsed(a, b) end)
    assert.are.equal(0, require("moonshard.core").C.msh_timer_record(a))
    uv.sleep(20)
    assert.are.equal(0, require("moonshard.core").C.msh_timer_record(b))
    local s = telemetry.elapsed(a, b)
    assert.is_true(s >= 0.015 and s < 1, tostring(s))
    local t, err = telemetry.timer("cuda:99")
    assert.is_nil(t)
    assert.truthy(err)
  end)

  it("writes one JSON object a line and sums busy and idle over a window", function()
    local tel = assert(telemetry.open(dir .. "/deep/er", { rank = 3, world = 4, meta = { script = "x" } }))
    local probe = tel:stage("cpu", 1)
    probe:window_begin()
    for i = 1, 3 do
      uv.sleep(10) -- idle
      probe:begin(7, i)
      uv.sleep(20) -- busy
      probe:finish()
    end
    uv.sleep(10)
    probe:window_end()
    tel:event("step", { n = 1 })
    tel:close { extra = "yes" }
    local evs = events_of(dir .. "/deep/er/rank3.jsonl", 3)
    assert.are.equal("open", evs[1].event)
    assert.are.equal(4, evs[1].world)
    assert.are.equal("x", evs[1].script)
    local stages = select_events(evs, "stage")
    assert.are.equal(3, #stages)
    for i, ev in ipairs(stages) do
      assert.are.equal(1, ev.stage)
      assert.are.equal(7, ev.tokens)
      assert.are.equal(i, ev.mb)
      assert.is_true(ev.busy_s >= 0.015, tostring(ev.busy_s))
      assert.is_true(ev.idle_s >= 0.008, tostring(ev.idle_s))
    end
    local sum = select_events(evs, "summary")[1]
    assert.are.equal("yes", sum.extra)
    local st = sum.stages[1]
    assert.are.equal(3, st.passes)
    -- idle: 3 gaps before the passes and one after, about 10 ms each; busy about 60 ms
    assert.is_true(st.busy_s >= 0.055 and st.idle_s >= 0.035, cjson.encode(st))
    assert.is_true(st.bubble > 0.2 and st.bubble < 0.6, tostring(st.bubble))
    assert.is_true(math.abs(sum.bubble - st.bubble) < 1e-12)
  end)

  it("names a log folder it cannot make; stays off without one", function()
    h.write(dir .. "/file", "x")
    local tel, err = telemetry.open(dir .. "/file/sub", { rank = 0 })
    assert.is_nil(tel)
    assert.truthy(err:find("is not a directory", 1, true), err)
    assert.is_nil(telemetry.from_env { dir = "" })
    assert.are.equal(1 / 3, telemetry.gpipe_bound(2, 2))
  end)
end)

describe("telemetry of distributed runs (CPU ranks)", function()
  local dir
  before_each(function() dir = h.tmpdir() end)
  after_each(function() h.rmdir(dir) end)

  it("launch makes the run's log folder and passes it to the ranks", function()
    h.write(dir .. "/env.lua", "print(os.getenv('MSH_LOG_DIR'))")
    local out, err, code = h.run { "launch", "-n", "2", "--tag-output", "--log-dir", dir .. "/run", dir .. "/env.lua" }
    assert.are.equal(0, code, err)
    assert.truthy(err:find("moonshard launch: logs in " .. dir .. "/run", 1, true), err)
    assert.truthy(out:find("[rank 1] " .. dir .. "/run", 1, true), out)
    assert.truthy(uv.fs_stat(dir .. "/run").type == "directory")
    local _, err2, code2 = h.run { "launch", "-n", "1", "--log-dir", dir .. "/env.lua/x", dir .. "/env.lua" }
    assert.are.equal(1, code2)
    assert.truthy(err2:find("cannot make the log folder", 1, true), err2)
  end)

  it("--tp 2: every all-reduce is an event, two per layer and forward pass, on both ranks", function()
    local out, err, code = h.run { "launch", "-n", "2", "--log-dir", dir, "generate", "--model", h.stories,
      "--max-tokens", "20", "--temperature", "0", "--tp", "2" }
    assert.are.equal(0, code, err)
    assert.truthy(#out > 20, out)
    for r = 0, 1 do
      local evs = events_of(dir .. "/rank" .. r .. ".jsonl", r)
      local passes = select_events(evs, "stage")
      local ars = select_events(evs, "collective", function(ev) return ev.op == "all_reduce" end)
      local sum = select_events(evs, "summary")[1]
      -- an empty prompt is BOS alone: one pass for it, then one per generated token but the last
      assert.are.equal(1 + sum.generated_tokens - 1, #passes)
      assert.are.equal(20, sum.generated_tokens)
      assert.are.equal(2 * N_LAYERS * #passes, #ars)
      for _, ev in ipairs(ars) do
        assert.are.equal("tp", ev.group)
        assert.are.equal(-1, ev.peer)
        assert.are.equal(64 * 4, ev.bytes) -- dim 64, f32, one token
        assert.is_true(ev.seconds >= 0 and ev.device == false)
      end
      assert.are.equal(#ars, sum.collectives.all_reduce.calls)
    end
  end)

  it("--pp 2: each stage reports busy and idle time and a bubble fraction in [0, 1]", function()
    local _, err, code = h.run { "launch", "-n", "2", "--log-dir", dir, "generate", "--model", h.stories,
      "--max-tokens", "20", "--temperature", "0", "--pp", "2" }
    assert.are.equal(0, code, err)
    for r = 0, 1 do
      local evs = events_of(dir .. "/rank" .. r .. ".jsonl", r)
      local sum = select_events(evs, "summary")[1]
      local st = sum.stages[1]
      assert.are.equal(r, st.stage)
      assert.are.equal(20, st.passes)
      assert.is_true(st.busy_s > 0 and st.idle_s > 0, cjson.encode(st))
      assert.is_true(st.bubble >= 0 and st.bubble <= 1, tostring(st.bubble))
      -- activations go forward through send/recv, one a pass
      local op = r == 0 and "send" or "recv"
      assert.are.equal(20, #select_events(evs, "collective", function(ev) return ev.op == op and ev.group == "pp" end))
    end
  end)

  it("bench reports all-reduce time with --tp 2 and the bubble with --pp 2", function()
    for _, case in ipairs { { "--tp", "2" }, { "--pp", "2" } } do
      local out, err, code = h.run { "launch", "-n", "2", "--log-dir", dir, "bench", "--model", h.stories,
        "--prompt-len", "8", "--gen-len", "16", "--loops", "2", "--warmup", "1", case[1], case[2] }
      assert.are.equal(0, code, err)
      local r = cjson.decode(out:match("{.*}"))
      if case[1] == "--tp" then
        assert.are.equal(2 * N_LAYERS, r.allreduce_calls_per_token)
        assert.is_true(r.allreduce_ms_per_token > 0, out)
        assert.is_true(r.allreduce_share > 0 and r.allreduce_share <= 1, out)
        -- collectives in isolation: one all-reduce, and a step's (the layers' sums with their norms)
        assert.is_true(r.allreduce_us > 0, out)
        assert.is_true(r.collectives_us_per_token > 0, out)
        assert.is_true(r.collectives_share_isolated > 0, out)
      else
        assert.is_true(r.bubble >= 0 and r.bubble <= 1, out)
        assert.are.equal(2, #r.stage_busy_s)
      end
    end
  end)
end)
