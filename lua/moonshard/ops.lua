-- moonshard.ops: the core ops, raising on failure with the library's message. Each op runs on
-- the device of its operands; outputs are preallocated by the caller (see moonshard.h).
--   embedding(out, table, ids)          rmsnorm(out, x, w, eps)      matmul(out, x, w)
--   rope(x, pos, inv_freq, style)       set_rows(dst, row0, src)     set_rows_dyn(dst, row0_t, src)
--   attention(out, q, k, v, pos0, scale)
--   attention_dyn(out, q, k, v, pos0_t, max_len, scale)   (positions read on the device)
--   silu_mul(out, gate, up)  add(out, a, b)  scale(out, x, f)  softmax(out, x)  log_softmax(out, x)
--   add_bias(out, b) (out (M, N) f32 += b (N) f32/f16/bf16, in place)
--   fused: matmul_acc(out, x, w) (out +=)   matmul_glu(out, x, w_gate_up, scratch)
--          qkv_rope(q_out, k_cache, v_cache, qkv, pos, inv_freq, style)
--          rmsnorm_matmul(out, x, norm_w, eps, w, h, gu) (out = rmsnorm(x) @ w^T, or the GLU form
--          with gu its scratch; h (M, K) scratch)
--          rmsnorm_qkv_rope(q_out, k_cache, v_cache, qkv, x, norm_w, eps, w, h, pos, inv_freq, style)
--          (rmsnorm_matmul into qkv, then qkv_rope; qkv and h scratch; norm_w nil: x arrives
--          normalized, qkv = x @ w^T)
--          rmsnorm_mlp(x, norm_w, eps, w_gu, w_down, h, g, gu) (x += the feed-forward block of
--          rmsnorm(x); h, g, gu scratch)
--   paged KV cache: kv_write(k_pool, v_pool, k, v, slots)
--          paged_attention(out, q, k_pool, v_pool, q_start, ctx_len, block_table, max_ctx, scale)
--   argmax(x, out_buf) -> the first row's index (out_buf: int32_t[] with a slot per row)
--   argmax_into(out, x): the same into an i32 tensor on x's device (nothing waits on a GPU)
local core = require "moonshard.core"

local C = core.C
local errmsg = core.errmsg

local M = {}

local function fail(s)
  error((errmsg(s)), 3)
end

-- A Lua function calling msh_op_<name> and raising on a failed status. The C symbol is looked
-- up on first use, so ops that a build lacks fail only when called.
local function op(name)
  local fn
  return function(...)
    fn = fn or C["msh_op_" .. name]
    local s = fn(...)
    if s ~= 0 then fail(s) end
  end
end

for _, name in ipairs { "embedding", "rmsnorm", "matmul", "rope", "set_rows", "set_rows_dyn", "attention",
                        "attention_dyn", "silu_mul", "add", "add_bias", "scale", "softmax", "log_softmax",
                        "matmul_acc", "matmul_glu", "qkv_rope", "rmsnorm_matmul", "rmsnorm_qkv_rope",
                        "rmsnorm_mlp", "kv_write", "paged_attention" } do
  M[name] = op(name)
end

M.ROPE_INTERLEAVED = C.MSH_ROPE_INTERLEAVED
M.ROPE_HALF = C.MSH_ROPE_HALF

function M.argmax(x, out_buf)
  local s = C.msh_op_argmax(x, out_buf)
  if s ~= 0 then fail(s) end
  return out_buf[0]
end

-- argmax_into(out, x): out (i32, x's device, a value per row) = each row's argmax, no wait
function M.argmax_into(out, x)
  local s = C.msh_op_argmax_into(out, x)
  if s ~= 0 then fail(s) end
end

return M
