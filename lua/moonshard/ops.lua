-- moonshard.ops: the core ops, raising on failure with the library's message. Each op runs on
-- the device of its operands; outputs are preallocated by the caller (see moonshard.h).
local core = require "moonshard.core"

local C = core.C
local errmsg = core.errmsg

local M = {}

local function fail(s)
  error((errmsg(s)), 3)
end

function M.embedding(out, table, ids)
  local s = C.msh_op_embedding(out, table, ids)
  if s ~= 0 then fail(s) end
end

function M.rmsnorm(out, x, w, eps)
  local s = C.msh_op_rmsnorm(out, x, w, eps)
  if s ~= 0 then fail(s) end
end

function M.matmul(out, x, w)
  local s = C.msh_op_matmul(out, x, w)
  if s ~= 0 then fail(s) end
end

M.ROPE_INTERLEAVED = C.MSH_ROPE_INTERLEAVED
M.ROPE_HALF = C.MSH_ROPE_HALF

function M.rope(x, pos, inv_freq, style)
  local s = C.msh_op_rope(x, pos, inv_freq, style)
  if s ~= 0 then fail(s) end
end

function M.set_rows(dst, row0, src)
  local s = C.msh_op_set_rows(dst, row0, src)
  if s ~= 0 then fail(s) end
end

-- set_rows_dyn / attention_dyn: the position comes from a (1) i32 tensor on the device.
function M.set_rows_dyn(dst, row0, src)
  local s = C.msh_op_set_rows_dyn(dst, row0, src)
  if s ~= 0 then fail(s) end
end

function M.attention_dyn(out, q, k, v, pos0, max_len, scale)
  local s = C.msh_op_attention_dyn(out, q, k, v, pos0, max_len, scale)
  if s ~= 0 then fail(s) end
end

function M.attention(out, q, k, v, pos0, scale)
  local s = C.msh_op_attention(out, q, k, v, pos0, scale)
  if s ~= 0 then fail(s) end
end

function M.silu_mul(out, gate, up)
  local s = C.msh_op_silu_mul(out, gate, up)
  if s ~= 0 then fail(s) end
end

function M.add(out, a, b)
  local s = C.msh_op_add(out, a, b)
  if s ~= 0 then fail(s) end
end

function M.scale(out, x, f)
  local s = C.msh_op_scale(out, x, f)
  if s ~= 0 then fail(s) end
end

function M.softmax(out, x)
  local s = C.msh_op_softmax(out, x)
  if s ~= 0 then fail(s) end
end

function M.log_softmax(out, x)
  local s = C.msh_op_log_softmax(out, x)
  if s ~= 0 then fail(s) end
end

-- argmax(x, out_buf): out_buf an int32_t[] with a slot per row; returns the first row's index.
function M.argmax(x, out_buf)
  local s = C.msh_op_argmax(x, out_buf)
  if s ~= 0 then fail(s) end
  return out_buf[0]
end

return M
