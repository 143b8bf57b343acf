-- moonshard.core: the FFI binding of libmoonshard, generated from core/include/moonshard.h.
-- C calls return a status; this module turns a status into an error or `nil, msg, code`.
local ffi = require "ffi"

ffi.cdef(require "moonshard.cdef")

local function resolve()
  -- the host executable links libmoonshard, so its symbols are global; plain LuaJIT loads it
  local ok = pcall(function() return ffi.C.msh_version end)
  if ok then return ffi.C end
  return ffi.load(os.getenv("MOONSHARD_LIB") or "moonshard")
end

local C = resolve()

local M = { C = C, ffi = ffi }

local status_names = {}

-- The last error message of this thread, and the status's name ("EINVAL", ...).
function M.errmsg(s)
  local name = status_names[s]
  if not name then
    name = ffi.string(C.msh_status_name(s))
    status_names[s] = name
  end
  return ffi.string(C.msh_last_error()), name
end

-- Raises on a failed status (for misuse and for callers that want exceptions).
function M.check(s, level)
  if s ~= 0 then
    local msg = M.errmsg(s)
    error(msg, (level or 1) + 1)
  end
end

-- Returns true, or nil, message, code-name.
function M.try(s)
  if s == 0 then return true end
  local msg, name = M.errmsg(s)
  return nil, msg, name
end

M.dtypes = {
  f32 = C.MSH_F32, f16 = C.MSH_F16, bf16 = C.MSH_BF16, i32 = C.MSH_I32, i8 = C.MSH_I8,
  q8_0 = C.MSH_Q8_0, q4_0 = C.MSH_Q4_0, q4_1 = C.MSH_Q4_1, -- block-quantized (32 elements a block)
  -- group-wise, quantized at load: int8 symmetric / int4 with a min, groups of 32, 64 or 128
  i8g32 = C.MSH_I8G32, i8g64 = C.MSH_I8G64, i8g128 = C.MSH_I8G128,
  i4g32 = C.MSH_I4G32, i4g64 = C.MSH_I4G64, i4g128 = C.MSH_I4G128,
}
-- the block-quantized ones
M.quantized = { q8_0 = true, q4_0 = true, q4_1 = true, i8g32 = true, i8g64 = true, i8g128 = true,
  i4g32 = true, i4g64 = true, i4g128 = true }
M.dtype_names = {}
for k, v in pairs(M.dtypes) do M.dtype_names[tonumber(v)] = k end
M.devices = { cpu = C.MSH_CPU, cuda = C.MSH_CUDA }

return M
