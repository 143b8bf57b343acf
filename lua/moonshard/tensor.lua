-- moonshard.tensor: tensors as LuaJIT cdata with methods.
--
-- Conventions: dims are counted from 1 as in Lua (t:size(1) is the outermost), offsets, positions
-- and element indices from 0 as in C. A tensor made here is freed by the garbage collector as a
-- safety net; t:free() releases it at once. Device memory should come from arenas owned by the
-- engine, not from the collector.
local core = require "moonshard.core"

local ffi, C = core.ffi, core.C
local check = core.check

local M = {}
local T = {}  -- methods

local out = ffi.new("msh_tensor*[1]")
local shape_buf = ffi.new("int64_t[8]")
local stride_buf = ffi.new("int64_t[8]")

local dtype_ids = core.dtypes
local dtype_names = core.dtype_names
local devices = core.devices

local function owned(p)
  return ffi.gc(p, C.msh_tensor_free)
end

local function fill_shape(shape)
  local n = #shape
  if n > 8 then error("at most 8 dims", 3) end
  for i = 1, n do shape_buf[i - 1] = shape[i] end
  return n
end

local function dtype_id(dt)
  if dt == nil then return C.MSH_F32 end
  local id = type(dt) == "string" and dtype_ids[dt] or dt
  if id == nil then error("unknown dtype '" .. tostring(dt) .. "'", 3) end
  return id
end

local function device_id(dev)
  if dev == nil or dev == "cpu" then return C.MSH_CPU, 0 end
  if type(dev) == "string" then
    local kind, idx = dev:match("^(%a+):?(%d*)$")
    local id = kind and devices[kind]
    if not id then error("unknown device '" .. dev .. "'", 3) end
    return id, tonumber(idx) or 0
  end
  return dev, 0
end

-- M.new(shape, dtype?, device?) -> zero-filled tensor ("cpu", "cuda", "cuda:1").
function M.new(shape, dtype, device)
  local n = fill_shape(shape)
  local dev, idx = device_id(device)
  local ok, msg, code = core.try(C.msh_tensor_new(out, dtype_id(dtype), n, shape_buf, dev, idx))
  if not ok then return nil, msg, code end
  return owned(out[0])
end

-- M.from(values, shape?, dtype?) -> CPU tensor holding a Lua array of numbers.
function M.from(values, shape, dtype)
  shape = shape or { #values }
  local t = assert(M.new(shape, dtype or "f32"))
  t:set_values(values)
  return t
end

-- M.in_arena(arena, shape, dtype?) -> tensor carved from an arena (msh_arena*).
function M.in_arena(arena, shape, dtype)
  local n = fill_shape(shape)
  local ok, msg, code = core.try(C.msh_tensor_new_arena(out, arena, dtype_id(dtype), n, shape_buf))
  if not ok then return nil, msg, code end
  return owned(out[0])
end

-- M.from_file(file, offset, shape, dtype) -> read-only zero-copy view of a mapped file.
function M.from_file(file, offset, shape, dtype)
  local n = fill_shape(shape)
  local ok, msg, code = core.try(C.msh_tensor_from_file(out, file, offset, dtype_id(dtype), n, shape_buf))
  if not ok then return nil, msg, code end
  return owned(out[0])
end

M.dtype_id = dtype_id
M.device_id = device_id

-- ------------------------------------------------------------------------------ accessors

function T:dtype() return dtype_names[C.msh_tensor_dtype(self)] end
function T:ndim() return C.msh_tensor_ndim(self) end
function T:numel() return tonumber(C.msh_tensor_numel(self)) end
function T:size(i) return tonumber(C.msh_tensor_dim(self, i - 1)) end
function T:stride(i) return tonumber(C.msh_tensor_stride(self, i - 1)) end
function T:is_contiguous() return C.msh_tensor_is_contiguous(self) ~= 0 end
function T:data() return C.msh_tensor_data(self) end
-- Bytes its elements take (whole blocks for block-quantized dtypes; strides ignored).
function T:nbytes()
  local dt = C.msh_tensor_dtype(self)
  return self:numel() / C.msh_dtype_block_elems(dt) * tonumber(C.msh_dtype_block_bytes(dt))
end
-- true for the block-quantized dtypes (q8_0, q4_0, q4_1)
function T:is_quantized() return core.quantized[self:dtype()] == true end

function T:device()
  local d = C.msh_tensor_device(self)
  if d == C.MSH_CPU then return "cpu" end
  return "cuda:" .. C.msh_tensor_device_index(self)
end

function T:shape()
  local s = {}
  for i = 1, C.msh_tensor_ndim(self) do s[i] = tonumber(C.msh_tensor_dim(self, i - 1)) end
  return s
end

function T:__tostring()
  return string.format("tensor(%s, %s, %s)", table.concat(self:shape(), "x"), self:dtype(), self:device())
end

-- ---------------------------------------------------------------------------------- views

-- t:narrow(dim, start, len): dim from 1, start from 0.
function T:narrow(dim, start, len)
  check(C.msh_tensor_narrow(out, self, dim - 1, start, len), 2)
  return owned(out[0])
end

function T:reshape(shape)
  local n = fill_shape(shape)
  check(C.msh_tensor_reshape(out, self, n, shape_buf), 2)
  return owned(out[0])
end

function T:transpose(d0, d1)
  check(C.msh_tensor_transpose(out, self, d0 - 1, d1 - 1), 2)
  return owned(out[0])
end

function T:view(shape, strides, offset)
  local n = fill_shape(shape)
  for i = 1, n do stride_buf[i - 1] = strides[i] end
  check(C.msh_tensor_view(out, self, n, shape_buf, stride_buf, offset or 0), 2)
  return owned(out[0])
end

-- ---------------------------------------------------------------------------------- copies

function T:copy_from(src)
  check(C.msh_tensor_copy(self, src), 2)
  return self
end

-- t:to(dtype?, device?) -> a new contiguous tensor (a copy even when nothing changes).
function T:to(dtype, device)
  local dst = assert(M.new(self:shape(), dtype or self:dtype(), device or self:device()))
  check(C.msh_tensor_copy(dst, self), 2)
  return dst
end

function T:randn(seed, mean, std)
  check(C.msh_tensor_randn(self, seed or 0, mean or 0, std or 1), 2)
  return self
end

function T:free()
  ffi.gc(self, nil)
  C.msh_tensor_free(self)
end

-- ------------------------------------------------------------------------ host values (CPU)

local function host_f32(t)
  if t:device() ~= "cpu" or t:dtype() ~= "f32" or not t:is_contiguous() then
    return t:to("f32", "cpu")
  end
  return t
end

-- Values in row-major order as a flat Lua array (a copy; for tests and small tensors).
function T:values()
  local dt = self:dtype()
  if dt == "i32" or dt == "i8" then
    local h = self:device() == "cpu" and self:is_contiguous() and self or self:to(dt, "cpu")
    local p = ffi.cast(dt == "i32" and "int32_t*" or "int8_t*", h:data())
    local v = {}
    for i = 0, h:numel() - 1 do v[i + 1] = p[i] end
    return v
  end
  local h = host_f32(self)
  local p = ffi.cast("float*", h:data())
  local v = {}
  for i = 0, h:numel() - 1 do v[i + 1] = p[i] end
  return v
end

-- t:item(i): element i (from 0, row-major) of a contiguous CPU f32/i32 tensor.
function T:item(i)
  local dt = C.msh_tensor_dtype(self)
  if dt == C.MSH_I32 then return ffi.cast("int32_t*", C.msh_tensor_data(self))[i or 0] end
  return ffi.cast("float*", C.msh_tensor_data(self))[i or 0]
end

-- Writes a Lua array into a contiguous CPU tensor (f32 or i32).
function T:set_values(values)
  if self:device() ~= "cpu" or not self:is_contiguous() then error("set_values needs a contiguous CPU tensor", 2) end
  local dt = self:dtype()
  local n = self:numel()
  if #values ~= n then error(string.format("set_values: %d values for %d elements", #values, n), 2) end
  if dt == "f32" or dt == "i32" then
    local p = ffi.cast(dt == "f32" and "float*" or "int32_t*", self:data())
    for i = 1, n do p[i - 1] = values[i] end
  else
    local tmp = M.from(values, self:shape(), "f32")
    self:copy_from(tmp)
  end
  return self
end

ffi.metatype("struct msh_tensor", { __index = T, __tostring = T.__tostring })

M.methods = T
return M
