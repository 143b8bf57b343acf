-- moonshard.kv_offload: the KV cache in pinned host memory (--kv-offload, moonshard.load's
-- opts.kv_offload), so that batch x context is bounded by host memory instead of the GPU's.
--
-- How a GPU reads it: each layer's K and V (the contiguous per-slot cache or the paged block
-- pool) are buffers of one pinned pool (offload.c's msh_pin_pool: the same guard on how much may
-- be locked as the weights' host tier), and the runner sees them as tensors of its device over
-- those host bytes (msh_tensor_map_host: device-mapped host memory, the same address on the
-- host and the GPU under unified addressing). The attention and KV-write kernels are the
-- resident cache's, unchanged: their loads and stores cross the link. That is "stream each
-- layer's KV" in its simplest form, chosen over staging copies and over attending on the CPU:
--   * a decode step reads every cached K/V byte of a sequence once either way, so the bytes on
--     the link are the same whether a copy engine moves them into a device buffer ahead of the
--     kernel or the kernel's loads move them; a staged copy adds a device ring per layer, events
--     and a copy of the whole context before any of it is used, where the kernel's own loads
--     overlap with its math and stop at each sequence's length;
--   * the step's new rows go the other way as the kernel stores them (a few KiB per token);
--   * attention on the CPU would run at the host's memory bandwidth, shared by every rank of the
--     node and no faster than a PCIe 5 link (~55 GB/s) on most machines, would send q and o over
--     the link per layer, and would take the step out of its CUDA graph;
--   * the addresses are fixed for the runner's life, so decode steps keep replaying CUDA graphs.
-- The cost is the link's bandwidth on every step's attention (what a batch x context beyond the
-- GPU's memory costs anyway). The kernels were written for HBM: the paged one's warps each load
-- a key tile for their own query head, so with grouped-query attention a tile may cross the link
-- once per query head of its group where L2 does not keep it; bench's kv_link_gbs (the cache bytes
-- a step needs over its time) against h2d_pinned_gbs shows how far from the link that runs, and
-- staging each tile in shared memory once per kv head is the kernel change that would close it.
-- On the CPU device the cache was host memory already, and this is
-- the same code path: the buffers come from the pinned pool (ordinary memory where the build
-- cannot pin), viewed by the CPU as they are.
--
--   local kv = require "moonshard.kv_offload"
--   local a = kv.arena("cuda:0", { bytes_k, bytes_v, ... }, { pin = nil })  -- or nil: use the device
--   local K = a:tensor({ B, S, KVH, hd }, "bf16")                           -- a cuda:0 tensor
--   a:close()
local ffi = require "ffi"
local core = require "moonshard.core"
local tensor = require "moonshard.tensor"

local C = core.C
local try = core.try

local M = {}

local ALIGN = 4096 -- the pool hands out 4096-aligned buffers
local out_pool = ffi.new("msh_pin_pool*[1]")
local out_tensor = ffi.new("msh_tensor*[1]")
local shape_buf = ffi.new("int64_t[8]")

local function fail(s)
  local ok, msg = try(s)
  if not ok then error(msg, 0) end
end

local function warn(msg) io.stderr:write("moonshard: ", msg, "\n") end

-- bytes of a (shape, dtype) tensor
local function nbytes(shape, dt)
  local id = core.dtypes[dt]
  if not id then error("unknown dtype '" .. tostring(dt) .. "'", 3) end
  local n = 1
  for _, d in ipairs(shape) do n = n * d end
  return math.ceil(n / C.msh_dtype_block_elems(id)) * tonumber(C.msh_dtype_block_bytes(id))
end
M.nbytes = nbytes

-- M.pool_bytes(sizes) -> bytes of a pool holding buffers of those sizes (each 4096-aligned)
function M.pool_bytes(sizes)
  local total = 0
  for _, b in ipairs(sizes) do total = total + math.ceil(b / ALIGN) * ALIGN end
  return total
end

-- M.arena(device, sizes, opts) -> arena | nil: host memory for the KV cache's tensors, whose
-- sizes (bytes) are listed in the order arena:tensor will ask for them. opts.pin as
-- moonshard.offload's: true needs pinned memory and raises over the limit (the pool's message:
-- what was asked, what is allowed, what would fit); nil falls back with a one-line warning (nil
-- is returned: the caller keeps the cache where it would be without --kv-offload, which on the
-- CPU is pageable host memory and on a GPU its own memory); false is pageable memory, which only
-- the CPU can use as its cache. opts.what names the cache in messages.
function M.arena(device, sizes, opts)
  opts = opts or {}
  local kind, index = tensor.device_id(device)
  local what = opts.what or "--kv-offload"
  local gpu = kind ~= C.MSH_CPU
  if opts.pin == false then
    if gpu then
      error(string.format("%s: a GPU reads the KV cache from pinned host memory only (drop --no-pin-memory)", what), 0)
    end
    return nil
  end
  local bytes = M.pool_bytes(sizes)
  local ok, msg = try(C.msh_pin_pool_new(out_pool, bytes, 0, -1))
  local pool = ok and ffi.gc(out_pool[0], C.msh_pin_pool_free)
  if pool and gpu and C.msh_pin_pool_is_pinned(pool) == 0 then
    -- the driver refused to lock the memory: a GPU cannot reach ordinary host memory
    C.msh_pin_pool_free(ffi.gc(pool, nil))
    pool, msg = nil, string.format("page-locking %.1f MiB of host memory was refused", bytes / 2 ^ 20)
  end
  if not pool then
    msg = msg:gsub(" %(offload%.c:%d+%)", ""):gsub(", or stream from disk%)", ")")
    if opts.pin == true then error(string.format("%s: the KV cache: %s", what, msg), 0) end
    warn(string.format("%s: the KV cache: %s; keeping it in %s (--pin-memory makes this an error)", what, msg,
      gpu and ("the memory of " .. device) or "pageable memory"))
    return nil
  end
  local mapped = gpu
  -- a tensor of the arena's device over the next buffer of the pool, zero-filled (the pool's
  -- memory is); raises when the pool is full
  local function alloc(shape, dt)
    local bytes = nbytes(shape, dt)
    fail(C.msh_pin_pool_take(pool, out_tensor, bytes))
    local buf = out_tensor[0]
    for i = 1, #shape do shape_buf[i - 1] = shape[i] end
    local s = C.msh_tensor_view_bytes(out_tensor, buf, 0, core.dtypes[dt], #shape, shape_buf)
    C.msh_tensor_free(buf)
    fail(s)
    local t = out_tensor[0]
    if mapped then
      local host = t
      s = C.msh_tensor_map_host(out_tensor, host, kind, index)
      C.msh_tensor_free(host)
      fail(s)
      t = out_tensor[0]
    end
    return ffi.gc(t, C.msh_tensor_free)
  end
  local a = require("moonshard.arena").new(device, { alloc = alloc, on_close = function()
    -- the pool's memory goes with the last view, freed before this
    if pool then C.msh_pin_pool_free(ffi.gc(pool, nil)) end
    pool = nil
  end })
  a.pinned, a.mapped, a.capacity = C.msh_pin_pool_is_pinned(pool) ~= 0, mapped, bytes
  -- What the cache holds: { bytes, capacity, pinned, mapped } for telemetry and bench.
  a.info = function(self)
    return { bytes = self.bytes, capacity = self.capacity, pinned = self.pinned, mapped = self.mapped }
  end
  return a
end

return M
