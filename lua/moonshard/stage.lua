-- moonshard.stage: who owns a model's weights. A layer asks its stage for its weights right
-- before it runs (acquire) and hands them back after (release). The resident stage keeps every
-- weight on one device; streaming stages (pinned host memory, NVMe, ZeRO partitions) implement
-- the same five methods and prefetch ahead of acquire.
local M = {}

local Resident = {}
Resident.__index = Resident

local tensor = require "moonshard.tensor"
local quantized = require("moonshard.core").quantized

-- The dtype a weight gets on a device (kind 0: the CPU): `dtype` when given ("native": keep the
-- weight's own), else float_dtype for float weights. Block-quantized weights stay quantized on
-- the CPU unless a dtype is named; ops on other devices do not take them, so there they become
-- bf16 (or the float dtype named). Blocks are for matrices only: a block-quantized dtype named
-- leaves other weights (norms) alone, and block-quantized weights of other shapes become float.
local function target_dtype(t, kind, dtype, float_dtype)
  local own = t:dtype()
  if dtype == "native" then dtype, float_dtype = nil, nil end
  if dtype and quantized[dtype] and (t:ndim() ~= 2 or kind ~= 0) then dtype = nil end
  if t:is_quantized() then
    if t:ndim() ~= 2 then return dtype or float_dtype or "f32" end -- only matrices use blocks
    if kind == 0 then return dtype or own end
    return dtype or "bf16"
  end
  return dtype or float_dtype or own
end

-- Moves (or keeps) a weight on `device` in the dtype target_dtype picks.
local function place(t, device, dtype, float_dtype)
  local kind, index = tensor.device_id(device)
  local same = t:device() == (kind == 0 and "cpu" or "cuda:" .. index)
  local want = target_dtype(t, kind, dtype, float_dtype)
  if same and t:dtype() == want and t:is_contiguous() then return t end
  return t:to(want, device)
end
M.target_dtype = target_dtype

-- M.resident(weights, device, opts?) -> stage.
--   opts.dtype   every weight's dtype on the device ("f32", "f16", "bf16", "q8_0" ...); "native"
--                or nil keeps each weight's own dtype (block-quantized weights become bf16 on a GPU)
--   opts.float_dtype  without opts.dtype: the dtype of float weights (block-quantized ones keep
--                theirs on the CPU)
--   opts.layers  { first, last }: only these layers (a pipeline stage); default all
--   opts.embed   false: leave out the token embedding (a stage that receives activations)
--   opts.head    false: leave out the final norm and output head (a stage that sends them on)
function M.resident(weights, device, opts)
  opts = opts or {}
  device = device or "cpu"
  local dtype, float_dtype = opts.dtype, opts.float_dtype
  local self = setmetatable({ device = device, layers = {} }, Resident)
  local want_embed, want_head = opts.embed ~= false, opts.head ~= false
  if want_embed then self.embed_w = place(weights.embed, device, dtype, float_dtype) end
  if want_head then
    self.norm_w = place(weights.norm, device, dtype, float_dtype)
    if weights.output == weights.embed and self.embed_w then self.output_w = self.embed_w
    else self.output_w = place(weights.output, device, dtype, float_dtype) end
  end
  local first, last = 1, #weights.layers
  if opts.layers then first, last = opts.layers[1], opts.layers[2] end
  for l = first, last do
    local t = {}
    for k, w in pairs(weights.layers[l]) do t[k] = place(w, device, dtype, float_dtype) end
    self.layers[l] = t
  end
  return self
end

function Resident:embed() return self.embed_w end
function Resident:norm() return self.norm_w end
function Resident:output() return self.output_w end
function Resident:acquire(l) return self.layers[l] end
function Resident:release(_) end

return M
