-- moonshard.policy.shard: tensor-parallel slicing of a model description (Megatron style), as
-- the architecture's declaration (moonshard.models) says: column-parallel weights (Llama's wq,
-- wk, wv by heads, w_gate, w_up by rows of the hidden dim, and their biases) by rows;
-- row-parallel ones (wo, w_down) by columns, their partial outputs summed by an all-reduce.
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
  -- each weight as its declaration says (moonshard.models): column-parallel ones by rows (the
  -- first dim: biases too), row-parallel ones by columns, the rest replicated
  local arch = require("moonshard.models").get(desc.arch).arch
  local range = { q = { q0, qn }, kv = { k0, kn }, f = { f0, fn } }
  local w = desc.weights
  local layers = {}
  for l, lw in ipairs(w.layers) do
    local sl = {}
    for name, t in pairs(lw) do
      local e = arch.by_name[name]
      if not e then
        return nil, string.format("layer %d: weight '%s' is not declared by the %s architecture", l, name, arch.name)
      end
      local r = range[e.unit]
      if e.shard == "column" then sl[name] = t:narrow(1, r[1], r[2])
      elseif e.shard == "row" then sl[name] = t:narrow(2, r[1], r[2])
      else sl[name] = t end
    end
    layers[l] = sl
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
