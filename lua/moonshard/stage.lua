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
  if same and (not dtype or t:dtype() == dtype) then return t end
  return t:to(dtype or t:dtype(), device)
end

-- M.resident(weights, device, opts?) -> stage. opts.dtype converts floating weights at load.
function M.resident(weights, device, opts)
  device = device or "cpu"
  local dtype = opts and opts.dtype
  local self = setmetatable({ device = device, layers = {} }, Resident)
  self.embed_w = place(weights.embed, device, dtype)
  self.norm_w = place(weights.norm, device, dtype)
  self.output_w = weights.output == weights.embed and self.embed_w or place(weights.output, device, dtype)
  for l, lw in ipairs(weights.layers) do
    local t = {}
    for k, w in pairs(lw) do t[k] = place(w, device, dtype) end
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
