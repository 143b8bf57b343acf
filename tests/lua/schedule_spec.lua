-- The micro-batched pipeline schedule: the policy (micro-batch slot ranges, GPipe prefill,
-- round-robin decode, the bubble of the plan on unit costs against (p-1)/(m+p-1)) and the stage
-- loop on two CPU ranks, whose greedy tokens equal one rank's batched run.
local h = require "helpers"
local schedule = require "moonshard.schedule"
local cjson = require "cjson"

describe("schedule policy", function()
  it("cuts a batch into micro-batches of slots", function()
    assert.same({ { slot0 = 0, size = 3 }, { slot0 = 3, size = 2 } }, schedule.micro_batches(5, 2))
    assert.same({ { slot0 = 0, size = 4 } }, schedule.micro_batches(4, 1))
    local _, err = schedule.micro_batches(2, 3)
    assert.truthy(err:find("3 micro-batches for 2 sequences", 1, true), err)
  end)

  it("plans GPipe prefill chunk by chunk, then round-robin decode", function()
    local plan = assert(schedule.plan { batch = 4, micro_batches = 2, prompt_len = 10, gen_len = 3, chunk = 6 })
    local kinds = {}
    for _, pass in ipairs(plan) do
      kinds[#kinds + 1] = string.format("%s%d@%d+%d%s%s", pass.phase:sub(1, 1), pass.mb, pass.pos0, pass.T,
        pass.sample and "s" or "", pass.feed and "f" or "")
    end
    assert.same({ "p1@0+6", "p2@0+6", "p1@6+4sf", "p2@6+4sf", "d1@10+1sf", "d2@10+1sf", "d1@11+1s", "d2@11+1s" }, kinds)
  end)

  it("has GPipe's bubble in prefill and almost none in decode once m >= p", function()
    for _, c in ipairs { { 2, 1 }, { 2, 2 }, { 2, 4 }, { 4, 4 }, { 3, 6 } } do
      local p, m = c[1], c[2]
      local pre = assert(schedule.plan { batch = 12, micro_batches = m, prompt_len = 8, gen_len = 1 })
      assert.is_true(math.abs(schedule.simulate(pre, p).bubble - schedule.bound(p, m)) < 1e-12)
      local all = assert(schedule.plan { batch = 12, micro_batches = m, prompt_len = 8, gen_len = 100 })
      local b = schedule.simulate(all, p).bubble
      if m >= p then assert.is_true(b < 0.02, tostring(b)) else assert.is_true(b > 0.4, tostring(b)) end
    end
  end)
end)

describe("micro-batched pipeline on CPU ranks", function()
  local ref
  local function tokens_of(out)
    local s = out:match("tokens (%[.-%]%])")
    assert.truthy(s, out)
    return cjson.decode(s)
  end

  for _, case in ipairs { { 5, 1 }, { 5, 2 }, { 4, 4 }, { 5, 2, "lookahead" } } do
    local N, m, extra = case[1], case[2], case[3]
    it(string.format("pp 2, %d sequences in %d micro-batches%s: the greedy tokens of one rank's batched run", N, m,
      extra and " (" .. extra .. ")" or ""), function()
      local script = h.root .. "/tests/lua/pipeline_batch.lua"
      if not ref or #ref ~= N then
        local out, err, code = h.run { script, "ref", tostring(N), "1", "16" }
        assert.are.equal(0, code, err)
        ref = tokens_of(out)
      end
      local dir = h.tmpdir()
      local out, err, code = h.run { "launch", "-n", "2", "--tag-output", "--log-dir", dir, script, "pp", tostring(N),
        tostring(m), "16", extra }
      h.rmdir(dir)
      assert.are.equal(0, code, err)
      assert.same(ref, tokens_of(out))
      for r = 0, 1 do
        local passes, bubble = out:match("%[rank " .. r .. "%] stage " .. r .. " passes (%d+) busy %S+ idle %S+ bubble (%S+)")
        assert.are.equal(16 * m, tonumber(passes))
        assert.is_true(tonumber(bubble) >= 0 and tonumber(bubble) <= 1, out)
      end
    end)
  end
end)
