-- moonshard.loaders.gguf: GGUF files (v2, v3) of the architectures in the registry
-- (moonshard.models: llama (Llama 1/2/3, Mistral, SmolLM2, TinyLlama ...), qwen2, qwen3). The C
-- reader (msh_gguf_*) parses and checks the file; this module maps the ARCH.* metadata keys to
-- the description every loader produces and finds each declared weight under its GGUF name
-- (blk.N.*), checking its shape.
--
-- Every tensor is a zero-copy view of the mapped file, Q8_0/Q4_0/Q4_1 included (dtypes q8_0,
-- q4_0, q4_1: matmul and embedding take them on the CPU; the stage converts them where a dtype is
-- asked for, and to bf16 on a GPU). llama.cpp's converter permutes the Hugging Face Q and K projections so that RoPE
-- rotates adjacent pairs: GGUF llama weights use the interleaved convention (Qwen's keep
-- Hugging Face's rows: the declaration's gguf_rope says which).
--
--   local gguf = require "moonshard.loaders.gguf"
--   local g = assert(gguf.open("model.gguf"))
--   g:get("llama.block_count")          --> 30 (numbers, strings, booleans; nil when absent)
--   local desc = assert(gguf.load("model.gguf"))
local core = require "moonshard.core"

local ffi, C = core.ffi, core.C

local M = {}

local G = {}
G.__index = G

local T = {
  U8 = C.MSH_GGUF_U8, I8 = C.MSH_GGUF_I8, U16 = C.MSH_GGUF_U16, I16 = C.MSH_GGUF_I16,
  U32 = C.MSH_GGUF_U32, I32 = C.MSH_GGUF_I32, F32 = C.MSH_GGUF_F32, BOOL = C.MSH_GGUF_BOOL,
  STRING = C.MSH_GGUF_STRING, ARRAY = C.MSH_GGUF_ARRAY, U64 = C.MSH_GGUF_U64, I64 = C.MSH_GGUF_I64,
  F64 = C.MSH_GGUF_F64,
}
M.types = T

-- out-params, allocated once
local idx = ffi.new("int[1]")
local i64 = ffi.new("int64_t[1]")
local f64 = ffi.new("double[1]")
local sptr, slen = ffi.new("const char*[1]"), ffi.new("size_t[1]")
local etype, alen = ffi.new("int[1]"), ffi.new("uint64_t[1]")

-- M.open(path) -> gguf handle | nil, message
function M.open(path)
  local out = ffi.new("msh_gguf*[1]")
  local ok, msg = core.try(C.msh_gguf_open(out, path))
  if not ok then return nil, msg end
  return setmetatable({ h = ffi.gc(out[0], C.msh_gguf_free), path = path }, G)
end

function G:version() return tonumber(C.msh_gguf_version(self.h)) end

-- Index of key `name`, or nil.
function G:key(name)
  if C.msh_gguf_find_key(self.h, name, idx) ~= 0 then return nil end
  return idx[0]
end

local function scalar(h, i, t)
  if t == T.STRING then
    core.check(C.msh_gguf_get_string(h, i, sptr, slen), 3)
    return ffi.string(sptr[0], slen[0])
  elseif t == T.F32 or t == T.F64 then
    core.check(C.msh_gguf_get_float(h, i, f64), 3)
    return f64[0]
  elseif t == T.BOOL then
    core.check(C.msh_gguf_get_int(h, i, i64), 3)
    return i64[0] ~= 0
  end
  core.check(C.msh_gguf_get_int(h, i, i64), 3)
  return tonumber(i64[0])
end

-- g:get(name) -> the value of a scalar key (number, string or boolean); for an array key, a
-- table { type = element type, n = length }; nil when absent.
function G:get(name)
  local i = self:key(name)
  if not i then return nil end
  local t = C.msh_gguf_key_type(self.h, i)
  if t == T.ARRAY then
    core.check(C.msh_gguf_get_array(self.h, i, etype, alen), 2)
    return { type = etype[0], n = tonumber(alen[0]) }
  end
  return scalar(self.h, i, t)
end

-- g:type(name) -> msh_gguf_type of the key, or nil when absent.
function G:type(name)
  local i = self:key(name)
  return i and C.msh_gguf_key_type(self.h, i) or nil
end

-- g:strings(name) -> Lua array of the strings of an array key, or nil, message.
function G:strings(name)
  local i = self:key(name)
  if not i then return nil, string.format("'%s': no key '%s'", self.path, name) end
  if C.msh_gguf_key_type(self.h, i) ~= T.ARRAY or C.msh_gguf_get_array(self.h, i, etype, alen) ~= 0
    or etype[0] ~= T.STRING then
    return nil, string.format("'%s': key '%s' is not an array of strings", self.path, name)
  end
  local out = {}
  for j = 0, tonumber(alen[0]) - 1 do
    core.check(C.msh_gguf_array_string(self.h, i, j, sptr, slen), 2)
    out[j + 1] = ffi.string(sptr[0], slen[0])
  end
  return out
end

-- g:numbers(name) -> Lua array of the numbers of a numeric array key, or nil, message.
function G:numbers(name)
  local i = self:key(name)
  if not i then return nil, string.format("'%s': no key '%s'", self.path, name) end
  if C.msh_gguf_key_type(self.h, i) ~= T.ARRAY or C.msh_gguf_get_array(self.h, i, etype, alen) ~= 0
    or etype[0] == T.STRING then
    return nil, string.format("'%s': key '%s' is not a numeric array", self.path, name)
  end
  local float = etype[0] == T.F32 or etype[0] == T.F64
  local out = {}
  for j = 0, tonumber(alen[0]) - 1 do
    if float then
      core.check(C.msh_gguf_array_float(self.h, i, j, f64), 2)
      out[j + 1] = f64[0]
    else
      core.check(C.msh_gguf_array_int(self.h, i, j, i64), 2)
      out[j + 1] = tonumber(i64[0])
    end
  end
  return out
end

-- g:keys() -> sorted Lua array of the metadata key names
function G:keys()
  local out = {}
  for i = 0, C.msh_gguf_key_count(self.h) - 1 do out[#out + 1] = ffi.string(C.msh_gguf_key_name(self.h, i)) end
  table.sort(out)
  return out
end

local shape_buf = ffi.new("int64_t[4]")
local gtype, ndim = ffi.new("int[1]"), ffi.new("int[1]")

-- g:tensor_info(name) -> { type = "Q4_1", ggml_type, shape = { rows, cols } } | nil
function G:tensor_info(name)
  if C.msh_gguf_find_tensor(self.h, name, idx) ~= 0 then return nil end
  core.check(C.msh_gguf_tensor_info(self.h, idx[0], gtype, ndim, shape_buf, nil, nil), 2)
  local shape = {}
  for d = 1, ndim[0] do shape[d] = tonumber(shape_buf[d - 1]) end
  return { index = idx[0], ggml_type = gtype[0], type = ffi.string(C.msh_gguf_ggml_type_name(gtype[0])), shape = shape }
end

-- g:tensor(name) -> tensor | nil, message (a read-only view of the file, in the file's dtype)
function G:tensor(name)
  local info = self:tensor_info(name)
  if not info then return nil, string.format("'%s': tensor '%s' is missing", self.path, name) end
  local out = ffi.new("msh_tensor*[1]")
  local ok, msg = core.try(C.msh_gguf_tensor(self.h, info.index, out))
  if not ok then return nil, msg end
  return ffi.gc(out[0], C.msh_tensor_free)
end

-- g:tensor_names() -> Lua array of the tensor names in file order
function G:tensor_names()
  local out = {}
  for i = 0, C.msh_gguf_tensor_count(self.h) - 1 do out[#out + 1] = ffi.string(C.msh_gguf_tensor_name(self.h, i)) end
  return out
end

M.GGUF = G

-- ------------------------------------------------------------------------------- description

-- The description's numbers from the metadata; raises a message naming the file and key. Sizes
-- are positive integers below 2^31, the other numbers positive and finite, and the shapes agree
-- (heads a multiple of KV heads, an integer head size, a rotary size even and at most it).
local MAX_SIZE = 2 ^ 31 - 1
-- A value from the file in a message: control bytes escaped (one line), cut after 80 bytes.
local function printable(v)
  local s = tostring(v):gsub("%c", function(c) return string.format("\\x%02x", c:byte()) end)
  if #s > 80 then s = s:sub(1, 80) .. "..." end
  return s
end
function M.parse_metadata(g)
  local path = g.path
  local arch = g:get("general.architecture")
  if type(arch) ~= "string" then
    error(string.format("'%s': no general.architecture key", path), 0)
  end
  local model, merr = require("moonshard.models").for_gguf(arch)
  if not model then error(string.format("'%s': %s", path, printable(merr)), 0) end
  local function key(k) return arch .. "." .. k end
  local function shown(v)
    if type(v) == "table" then return "an array" end
    if type(v) == "string" then return '"' .. printable(v) .. '"' end
    return tostring(v)
  end
  local function size(k, v)
    if type(v) ~= "number" or v < 1 or v > MAX_SIZE or v % 1 ~= 0 then
      error(string.format("'%s': metadata key '%s' must be a positive integer below 2^31 (got %s)", path, key(k),
        shown(v)), 0)
    end
    return v
  end
  local function need(k)
    local v = g:get(key(k))
    if v == nil then error(string.format("'%s': missing metadata key '%s'", path, key(k)), 0) end
    return size(k, v)
  end
  -- an optional size (kind "size"), positive finite number (kind "number") or string
  local function opt(k, default, kind)
    local v = g:get(key(k))
    if v == nil then return default end
    if kind == "size" then return size(k, v) end
    if kind == "string" then
      if type(v) ~= "string" then error(string.format("'%s': metadata key '%s' must be a string (got %s)", path,
        key(k), shown(v)), 0) end
      return v
    end
    if type(v) ~= "number" or not (v > 0 and v < math.huge) then
      error(string.format("'%s': metadata key '%s' must be a positive finite number (got %s)", path, key(k),
        shown(v)), 0)
    end
    return v
  end
  local dim, H = need("embedding_length"), need("attention.head_count")
  local d = {
    arch = model.arch.name, format = "gguf",
    dim = dim, n_layers = need("block_count"), n_heads = H,
    n_kv_heads = opt("attention.head_count_kv", H, "size"), hidden_dim = need("feed_forward_length"),
    max_seq = opt("context_length", 2048, "size"), norm_eps = opt("attention.layer_norm_rms_epsilon", 1e-5),
  }
  if H % d.n_kv_heads ~= 0 then
    error(string.format("'%s': %s (%d) must be a multiple of %s (%d)", path, key("attention.head_count"), H,
      key("attention.head_count_kv"), d.n_kv_heads), 0)
  end
  d.head_dim = opt("attention.key_length", nil, "size")
  if not d.head_dim then
    if dim % H ~= 0 then
      error(string.format("'%s': %s (%d) is not a multiple of %s (%d), and no %s gives the head size", path,
        key("embedding_length"), dim, key("attention.head_count"), H, key("attention.key_length")), 0)
    end
    d.head_dim = dim / H
  end
  if opt("attention.value_length", d.head_dim, "size") ~= d.head_dim then
    error(string.format("'%s': attention.key_length and attention.value_length differ (not supported)", path), 0)
  end
  local rope = { theta = opt("rope.freq_base", 10000), style = model.arch.gguf_rope }
  local rot = opt("rope.dimension_count", nil, "size")
  if rot and (rot % 2 ~= 0 or rot > d.head_dim) then
    error(string.format("'%s': %s (%d) must be even and at most the head size (%d)", path, key("rope.dimension_count"),
      rot, d.head_dim), 0)
  end
  if rot and rot ~= d.head_dim then rope.rotary_dim = rot end
  local st = opt("rope.scaling.type", nil, "string")
  if st and st ~= "none" then
    if st ~= "linear" then
      error(string.format("'%s': rope scaling '%s' is not supported (supported: linear)", path, printable(st)), 0)
    end
    local factor = opt("rope.scaling.factor", 1)
    if factor ~= 1 then rope.scaling = { type = "linear", factor = factor } end
  end
  d.rope = rope
  return d
end

-- M.load(path) -> desc | nil, message
--   desc also carries: gguf (the open handle, for the tokenizer), chat_template (string or nil)
function M.load(path)
  local g, err = M.open(path)
  if not g then return nil, err end
  local ok, d = pcall(M.parse_metadata, g)
  if not ok then return nil, d end
  local hd = d.head_dim
  local tokens = g:get("tokenizer.ggml.tokens")
  local embd_info = g:tensor_info("token_embd.weight")
  if not embd_info then return nil, string.format("'%s': tensor 'token_embd.weight' is missing", path) end
  local V = embd_info.shape[1]
  if type(tokens) == "table" and tokens.n ~= V then
    return nil, string.format("'%s': the vocabulary has %d tokens but token_embd.weight has %d rows",
      path, tokens.n, V)
  end
  local vkey = g:get("general.architecture") .. ".vocab_size"
  local mv = g:get(vkey)
  if type(mv) == "number" and mv ~= V then
    return nil, string.format("'%s': %s is %d but token_embd.weight has %d rows", path, vkey, mv, V)
  end
  d.vocab_size = V

  local function get(name, shape)
    local info = g:tensor_info(name)
    if not info then error(string.format("'%s': tensor '%s' is missing", path, name), 0) end
    local same = #info.shape == #shape
    for i = 1, #shape do same = same and info.shape[i] == shape[i] end
    if not same then
      error(string.format("'%s': tensor '%s' has shape (%s), expected (%s) from the metadata", path, name,
        table.concat(info.shape, ", "), table.concat(shape, ", ")), 0)
    end
    local t, terr = g:tensor(name)
    if not t then error(terr, 0) end
    return t
  end
  local ok2, w = pcall(function()
    local w = require("moonshard.models").collect(require("moonshard.models").get(d.arch).arch, d, "gguf", get,
      function(name) return g:tensor_info(name) ~= nil end)
    -- Llama-3.1 style rope scaling: per-frequency divisors in a tensor
    if g:tensor_info("rope_freqs.weight") then
      local rot = d.rope.rotary_dim or hd
      d.rope.freq_factors = get("rope_freqs.weight", { rot / 2 }):values()
    end
    return w
  end)
  if not ok2 then return nil, w end
  d.weights = w
  d.tie = w.output == w.embed
  d.path = path
  d.gguf = g
  local tmpl = g:get("tokenizer.chat_template")
  d.chat_template = type(tmpl) == "string" and tmpl or nil
  local bos, eos = g:get("tokenizer.ggml.bos_token_id"), g:get("tokenizer.ggml.eos_token_id")
  d.bos, d.eos = type(bos) == "number" and bos or 1, type(eos) == "number" and eos or 2
  d.stop = { d.eos }
  for _, k in ipairs { "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id" } do
    local v = g:get(k)
    if type(v) == "number" and v ~= d.eos and v >= 0 and v < V then d.stop[#d.stop + 1] = v end
  end
  return d
end

-- ------------------------------------------------------------------------------------ tokenizer

local TOKENIZERS = "gpt2 (byte-level BPE), llama (SentencePiece)"

-- M.tokenizer(g) -> tokenizer | nil, message: the vocabulary in the metadata (tokenizer.ggml.*).
--   "gpt2": byte-level BPE with the pre-tokenizer named by tokenizer.ggml.pre (moonshard.bpe);
--   "llama": SentencePiece pieces and scores (moonshard.tokenizer.from_pieces).
-- BOS goes in front of prompts only when tokenizer.ggml.add_bos_token says so (default: true
-- for "llama", false for "gpt2", as llama.cpp does).
function M.tokenizer(g)
  local model = g:get("tokenizer.ggml.model")
  if model == nil then return nil, string.format("'%s': no tokenizer in the metadata (tokenizer.ggml.model)", g.path) end
  if model == "gpt2" then return require("moonshard.bpe").from_gguf(g) end
  if model ~= "llama" then
    return nil, string.format("'%s': tokenizer model '%s' (tokenizer.ggml.model) is not supported (supported: %s)",
      g.path, printable(model), TOKENIZERS)
  end
  local pieces, err = g:strings("tokenizer.ggml.tokens")
  if not pieces then return nil, err end
  local scores = g:get("tokenizer.ggml.scores") and g:numbers("tokenizer.ggml.scores")
  if not scores then
    scores = {}
    for i = 1, #pieces do scores[i] = -(i - 1) end
  end
  local special = {}
  if g:get("tokenizer.ggml.token_type") then
    local types, terr = g:numbers("tokenizer.ggml.token_type")
    if not types then return nil, terr end
    for i = 1, #types do
      if types[i] >= 2 and types[i] <= 4 then special[#special + 1] = i - 1 end -- unknown, control, user-defined
    end
  end
  local add_bos = g:get("tokenizer.ggml.add_bos_token")
  local ids = {}
  for _, k in ipairs { "bos", "eos" } do
    local id = g:get("tokenizer.ggml." .. k .. "_token_id")
    if id ~= nil and (type(id) ~= "number" or id < 0 or id >= #pieces or id % 1 ~= 0) then
      return nil, string.format("'%s': tokenizer.ggml.%s_token_id (%s) is not in the vocabulary of %d tokens", g.path,
        k, printable(id), #pieces)
    end
    ids[k] = id
  end
  local tok, terr = require("moonshard.tokenizer").from_pieces(pieces, scores, {
    path = g.path, special = special, add_bos = add_bos ~= false, bos = ids.bos, eos = ids.eos,
  })
  if not tok then return nil, string.format("'%s': %s", g.path, terr) end
  return tok
end

return M
