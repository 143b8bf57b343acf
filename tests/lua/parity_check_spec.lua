-- tools/parity/check_8b.lua on the CPU against a small reference in its format: transformers'
-- logits of the tiny bf16 fixture (tests/fixtures/hf-tiny) for the top-1 tokens, and greedy
-- continuations computed here. The GPU check runs the same script on the 8B shape.
local h = require "helpers"
local moonshard = require "moonshard"
local cjson = require "cjson"

local reference_tensor = h.reference

-- reference.json for DIR: top-1 (with ties), top-5 from transformers' logits; greedy tokens
-- from moonshard on the CPU with the script's settings (bf16 weights and cache)
local function write_reference(dir, gen)
  local ids = reference_tensor("ids")
  local logits, shape = reference_tensor("logits_bf16")
  local T, V = shape[1], shape[2]
  local ref = { ids = ids, top1_bf16 = {}, ties_bf16 = {}, top5_bf16 = {}, top5_logits_bf16 = {} }
  for i = 1, T do
    local order = {}
    for j = 1, V do order[j] = j - 1 end
    table.sort(order, function(a, b)
      local x, y = logits[(i - 1) * V + a + 1], logits[(i - 1) * V + b + 1]
      if x ~= y then return x > y end
      return a < b
    end)
    ref.top1_bf16[i] = order[1]
    ref.ties_bf16[i] = { order[1] }
    ref.top5_bf16[i], ref.top5_logits_bf16[i] = {}, {}
    for k = 1, 5 do
      ref.top5_bf16[i][k] = order[k]
      ref.top5_logits_bf16[i][k] = logits[(i - 1) * V + order[k] + 1]
    end
  end
  ref.top1_f32 = ref.top1_bf16
  ref.prompts = { { 5, 9, 77, 3 }, { 200, 1, 1, 40 }, { 17, 18, 19, 20 } }
  local m = assert(moonshard.load(dir, { device = "cpu", dtype = "bf16", kv_dtype = "bf16" }))
  ref.greedy_bf16 = {}
  for p, prompt in ipairs(ref.prompts) do
    m:reset()
    local out, lg = {}, assert(m:forward(prompt, 0))
    for k = 1, gen do
      out[k] = m:argmax(lg)
      if k < gen then lg = assert(m:forward(out[k])) end
    end
    ref.greedy_bf16[p] = out
  end
  ref.greedy_f32 = ref.greedy_bf16
  ref.meta = { transformers = "fixture", torch = "fixture", hf_bf16_vs_f32_prompts_identical = #ref.prompts }
  h.write(dir .. "/reference.json", cjson.encode(ref))
  return ref
end

describe("tools/parity/check_8b.lua", function()
  local tmp
  before_each(function()
    tmp = h.tmpdir()
    h.copy_dir(h.hf .. "/bf16", tmp .. "/m")
  end)
  after_each(function() h.rmdir(tmp) end)

  it("passes when every top-1 and greedy token agrees, and prints its JSON", function()
    write_reference(tmp .. "/m", 12)
    local out, err, code = h.run { h.root .. "/tools/parity/check_8b.lua", tmp .. "/m", "--device", "cpu",
      "--min-prompts", "3" }
    assert.are.equal(0, code, err .. out)
    local r = cjson.decode(out)
    assert.are.equal(1, r.top1_agreement)
    assert.are.equal(3, r.prompts_identical)
    assert.are.equal(48, r.positions)
    assert.is_true(r.pass)
    assert.is_true(r.load_bytes > 0 and r.load_s > 0)
  end)

  it("fails (exit 1) when a continuation or a top-1 differs, naming where", function()
    local ref = write_reference(tmp .. "/m", 8)
    ref.greedy_bf16[2][5] = (ref.greedy_bf16[2][5] + 1) % 256
    ref.top1_bf16[7] = (ref.top1_bf16[7] + 1) % 256
    ref.ties_bf16[7] = { ref.top1_bf16[7] }
    h.write(tmp .. "/m/reference.json", cjson.encode(ref))
    local out, err, code = h.run { h.root .. "/tools/parity/check_8b.lua", tmp .. "/m", "--device", "cpu",
      "--min-prompts", "3", "--min-top1", "0.99" }
    assert.are.equal(1, code, err .. out)
    local r = cjson.decode(out)
    assert.are.equal(2, r.prompts_identical)
    assert.are.equal(4, r.first_difference[2])
    assert.is_true(math.abs(r.top1_agreement - 47 / 48) < 1e-9)
    assert.are.equal(6, r.misses[1].position)
    assert.is_false(r.pass)
  end)

  it("says what to run when the reference is missing (exit 2)", function()
    local _, err, code = h.run { h.root .. "/tools/parity/check_8b.lua", tmp .. "/m", "--device", "cpu" }
    assert.are.equal(2, code)
    assert.truthy(err:find("hf_8b.py", 1, true), err)
  end)
end)
