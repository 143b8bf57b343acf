-- moonshard.stage: who owns a model's weights. A layer asks its stage for its weights right
-- before it runs (acquire) and hands them back after (release). The resident stage keeps every
-- weight on one device; streaming stages (pinned host memory, NVMe, ZeRO partitions) implement
-- the same five methods and prefetch ahead of acquire.
local M = {}

local Resident = {}
Resident.__index = Resident

local tensor = require "moonshard.tensor"
local quantized = require("moonshard.core").quantized
local function block_elems(dtype)
  local core = require "moonshard.core"
  return core.C.msh_dtype_block_elems(core.dtypes[dtype])
end

-- The dtype a weight gets on a device (kind 0: the CPU): `dtype` when given ("native": keep the
-- weight's own), else float_dtype for float weights. Block-quantized weights stay quantized on
-- the CPU unless a dtype is named; on a GPU they become bf16 unless "native" (or a block dtype)
-- is named. Blocks are for matrices only: a block-quantized dtype named (GGUF's, or a group-wise
-- i8g64, i4g64 ... quantized here) leaves other weights (norms) alone, and matrices whose rows
-- are not whole blocks, and block-quantized weights of other shapes, become float.
local function target_dtype(t, kind, dtype, float_dtype)
  local own = t:dtype()
  if dtype == "native" then
    -- a GPU's matmul and embedding take blocks too (dequantized in the kernel)
    if kind ~= 0 and t:is_quantized() and t:ndim() == 2 then return own end
    dtype, float_dtype = nil, nil
  end
  -- blocks are for matrices whose rows are whole blocks (a row of 172 stays float under i8g64)
  if dtype and quantized[dtype] and (t:ndim() ~= 2 or t:size(2) % block_elems(dtype) ~= 0) then dtype = nil end
  if t:is_quantized() then
    if t:ndim() ~= 2 then return dtype or float_dtype or "f32" end -- only matrices use blocks
    if kind == 0 then return dtype or own end
    return dtype or "bf16"
  end
  return dtype or float_dtype or own
end

-- The dtype of the token embedding and the output head under `dtype`: int4 group-wise ones keep
-- them in int8 (as GGUF's Q4 files keep them in Q8_0 or Q6_K: the head's error reaches every
-- logit directly; measured on SmolLM2-135M, README "Quantized weights").
local function edge_dtype(dtype)
  local g = type(dtype) == "string" and dtype:match("^i4g(%d+)$")
  return g and "i8g" .. g or dtype
end
M.edge_dtype = edge_dtype

-- Moves (or keeps) a weight on `device` in the dtype target_dtype picks.
local function place(t, device, dtype, float_dtype)
  local kind, index = tensor.device_id(device)
  local same = t:device() == (kind == 0 and "cpu" or "cuda:" .. index)
  local want = target_dtype(t, kind, dtype, float_dtype)
  if same and t:dtype() == want and t:is_contiguous() then return t end
  return t:to(want, device)
end
M.target_dtype = target_dtype

-- Several weights (N_i, K) of one dtype on `device` stacked into one (sum N_i, K) weight (or
-- vectors (N_i) into one (sum N_i): biases), drawn or copied part by part straight into its rows;
-- nil when their shapes or target dtypes differ.
local function fuse(parts, device, dtype, float_dtype)
  local kind = tensor.device_id(device)
  local want = target_dtype(parts[1], kind, dtype, float_dtype)
  local nd = parts[1]:ndim()
  local K, rows = parts[1]:size(2), 0
  for _, p in ipairs(parts) do
    if p:ndim() ~= nd or nd > 2 or (nd == 2 and p:size(2) ~= K)
      or target_dtype(p, kind, dtype, float_dtype) ~= want then return nil end
    rows = rows + p:size(1)
  end
  local out = assert(tensor.new(nd == 2 and { rows, K } or { rows }, want, device))
  local ok, err = pcall(function()
    local off = 0
    for _, p in ipairs(parts) do
      local dst = out:narrow(1, off, p:size(1))
      if type(p) == "table" and p.draw_into then p:draw_into(dst) else dst:copy_from(p) end
      dst:free()
      off = off + p:size(1)
    end
  end)
  if not ok then
    out:free()
    error(err, 0)
  end
  return out
end
M.fuse = fuse

-- The weights of layer w placed on device: each stack the architecture declares (Llama's q/k/v
-- into wqkv, gate/up into w_gu; moonshard.models) as one weight where its parts fuse (the model
-- then runs one projection for each), the rest one by one.
local function place_layer(w, device, dtype, float_dtype, stacks)
  local t, done = {}, {}
  if stacks then
    for name, group in pairs(stacks) do
      local parts = {}
      for i, k in ipairs(group) do parts[i] = w[k] end
      if #parts == #group then
        t[name] = fuse(parts, device, dtype, float_dtype)
        if t[name] then for _, k in ipairs(group) do done[k] = true end end
      end
    end
  end
  for k, x in pairs(w) do
    if not done[k] then t[k] = place(x, device, dtype, float_dtype) end
  end
  return t
end
M.place_layer = place_layer

-- M.resident(weights, device, opts?) -> stage.
--   opts.dtype   every weight's dtype on the device ("f32", "f16", "bf16", "q8_0" ...); "native"
--                or nil keeps each weight's own dtype (block-quantized weights become bf16 on a GPU)
--   opts.float_dtype  without opts.dtype: the dtype of float weights (block-quantized ones keep
--                theirs on the CPU)
--   opts.layers  { first, last }: only these layers (a pipeline stage); default all
--   opts.embed   false: leave out the token embedding (a stage that receives activations)
--   opts.head    false: leave out the final norm and output head (a stage that sends them on)
--   opts.fuse    false: keep q/k/v and gate/up as separate weights (default: stacked, see place_layer)
--   opts.arch    the architecture's name (moonshard.models; default llama): which weights stack
--   opts.plan    what the model will add on the device, for the memory check made before
--                anything is placed (moonshard.memplan; on the CPU against the memory available,
--                counting the weights placing copies): { desc, max_seq, kv_dtype, chunk, batch,
--                kv_offload, kv_blocks, block_size };
--                nil checks the weights alone, false skips the check
-- Raises when the check fails (the message says what would fit) or a placement fails; nothing
-- placed stays on the device then.
function M.resident(weights, device, opts)
  opts = opts or {}
  device = device or "cpu"
  local dtype, float_dtype = opts.dtype, opts.float_dtype
  if opts.plan ~= false then
    local p = opts.plan or {}
    local desc = setmetatable({ weights = weights }, { __index = p.desc })
    local need, err = require("moonshard.memplan").check(desc, {
      device = device, dtype = dtype, float_dtype = float_dtype, layers = opts.layers, embed = opts.embed,
      head = opts.head, max_seq = p.max_seq, kv_dtype = p.kv_dtype, chunk = p.chunk, batch = p.batch,
      fuse = opts.fuse, kv_offload = p.kv_offload, kv_blocks = p.kv_blocks, block_size = p.block_size,
    })
    if not need then error(err, 0) end
  end
  local self = setmetatable({ device = device, layers = {}, owned = {} }, Resident)
  local stacks = opts.fuse ~= false and require("moonshard.models").get(opts.arch or (opts.plan and opts.plan.desc
    and opts.plan.desc.arch)).arch.stacks or nil
  local ok, err = pcall(function()
    local function own(t, src)
      if t ~= src then self.owned[#self.owned + 1] = t end
      return t
    end
    local want_embed, want_head = opts.embed ~= false, opts.head ~= false
    local edge = edge_dtype(dtype)
    if want_embed then self.embed_w = own(place(weights.embed, device, edge, float_dtype), weights.embed) end
    if want_head then
      self.norm_w = own(place(weights.norm, device, dtype, float_dtype), weights.norm)
      if weights.output == weights.embed and self.embed_w then self.output_w = self.embed_w
      else self.output_w = own(place(weights.output, device, edge, float_dtype), weights.output) end
    end
    local first, last = 1, #weights.layers
    if opts.layers then first, last = opts.layers[1], opts.layers[2] end
    for l = first, last do
      local lw = weights.layers[l]
      local placed = place_layer(lw, device, dtype, float_dtype, stacks)
      for k, t in pairs(placed) do own(t, lw[k]) end
      self.layers[l] = placed
    end
  end)
  if not ok then
    self:free()
    error(err, 0)
  end
  return self
end

-- Frees every weight the stage placed (not the loader's own tensors it kept as they were); the
-- stage is empty afterwards. Placing made no views that outlive it, so the memory is back now.
function Resident:close()
  for i = #self.owned, 1, -1 do self.owned[i]:free() end
  self.owned = {}
  self.layers, self.embed_w, self.norm_w, self.output_w = {}, nil, nil, nil
end
Resident.free = Resident.close

function Resident:embed() return self.embed_w end
function Resident:norm() return self.norm_w end
function Resident:output() return self.output_w end
function Resident:acquire(l) return self.layers[l] end
function Resident:release(_) end

-- M.streaming(weights, device, opts) -> a stage that keeps each layer's weights off the device
-- (pinned host memory, a file on NVMe, or a ZeRO-3 partition over data-parallel ranks) and
-- streams them into a ring of device buffers ahead of acquire: see moonshard.offload.
function M.streaming(weights, device, opts)
  return require("moonshard.offload").stage(weights, device, opts)
end

return M
