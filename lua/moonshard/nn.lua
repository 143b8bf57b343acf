-- moonshard.nn: the blocks model files compose, with tensor parallelism inside them (as
-- nano-vllm's QKVParallelLinear / RowParallelLinear / ParallelLMHead do).
--
-- Every block takes the step `c` (moonshard.runner): its activation views (x, h, q, qkv ...),
-- positions, cache and constants, and `c.tp` when the layer's weights are one tensor-parallel
-- rank's slices. Column-parallel projections need nothing more (each rank computes its heads or
-- feed-forward rows); row-parallel ones (o, down) sum their partial products across the ranks,
-- and the RMSNorm that follows comes with that sum (msh_comm_all_reduce_add_norm): the next
-- block then finds h already normalized (c.normed) and skips its own norm. On one rank the
-- projections fold their norm and residual into one op (rmsnorm_qkv_rope, matmul_acc,
-- rmsnorm_mlp); stacked weights (wqkv, w_gu; moonshard.stage) run as one projection.
local ops = require "moonshard.ops"
local core = require "moonshard.core"
local tensor = require "moonshard.tensor"

local C = core.C
local M = {}

local embedding, rmsnorm, matmul, rope = ops.embedding, ops.rmsnorm, ops.matmul, ops.rope
local set_rows, set_rows_dyn, attention, attention_dyn = ops.set_rows, ops.set_rows_dyn, ops.attention, ops.attention_dyn
local silu_mul, matmul_acc, matmul_glu, qkv_rope = ops.silu_mul, ops.matmul_acc, ops.matmul_glu, ops.qkv_rope
local rmsnorm_matmul, rmsnorm_qkv_rope, rmsnorm_mlp = ops.rmsnorm_matmul, ops.rmsnorm_qkv_rope, ops.rmsnorm_mlp
local add_bias = function(...) return ops.add_bias(...) end
local kv_write, paged_attention = ops.kv_write, ops.paged_attention

local function comm_check(s)
  if s ~= 0 then error((core.errmsg(s)), 3) end
end

-- The input of a norm-then-project block: (x, norm_w) for an op that folds the norm in, or
-- (h, nil) when the sum across ranks before it already formed h = rmsnorm(x).
local function norm_input(c, norm_w)
  if c.normed then
    c.normed = false
    return c.h, nil
  end
  return c.x, norm_w
end

-- x (R, D) = embedding rows of the step's token ids.
function M.embed(c, table)
  embedding(c.x, table, c.ids)
end

-- Attention's input: q, k, v = rmsnorm(x) @ [wq; wk; wv]^T (+ their biases), with each head's
-- q and k normalized when qk_norm (w.q_norm, w.k_norm: Qwen3), rotated at the step's positions;
-- k and v stored into the cache kv. Column-parallel: a rank projects its own heads. A paged
-- cache (c.paged: kv.k_pool, kv.v_pool; moonshard.runner) takes the step's k, v rows by their
-- slots (c.slots) once they are formed: the fused ops store them in c.kr, c.vr through kv.k, kv.v.
function M.qkv_rope(c, w, kv, qk_norm)
  local src, norm_w = norm_input(c, w.attn_norm)
  local eps = c.eps
  if w.wqkv and not w.b_qkv and not qk_norm then
    -- one op (one kernel at decode on a GPU): norm, projection, rope, cache store
    rmsnorm_qkv_rope(c.qr, kv.k, kv.v, c.qkv, src, norm_w, eps, w.wqkv, norm_w and c.h or nil, c.pos,
      c.inv_freq, c.rope_style)
    if c.paged then kv_write(kv.k_pool, kv.v_pool, c.kr, c.vr, c.slots) end
  elseif w.wqkv and not qk_norm then
    if norm_w then rmsnorm_matmul(c.qkv, src, norm_w, eps, w.wqkv, c.h, nil) else matmul(c.qkv, src, w.wqkv) end
    add_bias(c.qkv, w.b_qkv)
    qkv_rope(c.qr, kv.k, kv.v, c.qkv, c.pos, c.inv_freq, c.rope_style)
    if c.paged then kv_write(kv.k_pool, kv.v_pool, c.kr, c.vr, c.slots) end
  else
    if norm_w then rmsnorm(c.h, src, norm_w, eps) end
    matmul(c.q, c.h, w.wq)
    matmul(c.k, c.h, w.wk)
    matmul(c.v, c.h, w.wv)
    if w.bq then
      add_bias(c.q, w.bq)
      add_bias(c.k, w.bk)
      add_bias(c.v, w.bv)
    end
    if qk_norm then
      rmsnorm(c.qr, c.qr, w.q_norm, eps)
      rmsnorm(c.k3, c.k3, w.k_norm, eps)
    end
    rope(c.qr, c.pos, c.inv_freq, c.rope_style)
    rope(c.k3, c.pos, c.inv_freq, c.rope_style)
    if c.paged then
      kv_write(kv.k_pool, kv.v_pool, c.k3, c.v3, c.slots)
    elseif c.dyn_len then
      set_rows_dyn(kv.k, c.starts, c.kr)
      set_rows_dyn(kv.v, c.starts, c.vr)
    else
      set_rows(kv.k, c.pos0, c.kr)
      set_rows(kv.v, c.pos0, c.vr)
    end
  end
end

-- att = softmax(q k^T * scale + causal mask) v over the cache kv (grouped-query heads); a paged
-- cache through the step's block tables, its rows ragged (varlen), planned for c.dyn_len.
function M.attention(c, kv)
  if c.paged then
    paged_attention(c.atta, c.qa, kv.k_pool, kv.v_pool, c.q_start, c.ctx_len, c.block_table, c.dyn_len, c.scale)
  elseif c.dyn_len then
    attention_dyn(c.atta, c.qa, kv.k, kv.v, c.starts, c.dyn_len, c.scale)
  else
    attention(c.atta, c.qa, kv.k, kv.v, c.pos0, c.scale)
  end
end

-- Row-parallel projection into the residual: x += a @ w^T. With tensor parallelism the partial
-- products are summed across ranks first, and next_norm (the RMSNorm weight of the block that
-- follows, or nil) is applied in the same call: h = rmsnorm(x) * next_norm.
function M.row_add(c, a, w, next_norm)
  local tp = c.tp
  if not tp then
    matmul_acc(c.x, a, w)
    return
  end
  matmul(c.o, a, w)
  if next_norm then
    comm_check(C.msh_comm_all_reduce_add_norm(tp, c.x, c.o, c.h, next_norm, c.eps))
    c.normed = true
  else
    comm_check(C.msh_comm_all_reduce_add(tp, c.x, c.o))
  end
end

-- The feed-forward block into the residual: x += w_down(silu(w_gate(h)) * w_up(h)), h =
-- rmsnorm(x) with w.ffn_norm. Gate and up are column-parallel, down row-parallel (its sum
-- brings next_norm, see row_add). On one rank with gate/up stacked: one op (16-bit
-- activations between the GEMMs of a prefill on a GPU).
function M.mlp(c, w, next_norm)
  if w.w_gu and not c.tp then
    rmsnorm_mlp(c.x, w.ffn_norm, c.eps, w.w_gu, w.w_down, c.h, c.g, c.gu)
    return
  end
  local src, norm_w = norm_input(c, w.ffn_norm)
  if w.w_gu then
    if norm_w then rmsnorm_matmul(c.g, src, norm_w, c.eps, w.w_gu, c.h, c.gu) else matmul_glu(c.g, c.h, w.w_gu, c.gu) end
  else
    if norm_w then rmsnorm(c.h, src, norm_w, c.eps) end
    matmul(c.g, c.h, w.w_gate)
    matmul(c.u, c.h, w.w_up)
    silu_mul(c.g, c.g, c.u)
  end
  M.row_add(c, c.g, w.w_down, next_norm)
end

-- logits (R, V) = h (R, D) @ output^T. A vocabulary-parallel head (c.vocab_local rows on each
-- tensor-parallel rank) computes this rank's columns, then an all-gather joins them: the gather
-- holds (rank, row, columns), which a strided copy turns into rows.
local function head(c, logits, h, R, out_w)
  local Vl = c.vocab_local
  if not Vl then
    matmul(logits, h, out_w)
    return
  end
  local tp, n, b = c.tp, c.tp_size, c.buf
  if R == 1 then
    matmul(b.logits_l, h, out_w)
    comm_check(C.msh_comm_all_gather(tp, logits, b.logits_l))
    return
  end
  local l, g, made
  if R <= c.batch then
    l, g = b.blogits_l:narrow(1, 0, R), b.gather:narrow(1, 0, n * R * Vl)
  else -- every position's logits (all_logits): buffers for this call, freed before returning
    l, g = assert(tensor.new({ R, Vl }, "f32", c.device)), assert(tensor.new({ n * R * Vl }, "f32", c.device))
    made = true
  end
  matmul(l, h, out_w)
  comm_check(C.msh_comm_all_gather(tp, g, l))
  local dst, src = logits:reshape { R, n, Vl }, g:view({ R, n, Vl }, { Vl, R * Vl, 1 }, 0)
  dst:copy_from(src)
  dst:free()
  src:free()
  if R <= c.batch then l:free(); g:free() end
  if made then l:free(); g:free() end
end

-- logits (R, V) = rmsnorm(x) @ output^T through h (R, D): the final norm folded into a
-- replicated head, or formed first for a vocabulary-parallel one.
function M.norm_head(c, logits, x, h, R, norm_w, out_w)
  if c.vocab_local then
    rmsnorm(h, x, norm_w, c.eps)
    head(c, logits, h, R, out_w)
  else
    rmsnorm_matmul(logits, x, norm_w, c.eps, out_w, h, nil)
  end
end

return M
