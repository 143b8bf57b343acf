local shard = require "moonshard.policy.shard"
local pipeline = require "moonshard.policy.pipeline"
local moonshard = require "moonshard"
local h = require "helpers"

describe("tensor-parallel slicing", function()
  local desc = { dim = 64, n_heads = 8, n_kv_heads = 2, hidden_dim = 172, head_dim = 8 }

  it("splits heads and the MLP, and says why when it cannot", function()
    local p = assert(shard.plan({ dim = 64, n_heads = 8, n_kv_heads = 2, hidden_dim = 176 }, 2))
    assert.are.same({ tp = 2, heads = 4, kv_heads = 1, hidden = 88 }, p)
    local _, err = shard.plan(desc, 2) -- 172 / 2 fine
    assert.is_nil(err)
    _, err = shard.plan(desc, 3)
    assert.truthy(err:find("8 attention heads do not split over 3", 1, true))
    p = assert(shard.plan({ dim = 64, n_heads = 8, n_kv_heads = 2, hidden_dim = 172 }, 4))
    assert.are.equal(1, p.kv_heads) -- fewer KV heads than ranks: each keeps the one it reads
  end)

  it("slices views whose shapes fit a smaller model", function()
    local loaded = assert(require("moonshard.loader").load(h.hf .. "/f32"))
    local d = loaded.desc
    local s = assert(shard.slice(d, 2, 1))
    assert.are.equal(4, s.n_heads)
    assert.are.equal(1, s.n_kv_heads)
    assert.are.same({ 32, 64 }, s.weights.layers[1].wq:shape())
    assert.are.same({ 64, 32 }, s.weights.layers[1].wo:shape())
    assert.are.same({ 86, 64 }, s.weights.layers[1].w_gate:shape())
    -- rank 1's wq rows are rows 32..63 of the full matrix
    local full, part = d.weights.layers[1].wq:values(), s.weights.layers[1].wq:values()
    assert.are.equal(full[32 * 64 + 1], part[1])
    -- the output head: rank 1 holds the second half of the vocabulary's rows
    local V = d.vocab_size
    assert.are.equal(V / 2, s.vocab_local)
    assert.are.same({ V / 2, 64 }, s.weights.output:shape())
    assert.are.equal(d.weights.output:values()[(V / 2) * 64 + 1], s.weights.output:values()[1])
    -- kept whole on request, or when the vocabulary does not split evenly
    local whole = assert(shard.slice(d, 2, 1, { vocab_parallel = false }))
    assert.is_nil(whole.vocab_local)
    assert.are.same({ V, 64 }, whole.weights.output:shape())
    if V % 3 ~= 0 and d.n_heads % 3 == 0 then assert.is_nil(assert(shard.slice(d, 3, 0)).vocab_local) end
    assert.is_truthy(moonshard)
  end)
end)

describe("pipeline stages", function()
  it("parses --pp-layers and rejects gaps", function()
    assert.are.same({ { 1, 13 }, { 14, 26 } }, pipeline.parse("0-12,13-25", 26))
    local _, err = pipeline.parse("0-12,14-25", 26)
    assert.truthy(err:find("without gaps", 1, true))
    _, err = pipeline.parse("0-12", 26)
    assert.truthy(err:find("cover 13 of 26", 1, true))
  end)

  it("balances contiguous layers to minimize the heaviest stage", function()
    assert.are.same({ { 1, 2 }, { 3, 4 } }, pipeline.balance({ 1, 1, 1, 1 }, 2))
    assert.are.same({ { 1, 3 }, { 4, 4 } }, pipeline.balance({ 1, 1, 1, 1 }, 2, 0, 2))
    assert.are.same({ { 1, 1 }, { 2, 4 } }, pipeline.balance({ 5, 1, 1, 1 }, 2))
  end)

  it("counts the output head for decode, not for prefill", function()
    -- Llama-3-8B: the head (128256 x 4096) weighs about 2.4 layers
    local desc = { dim = 4096, n_heads = 32, n_kv_heads = 8, head_dim = 128, hidden_dim = 14336, n_layers = 32,
      vocab_size = 128256 }
    assert.are.same({ { 1, 17 }, { 18, 32 } }, pipeline.plan(desc, 2))
    assert.are.same({ { 1, 17 }, { 18, 32 } }, pipeline.plan(desc, 2, { balance = "decode" }))
    assert.are.same({ { 1, 16 }, { 17, 32 } }, pipeline.plan(desc, 2, { balance = "prefill" }))
    local r, err = pipeline.plan(desc, 2, { balance = "fast" })
    assert.is_nil(r)
    assert.matches("unknown pipeline balance 'fast'", err, 1, true)
  end)
end)
