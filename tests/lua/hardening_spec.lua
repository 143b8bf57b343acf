-- The front door (issue 17): no hangs, no tracebacks, every bad input a one-line error and a
-- non-zero exit. Each case here failed (hung, printed a traceback or exited 0) before the fix.
local h = require "helpers"
local cjson = require "cjson"

-- Runs moonshard with a short limit: a hang shows as exit 124.
local function run(args, stdin, limit)
  local saved = h.run_timeout
  h.run_timeout = limit or 60
  local out, err, code = h.run(args, stdin)
  h.run_timeout = saved
  return out, err, code
end

-- One line on stderr (a warning line may come before it), no traceback.
local function one_line_error(err)
  assert.falsy(err:find("stack traceback", 1, true), err)
  assert.falsy(err:find("%.lua:%d+: in "), err)
  local lines = 0
  for _ in err:gmatch("[^\n]+") do lines = lines + 1 end
  assert.is_true(lines >= 1 and lines <= 2, "expected one line, got: " .. err)
end

local function gen(extra, stdin)
  local a = { "generate", "--model", h.stories, "--max-tokens", "8", "--temperature", "0" }
  for _, x in ipairs(extra or {}) do a[#a + 1] = x end
  return run(a, stdin)
end

describe("the host after a script error", function()
  it("stops the loop and exits 1 although a handle is still open", function()
    local _, err, code = run({ "-e", "local t = require('luv').new_timer(); t:start(600000, 0, function() end); "
      .. "local s = require('luv').new_signal(); s:start('sigint', function() end); error('boom')" }, nil, 20)
    assert.are.equal(1, code, err)
    assert.truthy(err:find("boom", 1, true), err)
  end)

  it("chat --prompt hi --temperature nan ends at once with one line", function()
    local _, err, code = run({ "chat", "--model", h.stories, "--template", "chatml", "--prompt", "hi",
      "--temperature", "nan" }, nil, 20)
    assert.are.equal(2, code, err)
    one_line_error(err)
    assert.truthy(err:find("--temperature", 1, true), err)
  end)

  it("shows a traceback only with --debug", function()
    local _, err, code = run { "-e", "error('boom')" }
    assert.are.equal(1, code)
    one_line_error(err)
    local _, err2, code2 = run { "--debug", "-e", "error('boom')" }
    assert.are.equal(1, code2)
    assert.truthy(err2:find("stack traceback", 1, true), err2)
    local _, err3 = run { "generate", "--debug", "--model", h.stories, "--temperature", "0", "--max-tokens", "2",
      "--prompt", "x", "--dtype", "q4_0", "--device", "cpu" }
    assert.falsy(err3:find("unknown option", 1, true), err3)
  end)
end)

describe("argument errors", function()
  local cases = {
    { { "--temperature", "nan" }, "--temperature" },
    { { "--temperature", "inf" }, "--temperature" },
    { { "--top-p", "nan" }, "--top-p" },
    { { "--max-tokens", "0x10" }, "--max-tokens" },
    { { "--seed", "9007199254740993" }, "2^53" },
    { { "--pp-layers", "garbage" }, "--pp-layers" },
    { { "--pp-layers", "0-2,4-5" }, "--pp-layers" },
    { { "--pp-balance", "foo" }, "decode, prefill" },
    { { "--dtype", "f99" }, "native, f32, f16, bf16" },
    { { "--device", "gpu" }, "cuda:N" },
    { { "--bogus" }, "unknown option --bogus" },
  }
  for _, c in ipairs(cases) do
    it(table.concat(c[1], " ") .. " is one line naming it, with a hint to --help, exit 2", function()
      local out, err, code = gen(c[1])
      assert.are.equal(2, code, err)
      assert.are.equal("", out)
      one_line_error(err)
      assert.truthy(err:find(c[2], 1, true), err)
      assert.truthy(err:find("moonshard generate --help", 1, true), err)
      assert.falsy(err:find("usage:", 1, true), err)
    end)
  end

  it("the largest seed accepted is printed back and accepted again", function()
    local _, err, code = gen { "--seed", "9007199254740991", "--temperature", "0.8", "--max-tokens", "2" }
    assert.are.equal(0, code, err)
    assert.truthy(err:find("seed 9007199254740991", 1, true), err)
  end)

  it("launch: one line and a hint", function()
    local _, err, code = run { "launch", "-n", "2", "--bogus", "x.lua" }
    assert.are.equal(2, code)
    one_line_error(err)
    assert.truthy(err:find("moonshard launch --help", 1, true), err)
  end)

  it("moonshard help generate prints generate's help", function()
    local out, _, code = run { "help", "generate" }
    assert.are.equal(0, code)
    assert.truthy(out:find("^usage: moonshard generate"), out)
    assert.truthy(out:find("--prompt-file", 1, true), out)
  end)
end)

describe("paths from the command line", function()
  local tmp
  before_each(function() tmp = h.tmpdir() end)
  after_each(function() h.rmdir(tmp) end)

  it("a FIFO as --model or --tokenizer is refused before anything opens it", function()
    assert.are.equal(0, os.execute("mkfifo " .. h.q(tmp .. "/fifo")))
    local _, err, code = run({ "generate", "--model", tmp .. "/fifo" }, nil, 20)
    assert.are.equal(2, code, err)
    assert.truthy(err:find("FIFO", 1, true), err)
    local _, err2, code2 = run({ "generate", "--model", h.stories, "--tokenizer", tmp .. "/fifo" }, nil, 20)
    assert.are.equal(2, code2, err2)
    assert.truthy(err2:find("FIFO", 1, true), err2)
  end)

  it("a symlink loop is named as one", function()
    assert.are.equal(0, os.execute(string.format("ln -s %s %s && ln -s %s %s", h.q(tmp .. "/a"), h.q(tmp .. "/b"),
      h.q(tmp .. "/b"), h.q(tmp .. "/a"))))
    local _, err, code = run { "generate", "--model", tmp .. "/a" }
    assert.are_not.equal(0, code)
    assert.truthy(err:find("symbolic links", 1, true), err)
    assert.falsy(err:find("does not exist", 1, true), err)
  end)
end)

describe("generate's prompt", function()
  local tmp
  before_each(function() tmp = h.tmpdir() end)
  after_each(function() h.rmdir(tmp) end)

  it("--prompt-file FILE and --prompt - (stdin) give what --prompt gives", function()
    local want, err, code = gen { "--prompt", "Lily saw a cat" }
    assert.are.equal(0, code, err)
    h.write(tmp .. "/p.txt", "Lily saw a cat")
    local got = gen { "--prompt-file", tmp .. "/p.txt" }
    assert.are.equal(want, got)
    local got2 = gen({ "--prompt", "-" }, "Lily saw a cat")
    assert.are.equal(want, got2)
    local got3 = gen({ "--prompt-file", "-" }, "Lily saw a cat")
    assert.are.equal(want, got3)
  end)

  it("a prompt longer than the shell's argument limit comes through a file", function()
    h.write(tmp .. "/long.txt", string.rep("Lily saw a cat. ", 20000)) -- 320 KB
    local _, err, code = gen { "--prompt-file", tmp .. "/long.txt" }
    assert.are.equal(1, code)
    assert.truthy(err:find("more than the context", 1, true), err)
  end)

  it("invalid UTF-8 is refused, naming the byte", function()
    h.write(tmp .. "/bad.txt", "Lily \255 saw")
    local out, err, code = gen { "--prompt-file", tmp .. "/bad.txt" }
    assert.are.equal(1, code, err)
    assert.are.equal("", out)
    assert.truthy(err:find("not valid UTF-8: byte 6", 1, true), err)
  end)

  it("a write error on stdout is a failure", function()
    local out, code = h.sh(h.q(h.exe) .. " generate --model " .. h.q(h.stories)
      .. " --max-tokens 8 --temperature 0 >/dev/full 2>" .. h.q(tmp .. "/err"))
    assert.are_not.equal(0, code, out)
    assert.truthy(h.read(tmp .. "/err"):find("stdout", 1, true))
    local _, code2 = h.sh(h.q(h.exe) .. " -e 'print(1)' >/dev/full 2>/dev/null")
    assert.are_not.equal(0, code2)
  end)

  it("--max-seq above the model's context is said, not clamped silently", function()
    local _, err, code = gen { "--max-seq", "100000", "--max-tokens", "2" }
    assert.are.equal(0, code, err)
    assert.truthy(err:find("--max-seq 100000 is more than the model's context; using 512", 1, true), err)
  end)
end)

describe("non-finite logits and tokenizers that do not fit", function()
  local tmp
  before_each(function() tmp = h.tmpdir() end)
  after_each(function() h.rmdir(tmp) end)

  it("NaN weights give an error naming the position, greedy or sampled", function()
    local dir = h.nan_stories(tmp)
    for _, temp in ipairs { "0", "0.8" } do
      local out, err, code = run { "generate", "--model", dir, "--prompt", "Lily", "--max-tokens", "8",
        "--temperature", temp, "--seed", "1" }
      assert.are.equal(1, code, err)
      assert.are.equal("", out)
      one_line_error(err)
      assert.truthy(err:find("logits at position %d+ are not finite"), err)
    end
  end)

  it("NaN weights end a served request with an error naming the position, greedy (picked where the logits are) or sampled", function()
    local moonshard = require "moonshard"
    local m = assert(moonshard.load(h.nan_stories(tmp), { batch = 2, kv_blocks = 16 }))
    local e = assert(require("moonshard.engine").new(m, {}))
    -- one at a time: a step of greedy rows alone takes the argmax path, a sampled row the sampler's
    for _, temp in ipairs { 0, 0.8 } do
      local req = assert(e:submit { prompt = "Lily", max_tokens = 4, temperature = temp, seed = 1 })
      while e:step() > 0 do end
      assert.are.equal("error", req.finish_reason)
      assert.truthy(tostring(req.error):find("logits at position 1 are not finite"), tostring(req.error))
      -- the argmax path knows the row is not finite, not which logit (the sampler's names it)
      assert.are.equal(temp > 0, tostring(req.error):find("token id", 1, true) ~= nil, tostring(req.error))
    end
    assert.are.equal(0, e:stats().kv_blocks_used)
    e:close()
    m:close()
  end)

  it("a tokenizer smaller than the model's vocabulary fails with a message, not a traceback", function()
    -- a byte-level BPE vocabulary of 100 printable characters for hf-tiny's 256-token model
    local b2u, n = {}, 0
    local keep = {}
    for b = 33, 126 do keep[b] = true end
    for b = 161, 172 do keep[b] = true end
    for b = 174, 255 do keep[b] = true end
    for b = 0, 255 do
      if keep[b] then b2u[b] = b else b2u[b] = 256 + n; n = n + 1 end
    end
    local function utf8(cp)
      if cp < 0x80 then return string.char(cp) end
      return string.char(0xC0 + math.floor(cp / 64), 0x80 + cp % 64)
    end
    local vocab = {}
    for i = 0, 99 do vocab[utf8(b2u[32 + i])] = i end
    h.write(tmp .. "/tokenizer.json", cjson.encode {
      version = "1.0", added_tokens = {},
      pre_tokenizer = { type = "ByteLevel", add_prefix_space = false, trim_offsets = true, use_regex = true },
      decoder = { type = "ByteLevel" },
      model = { type = "BPE", vocab = vocab, merges = {}, byte_fallback = false },
    })
    local _, err, code = run { "generate", "--model", h.hf .. "/f32", "--tokenizer", tmp .. "/tokenizer.json",
      "--prompt", "hello", "--max-tokens", "40", "--temperature", "0" }
    assert.are.equal(1, code, err)
    one_line_error(err)
    assert.truthy(err:find("the tokenizer is smaller than the model's vocabulary of 256", 1, true), err)
  end)

  it("a chat template that returns an empty string is named", function()
    h.write(tmp .. "/empty.lua", "return function() return '' end")
    local _, err, code = run { "chat", "--model", h.stories, "--template", tmp .. "/empty.lua", "--prompt", "hi",
      "--temperature", "0" }
    assert.are.equal(1, code, err)
    one_line_error(err)
    assert.truthy(err:find("returned an empty prompt", 1, true), err)
  end)
end)

describe("the REPL", function()
  it("writes errors to stderr, values to stdout, and a piped session with errors exits 1", function()
    local out, err, code = run({ "repl" }, "x = 2\nerror('oops')\nx * 21\n")
    assert.are.equal(1, code, err)
    assert.are.equal("42\n", out)
    assert.truthy(err:find("oops", 1, true), err)
    local out2, err2, code2 = run({ "repl" }, "1 + 1\n")
    assert.are.equal(0, code2, err2)
    assert.are.equal("2\n", out2)
  end)

  it("chat: a piped session whose message fails exits 1", function()
    local _, err, code = run({ "chat", "--model", h.stories, "--template", "chatml", "--temperature", "0",
      "--max-tokens", "2" }, "hi \255\n")
    assert.are.equal(1, code, err)
    assert.truthy(err:find("not valid UTF-8", 1, true), err)
  end)
end)

describe("config.json fields of the wrong type (checked by the loader through moonshard.validate)", function()
  -- These need loaders/hf.lua to read its fields with validate.field (the loader is being
  -- restructured; the calls are wired in there). Each: field, bad value, text of the message.
  local cases = {
    { "rms_norm_eps", "x", "field 'rms_norm_eps' must be a positive finite number" },
    { "num_key_value_heads", "abc", "field 'num_key_value_heads' must be" },
    { "rope_theta", "x", "field 'rope_theta' must be a positive finite number" },
    { "tie_word_embeddings", "yes", "field 'tie_word_embeddings' must be true or false" },
    { "eos_token_id", "two", "field 'eos_token_id' must be an integer or a list of integers" },
  }
  for _, c in ipairs(cases) do
    local name = string.format("loader: config.json %s = %q is refused naming the field", c[1], c[2])
    do
      it(name, function()
        local tmp = h.tmpdir()
        h.copy_dir(h.hf .. "/f32", tmp .. "/m")
        local cfg = cjson.decode(h.read(tmp .. "/m/config.json"))
        cfg[c[1]] = c[2]
        h.write(tmp .. "/m/config.json", cjson.encode(cfg))
        local _, err, code = run { "generate", "--model", tmp .. "/m", "--tokenizer", h.stories .. "/tok512.bin",
          "--max-tokens", "2" }
        h.rmdir(tmp)
        assert.are.equal(1, code, err)
        one_line_error(err)
        assert.truthy(err:find("config.json': " .. c[3], 1, true), err)
      end)
    end
  end
  it("loader: llama3 rope_scaling without its factors is refused naming the missing field", function()
    local tmp = h.tmpdir()
    h.copy_dir(h.hf .. "/llama3", tmp .. "/m")
    local cfg = cjson.decode(h.read(tmp .. "/m/config.json"))
    cfg.rope_scaling, cfg.rope_parameters = { rope_type = "llama3", factor = 8 }, nil
    h.write(tmp .. "/m/config.json", cjson.encode(cfg))
    local _, err, code = run { "generate", "--model", tmp .. "/m", "--tokenizer", h.stories .. "/tok512.bin",
      "--max-tokens", "2" }
    h.rmdir(tmp)
    assert.are.equal(1, code, err)
    one_line_error(err)
    assert.truthy(err:find("rope_scaling': missing field 'low_freq_factor'", 1, true), err)
  end)

  it("loader: a folder holding both Hugging Face and GGUF files is refused, naming both", function()
    local tmp = h.tmpdir()
    h.copy_dir(h.arch .. "/qwen3", tmp .. "/m")
    h.sh(string.format("cp %s %s", h.q(h.arch .. "/qwen3.gguf"), h.q(tmp .. "/m/")))
    local _, err, code = run { "generate", "--model", tmp .. "/m", "--max-tokens", "2" }
    h.rmdir(tmp)
    assert.are.equal(1, code, err)
    one_line_error(err)
    assert.truthy(err:find("holds both a Hugging Face checkpoint (config.json) and 'qwen3.gguf'", 1, true), err)
  end)
end)

describe("memory on the CPU", function()
  it("bench --dummy of a shape larger than the machine is refused at once, before anything is drawn", function()
    -- a 1T-parameter shape: terabytes in f32, more than any CPU this runs on, at any dtype
    local _, err, code = run({ "bench", "--dummy", h.root .. "/tools/bench/shapes/llama-1t.json", "--device", "cpu",
      "--prompt-len", "8", "--gen-len", "8" }, nil, 30)
    assert.are.equal(1, code, err)
    one_line_error(err)
    assert.truthy(err:find("of memory on the CPU, which has .* available", 1), err)
    assert.truthy(err:find("GiB of weights (f32)", 1, true), err)
  end)
end)

describe("GGUF metadata and tokenizer.json (cases tools/fuzz/lua_fuzz.lua found)", function()
  local gguf = require "moonshard.loaders.gguf"
  local bpe = require "moonshard.bpe"
  local function handle(meta)
    return { path = "m.gguf", get = function(_, k) return meta[k] end }
  end
  local base = { ["general.architecture"] = "llama", ["llama.embedding_length"] = 64, ["llama.block_count"] = 2,
    ["llama.attention.head_count"] = 4, ["llama.feed_forward_length"] = 128 }
  local function with(extra)
    local m = {}
    for k, v in pairs(base) do m[k] = v end
    for k, v in pairs(extra) do m[k] = v end
    return handle(m)
  end

  it("parse_metadata refuses sizes and numbers out of range, naming the key, in one line", function()
    assert.truthy(gguf.parse_metadata(handle(base)))
    for _, c in ipairs {
      { { ["llama.attention.head_count"] = 2 ^ 53 + 2 }, "'llama.attention.head_count' must be a positive integer" },
      { { ["llama.attention.head_count_kv"] = 3 }, "(4) must be a multiple of llama.attention.head_count_kv (3)" },
      { { ["llama.attention.head_count_kv"] = 0 }, "'llama.attention.head_count_kv' must be a positive integer" },
      { { ["llama.attention.layer_norm_rms_epsilon"] = 0 / 0 }, "must be a positive finite number (got nan" },
      { { ["llama.rope.freq_base"] = -1 }, "'llama.rope.freq_base' must be a positive finite number" },
      { { ["llama.embedding_length"] = 66 }, "is not a multiple of llama.attention.head_count (4)" },
      { { ["llama.rope.dimension_count"] = 17 }, "must be even and at most the head size (16)" },
      { { ["llama.rope.scaling.type"] = "line\nr" }, "rope scaling 'line\\x0ar' is not supported" },
    } do
      local ok, err = pcall(gguf.parse_metadata, with(c[1]))
      assert.is_false(ok)
      assert.truthy(err:find("^'m.gguf': "), err)
      assert.truthy(err:find(c[2], 1, true), err)
      assert.falsy(err:find("\n", 1, true), err)
    end
  end)

  it("bpe.from_json refuses non-integer added-token ids and BOS/EOS outside the vocabulary", function()
    local function tj(extra)
      local t = { model = { type = "BPE", vocab = { a = 0, b = 1 }, merges = {} },
        pre_tokenizer = { type = "ByteLevel", use_regex = true } }
      for k, v in pairs(extra) do t[k] = v end
      return t
    end
    assert.truthy(bpe.from_json(tj {}))
    local tok, err = bpe.from_json(tj { added_tokens = { { id = 0 / 0, content = "<s>" } } })
    assert.is_nil(tok)
    assert.truthy(err:find("malformed added_tokens entry", 1, true), err)
    tok, err = bpe.from_json(tj {}, { bos = 7 })
    assert.is_nil(tok)
    assert.truthy(err:find("the BOS token id 7 is not in the vocabulary of 2 tokens", 1, true), err)
    tok, err = bpe.from_json(tj { pre_tokenizer = { type = "Byte\nLevel" } })
    assert.is_nil(tok)
    assert.falsy(err:find("\n", 1, true), err)
  end)
end)
