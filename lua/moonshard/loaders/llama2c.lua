-- moonshard.loaders.llama2c: llama2.c checkpoints (a 28-byte header of seven int32, then f32
-- weights) with a tokenizer.bin-format vocabulary. The header is checked in C
-- (msh_llama2c_header); this module lays the weights out as zero-copy views of the mapped file.
local core = require "moonshard.core"
local tensor = require "moonshard.tensor"

local ffi, C = core.ffi, core.C

local M = {}

local function open_file(path)
  local out = ffi.new("msh_file*[1]")
  local ok, msg = core.try(C.msh_file_open(out, path))
  if not ok then return nil, msg end
  return ffi.gc(out[0], C.msh_file_free)
end

-- M.load(path) -> desc | nil, message
function M.load(path)
  local f, err = open_file(path)
  if not f then return nil, err end
  local cfg, shared = ffi.new("int32_t[7]"), ffi.new("int[1]")
  local ok, msg = core.try(C.msh_llama2c_header(f, cfg, shared))
  if not ok then return nil, msg end
  local dim, hidden, L, H, KVH, V, seq = cfg[0], cfg[1], cfg[2], cfg[3], cfg[4], cfg[5], cfg[6]
  local hd = dim / H
  local kv_dim = KVH * hd
  local off = 28
  local function take(shape)
    local n = 1
    for _, d in ipairs(shape) do n = n * d end
    local t = assert(tensor.from_file(f, off, shape, "f32"))
    off = off + n * 4
    return t
  end
  -- per-layer tensors are stored as one block per kind: (layer, ...)
  local function per_layer(shape)
    local list = {}
    for l = 1, L do list[l] = take(shape) end
    return list
  end
  local embed = take { V, dim }
  local rms_att = per_layer { dim }
  local wq = per_layer { dim, dim }
  local wk = per_layer { kv_dim, dim }
  local wv = per_layer { kv_dim, dim }
  local wo = per_layer { dim, dim }
  local rms_ffn = per_layer { dim }
  local w1 = per_layer { hidden, dim }
  local w2 = per_layer { dim, hidden }
  local w3 = per_layer { hidden, dim }
  local norm = take { dim }
  off = off + seq * hd * 4 -- two legacy RoPE tables of seq * hd / 2 floats
  local output = shared[0] == 1 and embed or take { V, dim }
  local layers = {}
  for l = 1, L do
    layers[l] = {
      attn_norm = rms_att[l], wq = wq[l], wk = wk[l], wv = wv[l], wo = wo[l],
      ffn_norm = rms_ffn[l], w_gate = w1[l], w_down = w2[l], w_up = w3[l],
    }
  end
  return {
    arch = "llama", format = "llama2c", path = path,
    dim = dim, hidden_dim = hidden, n_layers = L, n_heads = H, n_kv_heads = KVH, head_dim = hd,
    vocab_size = V, max_seq = seq, norm_eps = 1e-5,
    rope = { theta = 10000, style = "interleaved" },
    bos = 1, eos = 2, stop = { 1, 2 }, -- llama2.c models delimit stories with BOS
    weights = { embed = embed, norm = norm, output = output, layers = layers },
  }
end

return M
