-- moonshard.loaders.dummy: a Llama with random weights (normal, std 0.02; norms near 1) from a
-- Hugging Face style config.json, for benchmarks of shapes whose weights are not at hand.
local hf = require "moonshard.loaders.hf"
local tensor = require "moonshard.tensor"
local cjson = require "cjson.safe"

local M = {}

-- M.load(config_path, opts?) -> desc | nil, message. opts.dtype: weights' dtype ("f32").
function M.load(path, opts)
  opts = opts or {}
  local f, err = io.open(path, "rb")
  if not f then return nil, string.format("cannot read '%s': %s", path, err) end
  local cfg, jerr = cjson.decode(f:read("*a"))
  f:close()
  if type(cfg) ~= "table" then return nil, string.format("'%s' is not valid JSON: %s", path, tostring(jerr)) end
  local ok, d = pcall(hf.parse_config, cfg, path)
  if not ok then return nil, d end
  local dt, device = opts.dtype or "f32", opts.device or "cpu"
  local seed = 1
  local function rnd(shape, mean)
    local t, terr = tensor.new(shape, dt, device)
    if not t then error(terr, 0) end
    seed = seed + 1
    return t:randn(seed, mean or 0, 0.02)
  end
  local D, F, V, hd = d.dim, d.hidden_dim, d.vocab_size, d.head_dim
  local qd, kvd = d.n_heads * hd, d.n_kv_heads * hd
  local ok2, w = pcall(function()
    local w = { layers = {} }
    w.embed = rnd { V, D }
    w.norm = rnd({ D }, 1)
    w.output = d.tie and w.embed or rnd { V, D }
    for l = 1, d.n_layers do
      w.layers[l] = {
        attn_norm = rnd({ D }, 1), wq = rnd { qd, D }, wk = rnd { kvd, D }, wv = rnd { kvd, D },
        wo = rnd { D, qd }, ffn_norm = rnd({ D }, 1),
        w_gate = rnd { F, D }, w_up = rnd { F, D }, w_down = rnd { D, F },
      }
    end
    return w
  end)
  if not ok2 then return nil, string.format("'%s': %s", path, w) end
  d.weights = w
  d.format = "dummy"
  d.path = path
  return d
end

return M
