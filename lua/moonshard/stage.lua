-- moonshard.stage: who owns a model's weights. A layer asks its stage for its weights right
-- before it runs (acquire) and hands them back after (release). The resident stage keeps every
-- weight on one device; streaming stages (pinned host memory, NVMe, ZeRO partitions) implement
-- the same five methods and prefetch ahead of acquire.
local M = {}

local Resident = {}
Resident.__index = Resident

local tensor = require "moonshard.tensor"

-- Moves (or keeps) a weight on `device`, converting to `dtype` when given.
local function place(t, device, dtype)
  local kind, index = tensor.device_id(device)
  local same = t:device() == (kind == 0 and "cpu" or "cuda:" .. index)
  if same and (not dtype or t:dtype() == dtype) and t:is_contiguous() then return t end
  return t:to(dtype or t:dtype(), device)
end

-- M.resident(weights, device, opts?) -> stage.
--   opts.dtype   converts floating weights at load
--   opts.layers  { first, last }: only these layers (a pipeline stage); default all
--   opts.embed   false: leave out the token embedding (a stage that receives activations)
--   opts.head    false: leave out the final norm and output head (a stage that sends them on)
function M.resident(weights, device, opts)
  opts = opts or {}
  device = device or "cpu"
  local dtype = opts.dtype
  local self = setmetatable({ device = device, layers = {} }, Resident)
  local want_embed, want_head = opts.embed ~= false, opts.head ~= false
  if want_embed then self.embed_w = place(weights.embed, device, dtype) end
  if want_head then
    self.norm_w = place(weights.norm, device, dtype)
    if weights.output == weights.embed and self.embed_w then self.output_w = self.embed_w
    else self.output_w = place(weights.output, device, dtype) end
  end
  local first, last = 1, #weights.layers
  if opts.layers then first, last = opts.layers[1], opts.layers[2] end
  for l = first, last do
    local t = {}
    for k, w in pairs(weights.layers[l]) do t[k] = place(w, device, dtype) end
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
