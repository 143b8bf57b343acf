-- moonshard.runner: the step over sequences of their own lengths and positions against each
-- sequence run alone, and memory owned by arenas: models closed explicitly give their memory
-- back, and forward passes leave nothing behind, with the garbage collector stopped (so no
-- finalizer can be what frees it).
local h = require "helpers"
local moonshard = require "moonshard"
local runner = require "moonshard.runner"
local dummy = require "moonshard.loaders.dummy"

-- bytes the C allocator has handed out and not had back (glibc's mallinfo2: heap blocks in use
-- plus mapped ones), where CPU tensors live; unlike the resident size, freed memory the
-- allocator keeps for reuse does not count
local ffi = require "ffi"
pcall(ffi.cdef, [[
struct msh_spec_mallinfo2 { size_t arena, ordblks, smblks, hblks, hblkhd, usmblks, fsmblks, uordblks, fordblks, keepcost; };
struct msh_spec_mallinfo2 mallinfo2(void);
]])
local function rss()
  local m = ffi.C.mallinfo2()
  return tonumber(m.uordblks + m.hblkhd)
end

-- a random model of a few tens of MB (dummy weights from a config.json)
local function dummy_desc(over)
  local cfg = {
    architectures = { "LlamaForCausalLM" }, model_type = "llama", hidden_size = 256, intermediate_size = 768,
    num_attention_heads = 8, num_key_value_heads = 2, num_hidden_layers = 2, vocab_size = 8192,
    max_position_embeddings = 512, rms_norm_eps = 1e-5, tie_word_embeddings = false,
  }
  for k, v in pairs(over or {}) do cfg[k] = v end
  local path = os.tmpname()
  local f = assert(io.open(path, "wb"))
  f:write(require("cjson").encode(cfg))
  f:close()
  local d = assert(dummy.load(path))
  os.remove(path)
  return d
end

describe("runner:step", function()
  it("runs sequences of their own lengths and positions, each as it runs alone", function()
    local m = assert(moonshard.load(h.hf .. "/llama3", { batch = 4, chunk = 8 }))
    local ref = assert(moonshard.load(h.hf .. "/llama3", { chunk = 8 }))
    local prompts = { { 1, 5, 9, 13, 17 }, { 2, 4 }, { 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 33 } }
    -- prefill three prompts of different lengths in slots 3, 0, 1 in one step
    local batch = {
      { slot = 3, pos = 0, tokens = prompts[1] },
      { slot = 0, pos = 0, tokens = prompts[2] },
      { slot = 1, pos = 0, tokens = prompts[3] },
    }
    local got = assert(m:step(batch)):values()
    local V = m.desc.vocab_size
    for i, p in ipairs(prompts) do
      ref:reset()
      local want = assert(ref:forward(p, 0)):values()
      local row = { unpack(got, (i - 1) * V + 1, i * V) }
      assert.is_true(h.max_abs_diff(row, want) < 1e-5, "prompt " .. i)
    end
    -- then one decode token each, at their own positions, in one step (slots 0, 1, 3: not adjacent)
    local nexts = { 40, 41, 42 }
    got = assert(m:step {
      { slot = 1, pos = #prompts[3], tokens = { nexts[3] } },
      { slot = 3, pos = #prompts[1], tokens = { nexts[1] } },
      { slot = 0, pos = #prompts[2], tokens = { nexts[2] } },
    }):values()
    for k, i in ipairs { 3, 1, 2 } do
      ref:reset()
      assert(ref:forward(prompts[i], 0))
      local want = assert(ref:forward(nexts[i])):values()
      local row = { unpack(got, (k - 1) * V + 1, k * V) }
      assert.is_true(h.max_abs_diff(row, want) < 1e-5, "decode " .. i)
    end
    m:close()
    ref:close()
  end)

  it("names what is wrong with a batch", function()
    local m = assert(moonshard.load(h.stories, { batch = 2 }))
    local function fails(batch, want)
      local ok, err = m:step(batch)
      assert.is_nil(ok)
      assert.truthy(err:find(want, 1, true), err)
    end
    fails({}, "no sequences")
    fails({ { slot = 0, pos = 0, tokens = {} } }, "sequence 1 has no tokens")
    fails({ { slot = 2, pos = 0, tokens = { 1 } } }, "slot 2 outside [0, 2)")
    fails({ { slot = 0, pos = 0, tokens = { 1 } }, { slot = 0, pos = 0, tokens = { 2 } } }, "slot 0 appears twice")
    fails({ { slot = 0, pos = 0, tokens = { 1 } }, { slot = 1, pos = 0, tokens = { 2 } }, { slot = 1, pos = 0, tokens = { 2 } } },
      "3 sequences for 2 KV slots")
    m:close()
  end)
end)

describe("memory owned by arenas (garbage collector stopped)", function()
  before_each(function() collectgarbage("stop") end)
  after_each(function() collectgarbage("restart") end)

  it("gives a model's memory back when it is closed, 50 times over", function()
    local desc = dummy_desc()
    local function once()
      local r = assert(runner.build(desc, { device = "cpu", max_seq = 256, chunk = 64 }))
      assert(r:forward({ 1, 2, 3, 4 }, 0))
      r:close()
    end
    once()
    local base = rss()
    for _ = 1, 50 do once() end
    -- each model holds ~23 MB of weights, cache and buffers: 50 leaked would be over 1 GB
    local grown = rss() - base
    assert.is_true(grown < 2 ^ 20, string.format("allocated memory grew by %.1f MB", grown / 2 ^ 20))
  end)

  it("keeps allocated memory flat over 1,000 passes that return every position's logits", function()
    local r = assert(runner.build(dummy_desc { vocab_size = 2048 }, { device = "cpu", max_seq = 256, chunk = 8 }))
    local ids = {}
    for i = 1, 20 do ids[i] = (i * 37) % 2048 end -- three chunks of 8, 8 and 4 tokens
    local function pass()
      local all = assert(r:forward(ids, 0, { all_logits = true })) -- (20, 2048): 160 KB
      all:free()
    end
    for _ = 1, 20 do pass() end
    local base = rss()
    for _ = 1, 1000 do pass() end
    local grown = rss() - base
    assert.is_true(grown < 2 ^ 20, string.format("allocated memory grew by %.1f MB", grown / 2 ^ 20))
    r:close()
  end)
end)
