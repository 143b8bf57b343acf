-- moonshard.loaders.hf: Hugging Face model directories: config.json and model.safetensors, or
-- shards listed in model.safetensors.index.json. Tensors are zero-copy views of the mapped
-- files; each is checked against the shape the config implies. The tokenizer comes from
-- tokenizer.json (byte-level BPE, moonshard.bpe) with tokenizer_config.json's special tokens and
-- chat template.
local core = require "moonshard.core"
local cjson = require "cjson.safe"

local ffi, C = core.ffi, core.C

local M = {}

local function read_file(path)
  local f, err = io.open(path, "rb")
  if not f then return nil, err end
  local s = f:read("*a")
  f:close()
  return s
end

local function read_json(path)
  local text, err = read_file(path)
  if not text then return nil, string.format("cannot read '%s': %s", path, err) end
  local v, jerr = cjson.decode(text)
  if v == nil then return nil, string.format("'%s' is not valid JSON: %s", path, jerr) end
  if type(v) ~= "table" then return nil, string.format("'%s': expected a JSON object", path) end
  return v
end

local function exists(path)
  local f = io.open(path, "rb")
  if f then f:close() end
  return f ~= nil
end

-- The internal description's numbers from config.json (v4 `rope_theta`/`rope_scaling` and v5
-- `rope_parameters` spellings both accepted). The architecture comes from the registry
-- (moonshard.models) by model_type or architectures.
function M.parse_config(cfg, path)
  local function need(k)
    local v = cfg[k]
    if v == nil or v == cjson.null then
      error(string.format("'%s': missing field '%s'", path, k), 0)
    end
    if type(v) ~= "number" or v <= 0 or v % 1 ~= 0 then
      error(string.format("'%s': field '%s' must be a positive integer (got %s)", path, k, tostring(v)), 0)
    end
    return v
  end
  local function opt(k, default)
    local v = cfg[k]
    if v == nil or v == cjson.null then return default end
    return v
  end
  local model, merr = require("moonshard.models").for_hf(cfg)
  if not model then error(string.format("'%s': %s", path, merr), 0) end
  local arch = model.arch
  -- biases other than those the architecture declares would be silently dropped: refuse them
  local bias_q = arch.by_name.bq ~= nil
  if (opt("attention_bias", false) == true and not bias_q) or opt("mlp_bias", false) == true then
    error(string.format("'%s': %s biases are not supported by the %s architecture", path,
      opt("mlp_bias", false) == true and "MLP" or "attention", arch.name), 0)
  end
  local act = opt("hidden_act", "silu")
  if act ~= "silu" then error(string.format("'%s': hidden_act '%s' is not supported (silu only)", path, tostring(act)), 0) end
  local dim, H = need("hidden_size"), need("num_attention_heads")
  local d = {
    arch = arch.name, format = "hf",
    dim = dim, n_layers = need("num_hidden_layers"), n_heads = H,
    n_kv_heads = opt("num_key_value_heads", H), hidden_dim = need("intermediate_size"),
    vocab_size = need("vocab_size"), max_seq = opt("max_position_embeddings", 2048),
    norm_eps = opt("rms_norm_eps", 1e-6), tie = opt("tie_word_embeddings", false),
    head_dim = opt("head_dim", dim / H),
    bos = opt("bos_token_id", 1), eos = opt("eos_token_id", 2),
  }
  -- sliding-window attention: Mistral's sliding_window; Qwen2's only with use_sliding_window
  local win = opt("sliding_window", nil)
  if type(win) == "number" and opt("use_sliding_window", true) ~= false then d.sliding_window = win end
  if type(d.eos) == "table" then d.stop = d.eos; d.eos = d.eos[1] else d.stop = { d.eos } end
  local rp = opt("rope_parameters", nil)
  local rs = opt("rope_scaling", nil)
  local theta = opt("rope_theta", nil) or (type(rp) == "table" and rp.rope_theta) or 10000
  local scaling = type(rs) == "table" and rs or type(rp) == "table" and rp or nil
  local rope = { theta = theta, style = "half" }
  if scaling then
    local t = scaling.rope_type or scaling.type or "default"
    if t ~= "default" then
      rope.scaling = {
        type = t, factor = scaling.factor, low_freq_factor = scaling.low_freq_factor,
        high_freq_factor = scaling.high_freq_factor,
        original_max_position_embeddings = scaling.original_max_position_embeddings,
      }
    end
  end
  d.rope = rope
  return d
end

local function open_safetensors(path)
  local out = ffi.new("msh_safetensors*[1]")
  local ok, msg = core.try(C.msh_safetensors_open(out, path))
  if not ok then return nil, msg end
  return ffi.gc(out[0], C.msh_safetensors_free)
end

-- The files holding each tensor: { name = safetensors handle }.
local function open_weights(dir)
  local single = dir .. "/model.safetensors"
  local index = dir .. "/model.safetensors.index.json"
  local where = {}
  if exists(index) then
    local idx, err = read_json(index)
    if not idx then return nil, err end
    if type(idx.weight_map) ~= "table" then
      return nil, string.format("'%s': missing field 'weight_map'", index)
    end
    local opened = {}
    for name, file in pairs(idx.weight_map) do
      if type(file) ~= "string" or file:find("/", 1, true) then
        return nil, string.format("'%s': bad shard name for '%s'", index, tostring(name))
      end
      if not opened[file] then
        local st, serr = open_safetensors(dir .. "/" .. file)
        if not st then return nil, serr end
        opened[file] = st
      end
      where[name] = opened[file]
    end
    return where
  end
  if not exists(single) then
    return nil, string.format("'%s': no model.safetensors or model.safetensors.index.json", dir)
  end
  local st, err = open_safetensors(single)
  if not st then return nil, err end
  for i = 0, C.msh_safetensors_count(st) - 1 do
    where[ffi.string(C.msh_safetensors_name(st, i))] = st
  end
  return where
end

local function get(where, name, shape, dir)
  local st = where[name]
  if not st then error(string.format("'%s': tensor '%s' is missing", dir, name), 0) end
  local idx, out = ffi.new("int[1]"), ffi.new("msh_tensor*[1]")
  if C.msh_safetensors_find(st, name, idx) ~= 0 then
    error(string.format("'%s': tensor '%s' is listed in the index but not in its shard", dir, name), 0)
  end
  local ok, msg = core.try(C.msh_safetensors_tensor(st, idx[0], out))
  if not ok then error(msg, 0) end
  local t = ffi.gc(out[0], C.msh_tensor_free)
  local got = t:shape()
  local same = #got == #shape
  for i = 1, #shape do same = same and got[i] == shape[i] end
  if not same then
    error(string.format("'%s': tensor '%s' has shape (%s), expected (%s) from config.json", dir, name,
      table.concat(got, ", "), table.concat(shape, ", ")), 0)
  end
  return t
end

-- M.load(dir) -> desc | nil, message
function M.load(dir)
  local cfg, err = read_json(dir .. "/config.json")
  if not cfg then return nil, err end
  local ok, d = pcall(M.parse_config, cfg, dir .. "/config.json")
  if not ok then return nil, d end
  local where, werr = open_weights(dir)
  if not where then return nil, werr end
  local model = require("moonshard.models").get(d.arch)
  local ok2, res = pcall(require("moonshard.models").collect, model.arch, d, "hf",
    function(name, shape) return get(where, name, shape, dir) end,
    function(name) return where[name] ~= nil end)
  if not ok2 then return nil, res end
  d.weights = res
  d.path = dir
  local tc = exists(dir .. "/tokenizer_config.json") and read_json(dir .. "/tokenizer_config.json")
  if type(tc) == "table" then d.chat_template = M.chat_template(tc) end
  return d
end

-- The text of a special-token entry of tokenizer_config.json ("<s>" or { content = "<s>" }).
local function token_text(v)
  if type(v) == "string" then return v end
  if type(v) == "table" and type(v.content) == "string" then return v.content end
  return nil
end

-- The chat template of a tokenizer_config.json (a string, or a list of named templates of which
-- "default" is taken), or nil.
function M.chat_template(tc)
  local t = tc.chat_template
  if type(t) == "string" then return t end
  if type(t) == "table" then
    for _, e in ipairs(t) do
      if type(e) == "table" and e.name == "default" and type(e.template) == "string" then return e.template end
    end
    if type(t[1]) == "table" and type(t[1].template) == "string" then return t[1].template end
  end
  return nil
end

-- M.tokenizer_from_file(path, desc?) -> tokenizer | nil, message: a tokenizer.json, with the
-- tokenizer_config.json beside it (bos_token, eos_token, add_bos_token) when there is one.
function M.tokenizer_from_file(path, desc)
  local tj, err = read_json(path)
  if not tj then return nil, err end
  local dir = path:match("^(.*)/[^/]*$") or "."
  local tc = exists(dir .. "/tokenizer_config.json") and read_json(dir .. "/tokenizer_config.json") or {}
  if type(tc) ~= "table" then tc = {} end
  local bos = token_text(tc.bos_token) or (desc and desc.bos)
  local eos = token_text(tc.eos_token) or (desc and desc.eos)
  local tok, terr = require("moonshard.bpe").from_json(tj, {
    name = "'" .. path .. "'", bos = bos, eos = eos, add_bos = type(tc.add_bos_token) == "boolean" and tc.add_bos_token or nil,
  })
  if not tok then return nil, terr end
  return tok
end

-- M.tokenizer(dir, desc?) -> tokenizer | nil, message (dir/tokenizer.json)
function M.tokenizer(dir, desc)
  return M.tokenizer_from_file(dir .. "/tokenizer.json", desc)
end

return M
