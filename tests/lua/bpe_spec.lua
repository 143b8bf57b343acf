-- Tokenizers of real models through the Lua interface: byte-level BPE (moonshard.bpe) built as
-- the GGUF and tokenizer.json paths build it, against the Hugging Face `tokenizers` ids in
-- tests/fixtures/bpe (tools/make_bpe_fixtures.py); SentencePiece vocabularies from GGUF metadata
-- against llama.cpp's ids (tools/make_tokenizer_fixtures.py).
local h = require "helpers"
local bpe = require "moonshard.bpe"
local moonshard = require "moonshard"
local cjson = require "cjson"

local FIX = h.root .. "/tests/fixtures/bpe"

-- A little-endian reader over a string.
local function reader(s)
  local at = 1
  local r = {}
  function r.u32()
    local a, b, c, d = s:byte(at, at + 3)
    at = at + 4
    return a + b * 256 + c * 65536 + d * 16777216
  end
  function r.u16()
    local a, b = s:byte(at, at + 1)
    at = at + 2
    return a + b * 256
  end
  function r.bytes(n)
    local v = s:sub(at, at + n - 1)
    at = at + n
    return v
  end
  function r.skip(n) at = at + n end
  return r
end

-- SmolLM2's vocabulary (tokens in byte-level form, kinds, merges) from the fixture.
local function smollm2_vocab()
  local r = reader(h.read(FIX .. "/smollm2_vocab.bin"))
  assert(r.bytes(8) == "MSHBPEV1")
  local n, n_merges, derived = r.u32(), r.u32(), r.u32()
  local kinds, tokens, merges = {}, {}, {}
  for i = 1, n do kinds[i] = r.bytes(1):byte() end
  for i = 1, derived do tokens[i] = r.bytes(r.u16()) end
  for m = 1, n_merges do
    local a, b = tokens[r.u16() + 1], tokens[r.u16() + 1]
    merges[m] = a .. " " .. b
    tokens[derived + m] = a .. b
  end
  return { tokens = tokens, kinds = kinds, merges = merges }
end

-- The hand-made and random cases of one pre-tokenizer configuration of the expectations fixture.
local function smollm2_cases(config)
  local r = reader(h.read(FIX .. "/smollm2_expect.bin"))
  assert(r.bytes(8) == "MSHBPEX1")
  local function ids()
    local t = {}
    for i = 1, r.u32() do t[i] = r.u16() end
    return t
  end
  for _ = 1, r.u32() do
    local name = r.bytes(r.u32())
    r.u32() -- flags
    for _ = 1, r.u32() do r.skip(r.u32()) end
    local cases = {}
    for i = 1, r.u32() do
      local c = { text = r.bytes(r.u32()) }
      c.special, c.plain = ids(), ids()
      r.skip(4 * r.u32())
      cases[i] = c
    end
    if name == config then return cases end
    r.skip(16 * r.u32() + 16)
  end
  error("no configuration " .. config)
end

-- true when s is a sequence of whole UTF-8 characters
local function whole_utf8(s)
  local i = 1
  while i <= #s do
    local b = s:byte(i)
    local n = b < 0x80 and 1 or b >= 0xF0 and 4 or b >= 0xE0 and 3 or b >= 0xC0 and 2 or 0
    if n == 0 or i + n - 1 > #s then return false end
    i = i + n
  end
  return true
end

describe("byte-level BPE (SmolLM2 vocabulary)", function()
  local v = smollm2_vocab()
  local cases = smollm2_cases("smollm2")

  -- the GGUF path: tokenizer.ggml.* through a stand-in for the GGUF handle
  local function fake_gguf(meta)
    return {
      path = "fake.gguf",
      get = function(_, k)
        local x = meta[k]
        if type(x) == "table" then return { n = #x } end
        return x
      end,
      strings = function(_, k) return meta[k] end,
      numbers = function(_, k) return meta[k] end,
    }
  end
  local types = {}
  for i, k in ipairs(v.kinds) do types[i] = k == 1 and 3 or 1 end
  local meta = {
    ["tokenizer.ggml.model"] = "gpt2", ["tokenizer.ggml.pre"] = "smollm",
    ["tokenizer.ggml.tokens"] = v.tokens, ["tokenizer.ggml.merges"] = v.merges,
    ["tokenizer.ggml.token_type"] = types, ["tokenizer.ggml.bos_token_id"] = 1,
    ["tokenizer.ggml.eos_token_id"] = 2, ["tokenizer.ggml.add_bos_token"] = false,
  }
  local tok = assert(bpe.from_gguf(fake_gguf(meta)))

  it("gives Hugging Face's ids on every fixture case, with and without special tokens", function()
    assert.are.equal(49152, tok.vocab_size)
    assert.are.equal(2, tok.eos)
    assert.is_false(tok.add_bos)
    assert.is_true(#cases > 200)
    for _, c in ipairs(cases) do
      assert.are.same(c.special, tok:encode(c.text, false, true), c.text)
      assert.are.same(c.plain, tok:encode(c.text, false, false), c.text)
    end
  end)

  it("decodes back to the text and streams whole UTF-8 characters", function()
    for _, c in ipairs(cases) do
      if not c.text:find("[\4\20]") and not c.text:find("\241\128\128\128") then -- bytes without tokens
        assert.are.equal(c.text, tok:decode(c.special))
      end
    end
    local text = "日本語 🙂👍🏽 ok"
    local ids = tok:encode(text)
    local dec = tok:decoder(nil)
    local parts = {}
    for _, id in ipairs(ids) do
      local s = dec:push(id)
      assert.is_true(whole_utf8(s), string.format("piece %q", s))
      parts[#parts + 1] = s
    end
    parts[#parts + 1] = dec:flush()
    assert.are.equal(text, table.concat(parts))
  end)

  it("finds special tokens and adds BOS only when asked", function()
    assert.are.equal(2, tok:find("<|im_end|>"))
    assert.are.equal(1, tok:find("<|im_start|>"))
    assert.is_nil(tok:find("<|nope|>"))
    assert.are.equal(bpe.SPECIAL, tok:kind(0))
    assert.are.same({ 1, 19556 }, tok:encode("Hello", true))
  end)

  it("gives Hugging Face's ids under the GPT-2, Llama-3 and Qwen2 pre-tokenizers too", function()
    for config, pre in pairs { gpt2 = "gpt-2", llama3 = "llama-bpe", qwen2 = "qwen2" } do
      local t = assert(bpe.from_gguf(fake_gguf(setmetatable({ ["tokenizer.ggml.pre"] = pre }, { __index = meta }))))
      for _, c in ipairs(smollm2_cases(config)) do
        assert.are.same(c.special, t:encode(c.text, false, true), pre .. ": " .. c.text)
      end
    end
  end)

  it("names an unknown GGUF pre-tokenizer and lists the known ones", function()
    local m2 = setmetatable({ ["tokenizer.ggml.pre"] = "falcon" }, { __index = meta })
    local t, err = bpe.from_gguf(fake_gguf(m2))
    assert.is_nil(t)
    assert.truthy(err:find("fake.gguf", 1, true) and err:find("'falcon'", 1, true), err)
    assert.truthy(err:find("smollm", 1, true) and err:find("llama-bpe", 1, true) and err:find("qwen2", 1, true), err)
  end)

  -- a tokenizer.json as SmolLM2's is written
  local function tokenizer_json()
    local vocab, added = {}, {}
    for i, t in ipairs(v.tokens) do
      if v.kinds[i] == 1 then added[#added + 1] = { id = i - 1, content = t, special = true }
      else vocab[t] = i - 1 end
    end
    return {
      version = "1.0", added_tokens = added, normalizer = cjson.null,
      pre_tokenizer = { type = "Sequence", pretokenizers = {
        { type = "Digits", individual_digits = true },
        { type = "ByteLevel", add_prefix_space = false, trim_offsets = true, use_regex = true },
      } },
      model = { type = "BPE", vocab = vocab, merges = v.merges, ignore_merges = false },
    }
  end

  it("builds the same tokenizer from tokenizer.json", function()
    local tj = tokenizer_json()
    local t2 = assert(bpe.from_json(tj, { bos = "<|im_start|>", eos = "<|im_end|>" }))
    assert.are.equal(1, t2.bos)
    assert.are.equal(2, t2.eos)
    for i = 1, #cases, 7 do
      assert.are.same(cases[i].special, t2:encode(cases[i].text, false, true), cases[i].text)
    end
    -- merges as pairs (the newer tokenizer.json spelling)
    local pairs_ = {}
    for i, m in ipairs(tj.model.merges) do pairs_[i] = { m:match("^(.-) (.*)$") } end
    tj.model.merges = pairs_
    local t3 = assert(bpe.from_json(tj))
    assert.are.same(cases[5].special, t3:encode(cases[5].text, false, true))
  end)

  it("reads Llama-3 style tokenizer.json pre-tokenizers (Split regex, then ByteLevel without regex)", function()
    local tj = tokenizer_json()
    tj.pre_tokenizer = { type = "Sequence", pretokenizers = {
      { type = "Split", pattern = { Regex = bpe.regex.llama3 }, behavior = "Isolated", invert = false },
      { type = "ByteLevel", add_prefix_space = false, trim_offsets = true, use_regex = false },
    } }
    tj.model.ignore_merges = true
    tj.post_processor = { type = "Sequence", processors = {
      { type = "ByteLevel" },
      { type = "TemplateProcessing", single = { { SpecialToken = { id = "<|im_start|>", type_id = 0 } },
        { Sequence = { id = "A", type_id = 0 } } } },
    } }
    local t = assert(bpe.from_json(tj, { bos = "<|im_start|>" }))
    assert.is_true(t.add_bos) -- the post-processor puts BOS in front
    for _, c in ipairs(smollm2_cases("llama3")) do
      assert.are.same(c.special, t:encode(c.text, false, true), c.text)
    end
  end)

  it("rejects tokenizer.json files it cannot reproduce, naming the problem", function()
    local function err_of(mutate)
      local tj = tokenizer_json()
      mutate(tj)
      local t, err = bpe.from_json(tj, { name = "'x/tokenizer.json'" })
      assert.is_nil(t)
      assert.truthy(err:find("'x/tokenizer.json'", 1, true), err)
      return err
    end
    assert.truthy(err_of(function(tj) tj.model.type = "Unigram" end):find("model type 'Unigram' is not supported", 1, true))
    assert.truthy(err_of(function(tj) tj.model.type = "WordPiece" end):find("'WordPiece'", 1, true))
    assert.truthy(err_of(function(tj) tj.pre_tokenizer = { type = "Metaspace", replacement = "_" } end)
      :find("'Metaspace' is not supported", 1, true))
    assert.truthy(err_of(function(tj) tj.normalizer = { type = "Lowercase" } end):find("normalizer 'Lowercase'", 1, true))
    assert.truthy(err_of(function(tj) tj.model.merges[7] = "nonexistent tokens" end):find("merge", 1, true))
  end)
end)

describe("tokenizer.json in a Hugging Face directory", function()
  local tmp
  before_each(function()
    tmp = h.tmpdir()
    h.copy_dir(h.hf .. "/f32", tmp .. "/m")
  end)
  after_each(function() h.rmdir(tmp) end)

  it("of an unknown model type: a clear error and exit code 1", function()
    h.write(tmp .. "/m/tokenizer.json", cjson.encode { model = { type = "Unigram", vocab = { { "a", 0 } } } })
    local out, err, code = h.run { "generate", "--model", tmp .. "/m", "--max-tokens", "2" }
    assert.are.equal(1, code, err)
    assert.are.equal("", out)
    assert.truthy(err:find(tmp .. "/m/tokenizer.json", 1, true), err)
    assert.truthy(err:find("model type 'Unigram' is not supported (supported: BPE)", 1, true), err)
  end)

  it("that is not JSON", function()
    h.write(tmp .. "/m/tokenizer.json", "{ nope")
    local _, err, code = h.run { "generate", "--model", tmp .. "/m", "--max-tokens", "2" }
    assert.are.equal(1, code, err)
    assert.truthy(err:find("not valid JSON", 1, true), err)
  end)

  it("with its chat template from tokenizer_config.json", function()
    local vocab = {}
    for i = 0, 255 do vocab[string.format("<%d>", i)] = i end
    h.write(tmp .. "/m/tokenizer.json", cjson.encode {
      model = { type = "BPE", vocab = { a = 0, b = 1, ab = 2 }, merges = { "a b" } },
      pre_tokenizer = { type = "ByteLevel", add_prefix_space = false, use_regex = true },
      added_tokens = { { id = 3, content = "<|end|>", special = true } },
    })
    h.write(tmp .. "/m/tokenizer_config.json", cjson.encode {
      eos_token = { content = "<|end|>" }, chat_template = "{% for m in messages %}<|im_start|>{% endfor %}",
    })
    local m = assert(moonshard.load(tmp .. "/m"))
    assert.are.same({ 2, 0 }, m.tokenizer:encode("aba"))
    assert.are.same({ 2, 3 }, m.tokenizer:encode("ab<|end|>", false, true))
    assert.are.equal(3, m.tokenizer.eos)
    assert.truthy(m.desc.chat_template:find("<|im_start|>", 1, true))
  end)
end)

describe("SentencePiece vocabulary from GGUF metadata (tiny random Llama)", function()
  local ref = cjson.decode(h.read(h.root .. "/tests/fixtures/gguf/tiny_random_tokens.json"))
  local m = assert(moonshard.load(h.data .. "/models/tiny-random-gguf/tiny-random-llama.gguf", { max_seq = 8 }))
  local tok = m.tokenizer

  it("gives llama.cpp's ids, with and without special tokens", function()
    assert.are.equal(32000, tok.vocab_size)
    assert.is_true(tok.add_bos)
    for _, c in ipairs(ref.cases) do
      assert.are.same(c.ids, tok:encode(c.text, false), c.text)
      assert.are.same(c.ids_special, tok:encode(c.text, false, true), c.text)
    end
    assert.are.same({ 1, 15043, 3186 }, tok:encode("Hello world", true))
  end)

  it("decodes back to the text", function()
    for _, c in ipairs(ref.cases) do
      assert.are.equal(c.text, tok:decode(c.ids))
    end
    assert.are.equal(2, tok:find("</s>"))
  end)
end)
