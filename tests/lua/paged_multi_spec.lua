-- The serving engine over the paged KV pool on CPU ranks: `moonshard launch -n 2` with --tp 2 and
-- with --pp 2, and -n 4 with both (tests/lua/paged_rank.lua): ragged prompts in chunks under a
-- small step budget, prefix-cache hits sharing pool blocks, a pool small enough to preempt, a
-- request cancelled mid-answer. Each greedy answer is one rank's answer to the prompt alone, and
-- every block is free at the end.
local h = require "helpers"
local cjson = require "cjson"

local function run(tp, pp)
  local dir = h.tmpdir()
  local args = { h.root .. "/tests/lua/paged_rank.lua", h.stories, tostring(tp), tostring(pp) }
  if tp * pp > 1 then
    for i, a in ipairs { "launch", "-n", tostring(tp * pp), "--log-dir", dir } do table.insert(args, i, a) end
  end
  local out, err, code = h.run(args)
  h.rmdir(dir)
  assert.are.equal(0, code, err)
  return cjson.decode(out:match("[^\n]*{[^\n]*"))
end

local function prefix(t, n)
  local o = {}
  for i = 1, n do o[i] = t[i] end
  return o
end

-- the run's own checks: answers as alone (the cancelled one a prefix of its answer), the
-- accounting's invariants, every block free, and the paths the run was meant to take
local function check(got, alone)
  local n = #alone
  for i = 1, n - 1 do
    assert.are.same(alone[i], got.batched[i], "prompt " .. i)
    assert.are.equal("length", got.finish[i])
  end
  assert.are.equal("cancelled", got.finish[n])
  assert.are.equal(3, #got.batched[n])
  assert.are.same(prefix(alone[n], 3), got.batched[n])
  assert.is_true(got.check, tostring(got.check))
  assert.are.equal(0, got.stats.used)
  assert.are.equal(got.stats.total, got.stats.free)
  assert.is_true(got.stats.preemptions > 0, "no preemption")
  assert.is_true(got.stats.prefix_hits > 0, "no prefix-cache hit")
end

describe("the engine over a paged KV pool on CPU ranks", function()
  local one
  setup(function() one = run(1, 1) end)

  it("one rank: batched answers as each prompt alone, every block free", function()
    check(one, one.alone)
    assert.are.equal(0, one.calls)
  end)

  for _, case in ipairs { { 2, 1 }, { 1, 2 }, { 2, 2 } } do
    local tp, pp = case[1], case[2]
    it(string.format("launch -n %d --tp %d --pp %d: one rank's answers, every block free", tp * pp, tp, pp), function()
      local got = run(tp, pp)
      check(got, one.alone)
      assert.are.same(one.batched, got.batched)
      assert.are.same(one.stats, got.stats) -- the same schedule: rank 0 plans, the others follow
      assert.is_true(got.calls >= one.stats.steps, "calls mirrored: " .. tostring(got.calls))
    end)
  end
end)
