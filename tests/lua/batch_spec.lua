-- model:forward_batch: several sequences through one pass give each sequence's logits as it gets
-- alone through model:forward (CPU: within 1e-5), with one position for all or per-sequence
-- positions, chunked prompts, fused and separate projections, and under tensor and pipeline
-- parallelism; model:forward is the same with a batched cache; misuse gets a message.
local h = require "helpers"
local moonshard = require "moonshard"
local check = require "batch_check"

local function batched_vs_alone(path, opts)
  local m = assert(moonshard.load(path, { batch = 3, chunk = opts.chunk, fuse = opts.fuse }))
  local s = assert(moonshard.load(path, { chunk = opts.chunk, fuse = opts.fuse }))
  return check.run(m, s, m.desc.vocab_size)
end

describe("model:forward_batch (CPU)", function()
  for _, case in ipairs {
    { "stories260K", h.stories, {} },
    { "stories260K, chunks of 4", h.stories, { chunk = 4 } },
    { "hf-tiny llama3 (GQA 4:1)", h.hf .. "/llama3", {} },
    { "hf-tiny llama3, separate q/k/v and gate/up, chunks of 4", h.hf .. "/llama3", { fuse = false, chunk = 4 } },
    { "hf-tiny f32", h.hf .. "/f32", {} },
  } do
    it(case[1] .. ": each sequence's logits as alone within 1e-5", function()
      local diff, rows = batched_vs_alone(case[2], case[3])
      assert.are.equal(12, rows)
      assert.is_true(diff < 1e-5, string.format("max |diff| %.3g", diff))
    end)
  end

  it("gives different sequences different logits (the comparison can fail)", function()
    local m = assert(moonshard.load(h.stories, { batch = 2 }))
    local v = assert(m:forward_batch({ { 1, 2, 3 }, { 1, 200, 7 } }, 0)):values()
    local V, worst = m.desc.vocab_size, 0
    for i = 1, V do worst = math.max(worst, math.abs(v[i] - v[V + i])) end
    assert.is_true(worst > 1e-2)
  end)

  it("leaves model:forward as it was (slot 0 of a batched cache)", function()
    local ids = { 1, 403, 407, 261, 378, 432 }
    local a = assert(moonshard.load(h.stories, { batch = 4 }))
    local b = assert(moonshard.load(h.stories))
    assert.are.same(b:forward(ids, 0):values(), a:forward(ids, 0):values())
    assert.are.same(b:forward(300):values(), a:forward(300):values())
    assert.are.equal(7, a.net.pos)
  end)

  it("tracks positions per slot and shares slot 0 with model:forward", function()
    local m = assert(moonshard.load(h.stories, { batch = 3 }))
    assert(m:forward({ 1, 2, 3, 4 }, 0))
    assert(m:forward_batch({ { 5, 6 }, { 7, 8 } }, { 4, 0 }))
    assert.are.equal(6, m.net:slot_position(0))
    assert.are.equal(2, m.net:slot_position(1))
    assert.are.equal(0, m.net:slot_position(2))
    assert.are.equal(6, m.net.pos)
    m:reset()
    assert.are.equal(0, m.net:slot_position(1))
  end)

  it("explains misuse", function()
    local m = assert(moonshard.load(h.stories, { batch = 2, max_seq = 16 }))
    local function msg(...)
      local ok, err = m:forward_batch(...)
      assert.is_nil(ok)
      return err
    end
    assert.truthy(msg({ { 1 }, { 2 }, { 3 } }):find("outside the model's 2 (opts.batch)", 1, true))
    assert.truthy(msg({ { 1 } }, 0, 2):find("slots [2, 3)", 1, true))
    assert.truthy(msg({ { 1, 2 }, { 3 } }):find("sequence 2 has 1 tokens, sequence 1 has 2", 1, true))
    assert.truthy(msg({ { 1 }, { 1e9 } }):find("outside the vocabulary", 1, true))
    assert.truthy(msg({ { 1 }, { 2 } }, { 0, 16 }):find("context full", 1, true))
    assert.truthy(msg({ { 1 }, { 2 } }, { 0, -1 }):find("not a position", 1, true))
    assert.truthy(msg({}):find("no sequences", 1, true))
  end)
end)

describe("model:forward_batch under tensor and pipeline parallelism (CPU ranks)", function()
  for _, case in ipairs { { "f32", 2, 1 }, { "llama3", 1, 2 } } do
    local name, tp, pp = case[1], case[2], case[3]
    it(string.format("%s checkpoint, tp %d x pp %d: each sequence's logits as alone", name, tp, pp), function()
      local out, err, code = h.run { "launch", "-n", tostring(tp * pp), h.root .. "/tests/lua/parallel_batch.lua",
        name, tostring(tp), tostring(pp) }
      assert.are.equal(0, code, err)
      local diff, rows = out:match("max_abs_diff (%S+) rows (%d+)")
      assert.is_not_nil(diff, out .. err)
      assert.are.equal(12, tonumber(rows))
      assert.is_true(tonumber(diff) < 1e-5, "max |diff| " .. tostring(diff))
    end)
  end
end)
