-- moonshard.score: log-probabilities from model:score / model:score_batch against every
-- position's logits, and scores that do not depend on how a sequence is cut or batched.
local h = require "helpers"
local moonshard = require "moonshard"

describe("model:score", function()
  local m = assert(moonshard.load(h.stories, { batch = 4 }))
  local ids = m.tokenizer:encode("Once upon a time there was a little girl named Lily. She liked to play", true)

  it("agrees with log_softmax over every position's logits", function()
    local r = assert(m:score(ids, 5))
    assert.equal(#ids - 5, #r.logprobs)
    local all = assert(m:forward(ids, 0, { all_logits = true }))
    local V = m.net.vocab_size
    local lsm = moonshard.tensor.new({ #ids, V }, "f32")
    moonshard.ops.log_softmax(lsm, all)
    local v = lsm:values()
    local sum = 0
    for p = 5, #ids - 1 do
      local ref = v[(p - 1) * V + ids[p + 1] + 1]
      assert.near(ref, r.logprobs[p - 4], 1e-4)
      local best, bi = -math.huge, 0
      for k = 0, V - 1 do
        if v[(p - 1) * V + k + 1] > best then best, bi = v[(p - 1) * V + k + 1], k end
      end
      assert.equal(bi == ids[p + 1], r.greedy[p - 4])
      sum = sum + ref
    end
    assert.near(sum, r.sum, 1e-3)
    all:free()
    lsm:free()
  end)

  it("does not depend on the cut (shared prefix or not) or the batch", function()
    local alone = assert(m:score(ids, 5))
    local late = assert(m:score(ids, 12))
    local batch = assert(m:score_batch {
      { ids = { 1, 2, 3, 4, 5, 6 }, first = 2 }, { ids = ids, first = 5 }, { ids = ids, first = 12 },
      { ids = { unpack(ids, 1, 15) }, first = 5 },
    })
    for i = 1, #alone.logprobs do
      -- tiny matrices (stories260K is 64 wide) take OpenBLAS kernels whose rounding varies with
      -- the row count by ~1e-6; SmolLM2-sized ones give the same bits (score.lua)
      assert.near(alone.logprobs[i], batch[2].logprobs[i], 2e-5)
      assert.equal(alone.greedy[i], batch[2].greedy[i])
    end
    for i = 1, #late.logprobs do
      assert.near(late.logprobs[i], alone.logprobs[i + 7], 2e-5)
      assert.near(late.logprobs[i], batch[3].logprobs[i], 2e-5)
    end
    for i = 1, 10 do assert.near(alone.logprobs[i], batch[4].logprobs[i], 2e-5) end
  end)

  it("refuses bad requests with a message", function()
    local r, err = m:score(ids, 0)
    assert.is_nil(r)
    assert.truthy(err:find("first 0 outside", 1, true), err)
    r, err = m:score({ 1, 9999 }, 1)
    assert.is_nil(r)
    assert.truthy(err:find("outside the vocabulary", 1, true), err)
  end)
end)
