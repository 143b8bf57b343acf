-- Model paths against golden outputs and an independent implementation (transformers).
local h = require "helpers"
local moonshard = require "moonshard"

describe("stories260K (llama2.c checkpoint)", function()
  local golden = h.read(h.stories .. "/expected_greedy_200.txt")

  it("generates the golden text greedily through the Lua API", function()
    local m = assert(moonshard.load(h.stories))
    local parts = {}
    local stats = assert(m:generate({ prompt = "", max_tokens = 200, temperature = 0 },
      function(s) parts[#parts + 1] = s end))
    assert.are.equal(200, stats.generated_tokens)
    assert.are.equal(golden, table.concat(parts))
  end)

  it("generates the golden text through `moonshard generate`", function()
    local out, err, code = h.run { "generate", "--model", h.stories, "--max-tokens", "200", "--temperature", "0" }
    assert.are.equal(0, code, err)
    assert.are.equal(golden .. "\n", out)
    assert.truthy(err:find("generated tokens: 200", 1, true), err)
  end)

  it("gives the same logits prefilling in chunks as in one pass and token by token", function()
    local ids = { 1, 403, 407, 261, 378, 432, 430, 306, 267, 395, 415, 259, 284 }
    local function run(chunk, stepwise)
      local m = assert(moonshard.load(h.stories, { chunk = chunk }))
      if stepwise then
        local l
        for i, id in ipairs(ids) do l = assert(m:forward(id, i - 1)) end
        return l:values()
      end
      return assert(m:forward(ids, 0)):values()
    end
    local one = run(64)
    -- logits reach about 15: 1e-4 is a relative error near 1e-5 (summation order differs)
    assert.is_true(h.max_abs_diff(one, run(5)) < 1e-4)
    assert.is_true(h.max_abs_diff(one, run(64, true)) < 1e-4)
  end)

  it("samples reproducibly for a seed", function()
    local a = h.run { "generate", "--model", h.stories, "--max-tokens", "40", "--seed", "7", "--temperature", "0.9" }
    local b = h.run { "generate", "--model", h.stories, "--max-tokens", "40", "--seed", "7", "--temperature", "0.9" }
    local c = h.run { "generate", "--model", h.stories, "--max-tokens", "40", "--seed", "8", "--temperature", "0.9" }
    assert.are.equal(a, b)
    assert.are_not.equal(a, c)
  end)
end)

describe("Hugging Face checkpoints against transformers", function()
  local ids = h.reference("ids")

  for _, name in ipairs { "f32", "bf16", "llama3" } do
    it(name .. ": logits at every position within 1e-4", function()
      local m = assert(moonshard.load(h.hf .. "/" .. name))
      local logits = assert(m:forward(ids, 0, { all_logits = true }))
      local want = h.reference("logits_" .. name)
      local diff = h.max_abs_diff(logits:values(), want)
      assert.is_true(diff < 1e-4, string.format("%s: max |diff| %.3g", name, diff))
    end)
  end

  it("gives the same logits with q/k/v and gate/up fused into single weights as without", function()
    local fused = assert(moonshard.load(h.hf .. "/llama3"))
    local plain = assert(moonshard.load(h.hf .. "/llama3", { fuse = false }))
    local w1, w0 = fused.net.stage:acquire(1), plain.net.stage:acquire(1)
    assert.truthy(w1.wqkv and w1.w_gu and not w1.wq and not w1.w_gate)
    assert.truthy(w0.wq and w0.w_gate and not w0.wqkv)
    -- each holds the activation buffers of its own projections only
    local bf, bp = fused.net.buf, plain.net.buf
    assert.truthy(bf.qkv and bf.gu and not bf.k and not bf.v and not bf.u)
    assert.truthy(bp.k and bp.v and bp.u and not bp.qkv and not bp.gu)
    local a = assert(fused:forward(ids, 0, { all_logits = true })):values()
    local b = assert(plain:forward(ids, 0, { all_logits = true })):values()
    assert.is_true(h.max_abs_diff(a, b) < 1e-5)
    for i, id in ipairs(ids) do
      a = assert(fused:forward(id, i - 1)):values()
      b = assert(plain:forward(id, i - 1)):values()
    end
    assert.is_true(h.max_abs_diff(a, b) < 1e-5)
  end)

  it("decodes token by token to the same logits as the full pass", function()
    local m = assert(moonshard.load(h.hf .. "/f32"))
    local want, shape = h.reference("logits_f32")
    local last
    for i, id in ipairs(ids) do last = assert(m:forward(id, i - 1)) end
    local V, row = shape[2], {}
    for j = 1, V do row[j] = want[(#ids - 1) * V + j] end
    assert.is_true(h.max_abs_diff(last:values(), row) < 1e-4)
  end)
end)
