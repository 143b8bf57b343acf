-- moonshard.models.qwen2: Qwen2 and Qwen2.5. Llama's math with biases on the q, k and v
-- projections (stacked with their weights into b_qkv), a rope theta of 1e6 and, in the smaller
-- models, the output head tied to the embedding: all of it read from the checkpoint.
local llama = require "moonshard.models.llama"

local M = {}

local function L(s) return "model.layers.%d." .. s end

M.arch = llama.derive {
  name = "qwen2",
  hf_model_types = { "qwen2" }, hf_architectures = { "Qwen2ForCausalLM" },
  gguf_arch = "qwen2",
  gguf_rope = "half", -- llama.cpp keeps Hugging Face's q and k rows for Qwen2 (NeoX-style rope)
  after = {
    wv = {
      { "bq", hf = L "self_attn.q_proj.bias", gguf = "blk.%d.attn_q.bias", shape = { "Q" },
        shard = "column", unit = "q", stack = "b_qkv" },
      { "bk", hf = L "self_attn.k_proj.bias", gguf = "blk.%d.attn_k.bias", shape = { "KV" },
        shard = "column", unit = "kv", stack = "b_qkv" },
      { "bv", hf = L "self_attn.v_proj.bias", gguf = "blk.%d.attn_v.bias", shape = { "KV" },
        shard = "column", unit = "kv", stack = "b_qkv" },
    },
  },
}

-- The layer is Llama's: moonshard.nn adds the biases it finds among the weights.
M.layer, M.forward, M.logits = llama.layer, llama.forward, llama.logits

return M
