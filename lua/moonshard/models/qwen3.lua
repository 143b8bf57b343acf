-- moonshard.models.qwen3: Qwen3 (dense). Llama's layer with each head's query and key
-- RMS-normalized (q_norm, k_norm over the head size) before the rotation, a head size of its own
-- (head_dim, not hidden / heads) and a rope theta of 1e6.
local llama = require "moonshard.models.llama"
local nn = require "moonshard.nn"

local M = {}

local function L(s) return "model.layers.%d." .. s end

M.arch = llama.derive {
  name = "qwen3",
  hf_model_types = { "qwen3" }, hf_architectures = { "Qwen3ForCausalLM" },
  gguf_arch = "qwen3",
  gguf_rope = "half",
  -- the per-head norms read q and k apart: they are not stacked with v
  unstack = { wq = true, wk = true, wv = true },
  after = {
    wv = {
      { "q_norm", hf = L "self_attn.q_norm.weight", gguf = "blk.%d.attn_q_norm.weight", shape = { "HD" } },
      { "k_norm", hf = L "self_attn.k_norm.weight", gguf = "blk.%d.attn_k_norm.weight", shape = { "HD" } },
    },
  },
}

-- x += attention(rmsnorm(x)) with q, k normalized per head; x += mlp(rmsnorm(x))
function M.layer(c, w, kv, next_norm)
  -- q (R, H, hd), k (R, KVH, hd) = rmsnorm_head(rmsnorm(x) @ wq/wk^T), rotated; v as Llama's
  nn.qkv_rope(c, w, kv, true)
  nn.attention(c, kv)
  nn.row_add(c, c.att, w.wo, w.ffn_norm)
  nn.mlp(c, w, next_norm)
end

M.forward, M.logits = llama.forward, llama.logits

return M
