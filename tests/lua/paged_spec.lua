-- The runner's paged KV cache (moonshard.runner, opts.kv_blocks): a step of ragged sequences
-- (prompts, chunks at non-zero positions, decodes) over scattered, shared blocks gives each
-- sequence the logits its own contiguous-cache pass gives, for every architecture form the
-- model files take (stacked q/k/v, Qwen2 biases, Qwen3 q/k norms, GQA); bad tables are refused
-- with a message naming the sequence and block.
local h = require "helpers"
local moonshard = require "moonshard"

-- logits (list of rows) of each sequence alone: prompt then the later tokens, on a fresh runner
local function alone(m, toks_list)
  local out = {}
  for i, toks in ipairs(toks_list) do
    m.net:reset()
    out[i] = assert(m.net:forward(toks, 0)):values()
  end
  return out
end

local function rows(t, n, V)
  local v, out = t:values(), {}
  for b = 1, n do out[b] = { unpack(v, (b - 1) * V + 1, b * V) } end
  return out
end

local CASES = {
  { "stories260K", h.stories },
  { "llama3 (GQA)", h.hf .. "/llama3" },
  { "qwen2 (biases)", h.arch .. "/qwen2" },
  { "qwen3 (q/k norms)", h.arch .. "/qwen3" },
}

describe("paged KV cache", function()
  it("keeps at most runner.PAGED_CONTEXTS step contexts, the least recently used freed, the same logits", function()
    local runner = require "moonshard.runner"
    local cap = runner.PAGED_CONTEXTS
    runner.PAGED_CONTEXTS = 3
    local ok, err = pcall(function()
      local pm = assert(moonshard.load(h.stories, { batch = 2, chunk = 16, kv_blocks = 40, block_size = 4 }))
      local ref = assert(moonshard.load(h.stories))
      local V = pm.net.vocab_size
      -- two sequences growing by ragged chunks: many (rows, sequences) shapes, few kept
      local A, B = { 1 }, { 1, 5 }
      local bA, bB = { 3, 9, 12, 20, 21, 22, 23, 24, 25, 26 }, { 30, 2, 17, 8, 11, 13, 14, 15, 16, 18 }
      local posA, posB = 0, 0
      local newA, newB = { 1 }, { 1, 5 }
      local shapes = {}
      for step = 1, 12 do
        local out = rows(assert(pm.net:step { { blocks = bA, pos = posA, tokens = newA },
          { blocks = bB, pos = posB, tokens = newB } }), 2, V)
        shapes[#newA + #newB] = true
        assert.is_true(pm.net.paged_count <= 3)
        local want = alone(ref, { A, B })
        assert.is_true(h.max_abs_diff(out[1], want[1]) < 2e-4, "A at step " .. step)
        assert.is_true(h.max_abs_diff(out[2], want[2]) < 2e-4, "B at step " .. step)
        posA, posB = #A, #B
        newA, newB = {}, {}
        for i = 1, (step % 3) + 1 do newA[i] = (step * 7 + i) % V; A[#A + 1] = newA[i] end
        for i = 1, (step % 4) + 1 do newB[i] = (step * 11 + i) % V; B[#B + 1] = newB[i] end
      end
      local n = 0
      for _ in pairs(shapes) do n = n + 1 end
      assert.is_true(n > 3, "the steps took more shapes than the bound")
      pm:close()
      ref:close()
    end)
    runner.PAGED_CONTEXTS = cap
    assert(ok, err)
  end)

  for _, case in ipairs(CASES) do
    it("steps ragged sequences over scattered blocks as each runs alone: " .. case[1], function()
      local pm = assert(moonshard.load(case[2], { batch = 3, chunk = 8, kv_blocks = 40, block_size = 4 }))
      local ref = assert(moonshard.load(case[2]))
      local V = pm.net.vocab_size
      local A = { 1, 9, 17, 25, 33, 41, 49, 57, 65, 73, 81 } -- 11 tokens
      local B = { 1, 9, 17, 25, 33, 41, 3, 5 }               -- shares A's first block
      local C = { 2, 4 }
      local tA, tB, tC = { 7, 23, 31, 40, 2 }, { 1, 3, 7, 100, 200, 300, 11 }, { 3 }
      -- scattered tables; B shares block 30 (A's first) as a prefix hit would
      local bA, bB, bC = { 30, 2, 17, 8, 11 }, { 30, 5, 39, 21 }, { 0, 13, 22 }
      -- step 1: A's prompt and C's whole prompt; B's first block is A's, its rest of the prompt
      -- goes in the next step
      local l1 = rows(assert(pm.net:step { { blocks = bA, pos = 0, tokens = A }, { blocks = bC, pos = 0, tokens = C } }), 2, V)
      -- step 2: A decodes, B computes positions 4..7 (a chunk at a non-zero position), C a chunk of 3
      local l2 = rows(assert(pm.net:step {
        { blocks = bA, pos = 11, tokens = { tA[1] } },
        { blocks = bB, pos = 4, tokens = { B[5], B[6], B[7], B[8] } },
        { blocks = bC, pos = 2, tokens = { tC[1], 9, 10 } } }), 3, V)
      -- step 3: three decodes
      local l3 = rows(assert(pm.net:step {
        { blocks = bC, pos = 5, tokens = { 12 } },
        { blocks = bA, pos = 12, tokens = { tA[2] } },
        { blocks = bB, pos = 8, tokens = { tB[1] } } }), 3, V)
      local want = alone(ref, {
        A, C, { unpack(A) }, B, { 2, 4, 3, 9, 10 }, { 2, 4, 3, 9, 10, 12 } })
      local function extend(t, ...) local o = { unpack(t) } for _, x in ipairs { ... } do o[#o + 1] = x end return o end
      local wA1 = alone(ref, { extend(A, tA[1]) })[1]
      local wA2 = alone(ref, { extend(A, tA[1], tA[2]) })[1]
      local wB1 = alone(ref, { extend(B, tB[1]) })[1]
      local tol = 2e-4
      assert.is_true(h.max_abs_diff(l1[1], want[1]) < tol, "A's prompt")
      assert.is_true(h.max_abs_diff(l1[2], want[2]) < tol, "C's prompt")
      assert.is_true(h.max_abs_diff(l2[1], wA1) < tol, "A's decode")
      assert.is_true(h.max_abs_diff(l2[2], want[4]) < tol, "B's chunk over A's block")
      assert.is_true(h.max_abs_diff(l2[3], want[5]) < tol, "C's chunk")
      assert.is_true(h.max_abs_diff(l3[1], want[6]) < tol, "C's decode")
      assert.is_true(h.max_abs_diff(l3[2], wA2) < tol, "A's second decode")
      assert.is_true(h.max_abs_diff(l3[3], wB1) < tol, "B's decode")
      -- every position's logits of one sequence through its table (the engine's echo)
      local all = assert(pm.net:forward_blocks(bA, A, 0, { all_logits = true }))
      ref.net:reset()
      local wall = assert(ref.net:forward(A, 0, { all_logits = true }))
      assert.is_true(h.max_abs_diff(all:values(), wall:values()) < tol)
      all:free(); wall:free()
      pm:close()
      ref:close()
    end)
  end

  it("refuses bad block tables, positions and sizes with a message naming them", function()
    local pm = assert(moonshard.load(h.stories, { batch = 2, chunk = 4, kv_blocks = 8, block_size = 4 }))
    local net = pm.net
    local function fails(batch, want)
      local ok, err = net:step(batch)
      assert.is_nil(ok)
      assert.truthy(err:find(want, 1, true), err)
    end
    fails({ { blocks = { 8 }, pos = 0, tokens = { 1 } } }, "block 8 (index 1) outside the pool [0, 8)")
    fails({ { blocks = { 1, -1 }, pos = 3, tokens = { 1, 2 } } }, "block -1 (index 2)")
    fails({ { blocks = { 1 }, pos = 3, tokens = { 1, 2 } } }, "1 blocks hold 4 positions, not 5")
    fails({ { pos = 0, tokens = { 1 } } }, "no block table")
    fails({ { blocks = { 1 }, pos = 0, tokens = {} } }, "sequence 1 has no tokens")
    fails({ { blocks = { 1, 2, 3 }, pos = 0, tokens = { 1, 2, 3, 4, 5, 6, 7, 8, 9 } } }, "9 rows exceed the step's 8")
    fails({ { blocks = { 1 }, pos = 0, tokens = { 1 } }, { blocks = { 2 }, pos = 0, tokens = { 1 } },
      { blocks = { 3 }, pos = 0, tokens = { 1 } } }, "3 sequences for a batch of 2")
    fails({ { blocks = { 1 }, pos = 0, tokens = { 100000 } } }, "outside the vocabulary")
    fails({ { blocks = { 1 }, pos = -1, tokens = { 1 } } }, "is not a position")
    local ok, err = net:forward_blocks({ 1 }, {}, 0)
    assert.is_nil(ok)
    assert.truthy(err:find("no tokens", 1, true))
    local m = assert(moonshard.load(h.stories))
    ok, err = m.net:forward_blocks({ 1 }, { 1 }, 0)
    assert.is_nil(ok)
    assert.truthy(err:find("not paged", 1, true))
    local bad, berr = moonshard.load(h.stories, { kv_blocks = 0 })
    assert.is_nil(bad)
    assert.truthy(berr:find("kv_blocks must be a positive integer", 1, true), berr)
    m:close()
    pm:close()
  end)
end)
