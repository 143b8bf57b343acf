-- Group-wise quantized weights (i8g64, i4g64 ...) from Lua: where stage.target_dtype puts them,
-- models run with them on the CPU against their f32 selves, the flags, and SmolLM2's perplexity.
local h = require "helpers"
local moonshard = require "moonshard"
local stage = require "moonshard.stage"
local tensor = require "moonshard.tensor"

local SMOL = (os.getenv("MOONSHARD_CACHE") or (h.root .. "/.cache")) .. "/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
local function exists(p)
  local f = io.open(p, "rb")
  if f then f:close() end
  return f ~= nil
end

-- logits of every position of ids, as a Lua array (rows concatenated)
local function all_logits(path, dtype, ids)
  local m = assert(moonshard.load(path, { dtype = dtype }))
  local l = assert(m:forward(ids, 0, { all_logits = true }))
  local v = l:values()
  l:free()
  m:close()
  return v
end

-- norm-wise relative error of b against a, and the share of rows (of V) whose argmax agrees
local function compare(a, b, V)
  local se, ss, agree, rows = 0, 0, 0, #a / V
  for r = 0, rows - 1 do
    local ia, ib = 1, 1
    for v = 1, V do
      local x, y = a[r * V + v], b[r * V + v]
      se, ss = se + (x - y) ^ 2, ss + x * x
      if x > a[r * V + ia] then ia = v end
      if y > b[r * V + ib] then ib = v end
    end
    if ia == ib then agree = agree + 1 end
  end
  return math.sqrt(se / ss), agree / rows
end

describe("stage.target_dtype with group-wise dtypes", function()
  local m128, m172 = tensor.new({ 4, 128 }, "f32"), tensor.new({ 4, 172 }, "f32")
  local v, q = tensor.new({ 128 }, "f32"), tensor.new({ 4, 64 }, "q4_1")

  it("quantizes matrices whose rows are whole groups, leaves the rest float", function()
    assert.are.equal("i4g64", stage.target_dtype(m128, 0, "i4g64", "f32"))
    assert.are.equal("i8g128", stage.target_dtype(m128, 0, "i8g128", "f32"))
    assert.are.equal("f32", stage.target_dtype(m172, 0, "i8g64", "f32")) -- 172 is no multiple of 64
    assert.are.equal("f32", stage.target_dtype(v, 0, "i8g64", "f32"))
    assert.are.equal("i4g64", stage.target_dtype(q, 0, "i4g64", "f32")) -- Q4_1 requantized through f32
    assert.are.equal("i8g64", stage.target_dtype(m128, 1, "i8g64", "f32")) -- a GPU takes them too
  end)

  it("keeps GGUF blocks on a GPU under native, bf16 otherwise", function()
    assert.are.equal("q4_1", stage.target_dtype(q, 1, "native", "f32"))
    assert.are.equal("bf16", stage.target_dtype(q, 1, nil, "f32"))
    assert.are.equal("bf16", stage.target_dtype(q, 1, "bf16", "f32"))
    assert.are.equal("q4_1", stage.target_dtype(q, 0, nil, "f32"))
  end)

  it("keeps the embedding and head of an int4 model in int8", function()
    assert.are.equal("i8g64", stage.edge_dtype("i4g64"))
    assert.are.equal("i8g128", stage.edge_dtype("i4g128"))
    assert.are.equal("i8g64", stage.edge_dtype("i8g64"))
    assert.are.equal("bf16", stage.edge_dtype("bf16"))
    assert.is_nil(stage.edge_dtype(nil))
    local w = { embed = tensor.new({ 8, 64 }, "f32"), norm = tensor.new({ 64 }, "f32"), layers = {
      { wq = tensor.new({ 64, 64 }, "f32") } } }
    w.output = w.embed
    local s = stage.resident(w, "cpu", { dtype = "i4g64", fuse = false })
    assert.are.equal("i8g64", s:embed():dtype())
    assert.are.equal("i4g64", s:acquire(1).wq:dtype())
    assert.are.equal("f32", s:norm():dtype())
  end)

  it("converts between block dtypes through f32 in t:to", function()
    local f = tensor.new({ 2, 64 }, "f32")
    f:randn(7, 0, 1)
    local a = f:to("q4_1"):to("i8g64")
    local b = f:to("q4_1"):to("f32"):to("i8g64")
    assert.are.same(b:values(), a:values())
    local t, err = tensor.new({ 2, 96 }, "i4g64") -- 96: not whole groups
    assert.is_nil(t)
    assert.truthy(tostring(err):find("multiple of 64", 1, true), err)
  end)
end)

describe("models with group-wise weights on the CPU", function()
  -- hf-tiny f32 (hidden 64, 3 layers, vocab 256, random weights of std 0.02): q/k/v/o, gate/up
  -- and the embedding/head are quantized; down (K 172) stays f32. Norm-wise relative error of
  -- the 40 x 256 logits, measured: i8g64 1.7% (GGUF q8_0 2.0%), i4g64 21.2% (27.9% on the
  -- min/max grid before the scale search), i4g32 21.9% (q4_1 24.7%). int8 rounds each weight by at most amax / 254 of its group; int4 by (max - min) / 30,
  -- about 9% rms of a Gaussian weight over 64 values, compounded through 3 layers and a model
  -- with tiny logits. Bounds: i8g64 3% with the argmax kept on >= 95% of positions; i4g64 45%
  -- (a wrong layout or kernel gives ~100%).
  local ids = {}
  for i = 1, 40 do ids[i] = (i * 37) % 256 end
  local ref = all_logits(h.hf .. "/f32", "f32", ids)

  it("i8g64 logits stay within 3% of f32's", function()
    local rel, agree = compare(ref, all_logits(h.hf .. "/f32", "i8g64", ids), 256)
    assert.is_true(rel < 0.03, "relative error " .. rel)
    assert.is_true(agree >= 0.95, "argmax agreement " .. agree)
  end)

  it("i4g64 logits stay within 45% of f32's; i4g32 at least as close as GGUF q4_1", function()
    local rel = compare(ref, all_logits(h.hf .. "/f32", "i4g64", ids), 256)
    assert.is_true(rel < 0.45, "relative error " .. rel)
    -- i4g32 has q4_1's layout and rounding, and keeps the embedding/head in int8 (q4_1 does not)
    local r32, rq = compare(ref, all_logits(h.hf .. "/f32", "i4g32", ids), 256), compare(ref, all_logits(h.hf .. "/f32", "q4_1", ids), 256)
    assert.is_true(r32 <= rq * 1.02, ("i4g32 %.4f, q4_1 %.4f"):format(r32, rq))
  end)

  it("stories260K with --quant-bits 8 prints the golden text's first 56 tokens", function()
    -- measured: i8g64 greedy follows the f32 golden text through "... but it was too high" (56
    -- tokens after the 4 of the prompt), then picks another continuation (the 260K-parameter
    -- model's margins are small; its w2 (K 172) stays f32)
    local out, err, code = h.run({ "generate", "--model", h.stories, "--quant-bits", "8", "--temperature", "0",
      "--max-tokens", "60" })
    assert.are.equal(0, code, err)
    local golden = h.read(h.stories .. "/expected_greedy_200.txt")
    local n = 0
    while n < #out and out:byte(n + 1) == golden:byte(n + 1) do n = n + 1 end
    local want = golden:find("too high", 1, true) + #"too high" - 1
    assert.is_true(n >= want, ("common prefix %d characters, want %d: %s"):format(n, want, out:sub(1, 300)))
  end)

  it("refuses --quant-bits outside 4 and 8, and with --dtype", function()
    local _, err, code = h.run({ "generate", "--model", h.stories, "--quant-bits", "3" })
    assert.are_not.equal(0, code)
    assert.truthy(err:find("quant-bits", 1, true), err)
    _, err, code = h.run({ "generate", "--model", h.stories, "--quant-bits", "4", "--dtype", "f32" })
    assert.are_not.equal(0, code)
    assert.truthy(err:find("not both", 1, true), err)
  end)
end)

describe("SmolLM2-135M perplexity with int8 weights", function()
  if not exists(SMOL) then
    pending("SmolLM2-135M-Instruct not fetched (./run.sh test fetches it)")
    return
  end
  it("is within 0.5% of f32's on a slice of wikitext-2", function()
    local ppl = dofile(h.root .. "/tools/perplexity.lua")
    local f = assert(io.open(h.data .. "/eval/wikitext2_raw_test.txt", "rb"))
    local text = f:read(6000)
    f:close()
    local res = {}
    for _, dt in ipairs({ "f32", "i8g64" }) do
      local m = assert(moonshard.load(SMOL, { dtype = dt, max_seq = 256, chunk = 256 }))
      local ids = m.tokenizer:encode(text, false)
      local cut = {}
      for i = 1, math.min(#ids, 768) do cut[i] = ids[i] end
      res[dt] = ppl.perplexity(m, cut, { ctx = 256, stride = 128 })
      m:close()
    end
    local rel = math.abs(res.i8g64 / res.f32 - 1)
    assert.is_true(rel < 0.005, ("f32 %.4f, i8g64 %.4f (%.3f%%)"):format(res.f32, res.i8g64, 100 * rel))
  end)
end)
