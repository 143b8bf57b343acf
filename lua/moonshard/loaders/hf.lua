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
  local V = require "moonshard.validate"
  local function need(k) return V.field(cfg, k, { type = "int", min = 1, required = true }, path) end
  local function opt(k, default) return V.absent(cfg[k]) and default or cfg[k] end
  local model, merr = require("moonshard.models").for_hf(cfg)
  if not model then error(string.format("'%s': %s", path, merr), 0) end
  local arch = model.arch
  -- biases other than those the architecture declares would be silently dropped: refuse them
  local bias_q = arch.by_name.bq ~= nil
  local attn_bias = V.field(cfg, "attention_bias", { type = "boolean", default = false }, path)
  local mlp_bias = V.field(cfg, "mlp_bias", { type = "boolean", default = false }, path)
  if (attn_bias and not bias_q) or mlp_bias then
    error(string.format("'%s': %s biases are not supported by the %s architecture", path,
      mlp_bias and "MLP" or "attention", arch.name), 0)
  end
  V.field(cfg, "hidden_act", { type = "string", enum = { "silu" }, default = "silu" }, path)
  local dim, H = need("hidden_size"), need("num_attention_heads")
  local d = {
    arch = arch.name, format = "hf",
    dim = dim, n_layers = need("num_hidden_layers"), n_heads = H,
    n_kv_heads = V.field(cfg, "num_key_value_heads", { type = "int", min = 1, default = H }, path),
    hidden_dim = need("intermediate_size"), vocab_size = need("vocab_size"),
    max_seq = V.field(cfg, "max_position_embeddings", { type = "int", min = 1, default = 2048 }, path),
    norm_eps = V.field(cfg, "rms_norm_eps", { type = "number", gt = 0, default = 1e-6 }, path),
    tie = V.field(cfg, "tie_word_embeddings", { type = "boolean", default = false }, path),
    head_dim = V.field(cfg, "head_dim", { type = "int", min = 2, default = dim / H }, path),
    bos = V.field(cfg, "bos_token_id", { type = "int", min = 0, default = 1 }, path),
    eos = V.field(cfg, "eos_token_id", { int_or_list = true, default = 2 }, path),
  }
  -- sliding-window attention: Mistral's sliding_window; Qwen2's only with use_sliding_window
  local win = V.field(cfg, "sliding_window", { type = "int", min = 1, default = false }, path)
  local use = V.field(cfg, "use_sliding_window", { type = "boolean", default = true }, path)
  if win and use then d.sliding_window = win end
  if type(d.eos) == "table" then d.stop = d.eos; d.eos = d.eos[1] else d.stop = { d.eos } end
  local rp = opt("rope_parameters", nil)
  local rs = opt("rope_scaling", nil)
  local theta = V.field(cfg, "rope_theta", { type = "number", gt = 0, default = false }, path)
    or (type(rp) == "table" and V.field(rp, "rope_theta", { type = "number", gt = 0, default = 10000 }, path .. " rope_parameters"))
    or 10000
  local scaling = type(rs) == "table" and rs or type(rp) == "table" and rp or nil
  local rope = { theta = theta, style = "half" }
  if scaling then
    local where = path .. " " .. (type(rs) == "table" and "rope_scaling" or "rope_parameters")
    local t = V.field(scaling, "rope_type", { type = "string", default = false }, where)
      or V.field(scaling, "type", { type = "string", default = "default" }, where)
    V.check(t, { type = "string", enum = { "default", "linear", "llama3" } }, where, "rope_type")
    if t ~= "default" then
      local function num(k) return V.field(scaling, k, { type = "number", gt = 0, required = true }, where) end
      rope.scaling = { type = t, factor = num("factor") }
      if t == "llama3" then
        rope.scaling.low_freq_factor, rope.scaling.high_freq_factor = num("low_freq_factor"), num("high_freq_factor")
        rope.scaling.original_max_position_embeddings = num("original_max_position_embeddings")
      end
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
