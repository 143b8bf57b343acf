-- Architectures beyond Llama, each one model file plus its registry entry (moonshard.models):
-- Qwen2 (q/k/v biases, tied or untied head, rope theta 1e6), Qwen3 (per-head q/k RMSNorm, a head
-- size of its own), Mistral (a sliding window, refused when shorter than the context). Tiny
-- random f32 checkpoints (tools/make_arch_fixtures.py) against transformers' logits
-- (tools/arch_reference.py: reference.safetensors) and an independent float64 NumPy forward
-- (numpy_reference.safetensors), from Hugging Face and GGUF files, on one process and on CPU
-- ranks with tensor and pipeline parallelism.
local h = require "helpers"
local moonshard = require "moonshard"

local transformers = h.arch .. "/reference.safetensors"
local numpy = h.arch .. "/numpy_reference.safetensors"
local CASES = { "qwen2", "qwen2-untied", "qwen3", "mistral" }

local function logits(path, opts)
  local m = assert(moonshard.load(path, opts))
  local l = assert(m:forward(h.reference("ids", transformers), 0, { all_logits = true }))
  local v = l:values()
  l:free()
  m:close()
  return v
end

describe("architectures from the registry (CPU, f32)", function()
  for _, name in ipairs(CASES) do
    it(name .. ": Hugging Face logits within 1e-4 of transformers' and of a float64 NumPy forward", function()
      local got = logits(h.arch .. "/" .. name)
      local d1 = h.max_abs_diff(got, h.reference("logits_" .. name, transformers))
      local d2 = h.max_abs_diff(got, h.reference("logits_" .. name, numpy))
      assert.is_true(d1 < 1e-4, string.format("transformers: max |diff| %.3g", d1))
      assert.is_true(d2 < 1e-4, string.format("numpy: max |diff| %.3g", d2))
    end)

    it(name .. ": the GGUF twin gives its Hugging Face twin's logits", function()
      local a, b = logits(h.arch .. "/" .. name .. ".gguf"), logits(h.arch .. "/" .. name)
      local d = h.max_abs_diff(a, b)
      assert.is_true(d < 1e-5, string.format("max |diff| %.3g", d))
    end)
  end

  it("reads each architecture's own weights: Qwen2's stacked biases, Qwen3's head norms", function()
    local q2 = assert(moonshard.load(h.arch .. "/qwen2"))
    local w = q2.net.stage:acquire(1)
    assert.truthy(w.wqkv and w.b_qkv and not w.bq, "q/k/v and their biases stacked")
    assert.are.same({ q2.net.n_heads * q2.net.head_dim + 2 * q2.net.n_kv_heads * q2.net.head_dim }, w.b_qkv:shape())
    assert.are.equal(q2.net.stage:output(), q2.net.stage:embed(), "tied head")
    q2:close()
    local q3 = assert(moonshard.load(h.arch .. "/qwen3"))
    w = q3.net.stage:acquire(1)
    assert.truthy(w.q_norm and w.k_norm and w.wq and not w.wqkv, "head norms, q/k/v apart")
    assert.are.equal(16, q3.net.head_dim)
    q3:close()
  end)

  it("keeps the biases apart with fuse = false and gives the same logits", function()
    local a = logits(h.arch .. "/qwen2", { fuse = false })
    local d = h.max_abs_diff(a, h.reference("logits_qwen2", transformers))
    assert.is_true(d < 1e-4, string.format("max |diff| %.3g", d))
  end)

  it("refuses a context longer than Mistral's sliding window and defaults to the window", function()
    local m, err = moonshard.load(h.arch .. "/mistral-window", { max_seq = 128 })
    assert.is_nil(m)
    assert.truthy(err:find("sliding attention window of 64 positions", 1, true), err)
    assert.truthy(err:find("--max-seq 64", 1, true), err)
    m = assert(moonshard.load(h.arch .. "/mistral-window"))
    assert.are.equal(64, m.net.max_seq)
    local got = assert(m:forward(h.reference("ids", transformers), 0, { all_logits = true })):values()
    local d = h.max_abs_diff(got, h.reference("logits_mistral-window", numpy))
    assert.is_true(d < 1e-4, string.format("max |diff| %.3g", d))
    m:close()
    local out, gerr, code = h.run { "generate", "--model", h.arch .. "/mistral-window", "--max-seq", "100",
      "--max-tokens", "2" }
    assert.are_not.equal(0, code)
    assert.truthy(gerr:find("sliding attention window", 1, true), gerr .. out)
  end)

  it("names the architectures it supports for an unknown one", function()
    local dir = os.tmpname()
    os.remove(dir)
    assert(h.sh(string.format("mkdir -p %s && cp %s/qwen3/* %s/ && sed -i 's/\"qwen3\"/\"gemma\"/; s/Qwen3ForCausalLM/GemmaForCausalLM/' %s/config.json",
      h.q(dir), h.q(h.arch), h.q(dir), h.q(dir))))
    local m, err = moonshard.load(dir)
    h.sh("rm -rf " .. h.q(dir))
    assert.is_nil(m)
    assert.truthy(err:find("model_type 'gemma' is not supported (supported: llama, mistral, qwen2, qwen3)", 1, true), err)
  end)
end)

describe("architectures on CPU ranks", function()
  local cases = {
    { "qwen2", 2, 1 }, { "qwen2", 1, 2 }, { "qwen2", 2, 2 }, { "qwen2-untied", 2, 1 },
    { "qwen3", 2, 1 }, { "qwen3", 1, 2 }, { "qwen3", 2, 2 },
    { "mistral", 2, 1 }, { "mistral", 1, 2 }, { "mistral", 2, 2 },
  }
  for _, case in ipairs(cases) do
    local name, tp, pp = case[1], case[2], case[3]
    it(string.format("%s, tp %d x pp %d: logits within 1e-4 of transformers", name, tp, pp), function()
      local diff = h.parallel_diff("arch/" .. name, tp, pp)
      assert.is_true(diff < 1e-4, "max |diff| " .. tostring(diff))
    end)
  end
end)
