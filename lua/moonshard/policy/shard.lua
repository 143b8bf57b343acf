-- moonshard.policy.shard: tensor-parallel slicing of a Llama description (Megatron style).
-- Column-parallel: wq, wk, wv (by heads) and w_gate, w_up (by rows of the hidden dim);
-- row-parallel: wo and w_down (by columns), whose partial outputs are summed by an all-reduce.
-- The output head is vocabulary-parallel when the vocabulary splits evenly (each rank computes
-- its rows' logits, an all-gather puts the rows together; opts.vocab_parallel = false keeps it
-- replicated); embedding and norms stay replicated. KV heads are split when there are at
-- least as many as ranks, otherwise each rank keeps the one KV head its query heads read.
-- Slices are views of the loaded (mapped) tensors: a rank touches only the bytes of its slice.
local M = {}

-- M.plan(desc, tp) -> { heads, kv_heads, hidden } per rank, or nil, message
function M.plan(desc, tp)
  local H, KVH, F = desc.n_heads, desc.n_kv_heads, desc.hidden_dim
  if tp < 1 or tp % 1 ~= 0 then return nil, "tensor-parallel degree must be a positive integer" end
  if H % tp ~= 0 then
    return nil, string.format("%d attention heads do not split over %d tensor-parallel ranks", H, tp)
  end
  if F % tp ~= 0 then
    return nil, string.format("hidden size %d of the MLP does not split over %d ranks", F, tp)
  end
  local heads = H / tp
  local kv_heads
  if KVH >= tp then
    if KVH % tp ~= 0 then
      return nil, string.format("%d KV heads do not split over %d ranks", KVH, tp)
    end
    kv_heads = KVH / tp
  else
    local group = H / KVH
    if group % heads ~= 0 then
      return nil, string.format("%d query heads per rank straddle KV heads (group of %d)", heads, group)
    end
    kv_heads = 1
  end
  return { tp = tp, heads = heads, kv_heads = kv_heads, hidden = F / tp }
end

-- M.slice(desc, tp, rank, opts?) -> a description of this rank's part (same fields, local sizes;
-- desc.tp = { size, rank }; desc.vocab_local = the head's rows on this rank when it is split), or
-- nil, message.
function M.slice(desc, tp, rank, opts)
  local p, err = M.plan(desc, tp)
  if not p then return nil, err end
  if tp == 1 then return desc end
  local hd = desc.head_dim or desc.dim / desc.n_heads
  local q0, qn = rank * p.heads * hd, p.heads * hd
  local kv_first
  if desc.n_kv_heads >= tp then
    kv_first = rank * p.kv_heads
  else
    kv_first = math.floor(rank * p.heads / (desc.n_heads / desc.n_kv_heads))
  end
  local k0, kn = kv_first * hd, p.kv_heads * hd
  local f0, fn = rank * p.hidden, p.hidden
  local out = {}
  for k, v in pairs(desc) do out[k] = v end
  out.n_heads, out.n_kv_heads, out.hidden_dim, out.head_dim = p.heads, p.kv_heads, p.hidden, hd
  out.tp = { size = tp, rank = rank }
  local w = desc.weights
  local layers = {}
  for l, lw in ipairs(w.layers) do
    layers[l] = {
      attn_norm = lw.attn_norm, ffn_norm = lw.ffn_norm,
      wq = lw.wq:narrow(1, q0, qn), wk = lw.wk:narrow(1, k0, kn), wv = lw.wv:narrow(1, k0, kn),
      wo = lw.wo:narrow(2, q0, qn),
      w_gate = lw.w_gate:narrow(1, f0, fn), w_up = lw.w_up:narrow(1, f0, fn),
      w_down = lw.w_down:narrow(2, f0, fn),
    }
  end
  local output = w.output
  if not (opts and opts.vocab_parallel == false) and desc.vocab_size % tp == 0 then
    local vl = desc.vocab_size / tp
    output = w.output:narrow(1, rank * vl, vl)
    out.vocab_local = vl
  end
  out.weights = { embed = w.embed, norm = w.norm, output = output, layers = layers }
  return out
end

return M
