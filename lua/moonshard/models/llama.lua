-- moonshard.models.llama: the Llama architecture (Llama 1/2/3, SmolLM2, TinyLlama ...): its
-- weights, declared once (see moonshard.models), and its math, one straight pass per layer.
--
-- The step `c` (moonshard.runner) holds the activations of R rows (B sequences x T tokens):
--   x (R, D)      the residual stream          h (R, D)     its RMSNorm
--   q (R, H*hd)   queries                      att (R, H*hd) attention's output
--   g (R, F)      the gated feed-forward activations
-- and the KV cache of each layer, c.kv[l] = { k, v } (slots, max_seq, KVH, hd). Where the
-- sizes are one tensor-parallel rank's, moonshard.nn sums what must be summed.
local nn = require "moonshard.nn"

local M = {}

local function L(s) return "model.layers.%d." .. s end

M.arch = {
  name = "llama",
  hf_model_types = { "llama" }, hf_architectures = { "LlamaForCausalLM" },
  gguf_arch = "llama",
  -- llama.cpp's converter permutes q and k so that RoPE rotates adjacent pairs
  gguf_rope = "interleaved",
  globals = {
    { "embed", hf = "model.embed_tokens.weight", gguf = "token_embd.weight", shape = { "V", "D" } },
    { "norm", hf = "model.norm.weight", gguf = "output_norm.weight", shape = { "D" } },
    { "output", hf = "lm_head.weight", gguf = "output.weight", shape = { "V", "D" }, shard = "vocab", tied = "embed" },
  },
  layer = {
    { "attn_norm", hf = L "input_layernorm.weight", gguf = "blk.%d.attn_norm.weight", shape = { "D" } },
    { "wq", hf = L "self_attn.q_proj.weight", gguf = "blk.%d.attn_q.weight", shape = { "Q", "D" },
      shard = "column", unit = "q", stack = "wqkv" },
    { "wk", hf = L "self_attn.k_proj.weight", gguf = "blk.%d.attn_k.weight", shape = { "KV", "D" },
      shard = "column", unit = "kv", stack = "wqkv" },
    { "wv", hf = L "self_attn.v_proj.weight", gguf = "blk.%d.attn_v.weight", shape = { "KV", "D" },
      shard = "column", unit = "kv", stack = "wqkv" },
    { "wo", hf = L "self_attn.o_proj.weight", gguf = "blk.%d.attn_output.weight", shape = { "D", "Q" },
      shard = "row", unit = "q" },
    { "ffn_norm", hf = L "post_attention_layernorm.weight", gguf = "blk.%d.ffn_norm.weight", shape = { "D" } },
    { "w_gate", hf = L "mlp.gate_proj.weight", gguf = "blk.%d.ffn_gate.weight", shape = { "F", "D" },
      shard = "column", unit = "f", stack = "w_gu" },
    { "w_up", hf = L "mlp.up_proj.weight", gguf = "blk.%d.ffn_up.weight", shape = { "F", "D" },
      shard = "column", unit = "f", stack = "w_gu" },
    { "w_down", hf = L "mlp.down_proj.weight", gguf = "blk.%d.ffn_down.weight", shape = { "D", "F" },
      shard = "row", unit = "f" },
  },
}

-- One layer: x += attention(rmsnorm(x)); x += mlp(rmsnorm(x)).
--   w: the layer's weights (wq wk wv or stacked wqkv, wo, w_gate w_up or stacked w_gu, w_down,
--   attn_norm, ffn_norm); kv: its cache; next_norm: the next layer's attn_norm (nil for the last)
function M.layer(c, w, kv, next_norm)
  -- q, k, v (R, H*hd / KVH*hd) = rmsnorm(x) @ wq/wk/wv^T, rotated; k, v appended to the cache
  nn.qkv_rope(c, w, kv)
  -- att (R, H*hd) = softmax(q k^T / sqrt(hd), causal) v
  nn.attention(c, kv)
  -- x (R, D) += att @ wo^T
  nn.row_add(c, c.att, w.wo, w.ffn_norm)
  -- x (R, D) += w_down(silu(rmsnorm(x) @ w_gate^T) * (rmsnorm(x) @ w_up^T))
  nn.mlp(c, w, next_norm)
end

-- A copy of this declaration for an architecture that differs in a few entries: fields of
-- `over` replace the copy's; over.after = { NAME = { entries } } inserts entries after NAME's;
-- over.unstack = { NAME = true } keeps those weights apart.
function M.derive(over)
  local a = {}
  for k, v in pairs(M.arch) do
    if k ~= "by_name" and k ~= "stacks" then a[k] = v end
  end
  for k, v in pairs(over) do if k ~= "after" and k ~= "unstack" then a[k] = v end end
  local function copy(list)
    local out = {}
    for _, e in ipairs(list) do
      local n = {}
      for k, v in pairs(e) do n[k] = v end
      if over.unstack and over.unstack[n[1]] then n.stack = nil end
      out[#out + 1] = n
      for _, extra in ipairs(over.after and over.after[n[1]] or {}) do out[#out + 1] = extra end
    end
    return out
  end
  a.globals, a.layer = copy(M.arch.globals), copy(M.arch.layer)
  return a
end

-- The stage's layers over the step's rows: x from the token ids on the first pipeline stage
-- (others receive x), then each layer with its weights acquired from the stage.
function M.forward(c)
  local stage = c.stage
  if c.embed then nn.embed(c, stage:embed()) end
  for l = c.first_layer, c.last_layer do
    local w = stage:acquire(l)
    c.model.layer(c, w, c.kv[l], c.next_norm[l])
    stage:release(l)
  end
end

-- logits (R, V) = rmsnorm(x) @ output^T, through h (R, D)
function M.logits(c, logits, x, h, R)
  nn.norm_head(c, logits, x, h, R, c.stage:norm(), c.stage:output())
end

return M
