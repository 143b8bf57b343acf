-- moonshard.loaders.dummy: a model of any registered architecture with random weights (normal, std 0.02; norms near 1) from a
-- Hugging Face style config.json, for benchmarks of shapes whose weights are not at hand.
--
-- Weights are lazy: nothing is allocated until a stage places a weight on its device, where it
-- is drawn directly (on a GPU by a kernel). Slicing a lazy weight (tensor parallelism) gives a
-- lazy weight of the slice's shape with its own seed, so a rank draws only its own slices: the
-- values of a slice are therefore not those of the same rows of the unsliced weight.
local hf = require "moonshard.loaders.hf"
local tensor = require "moonshard.tensor"
local cjson = require "cjson.safe"

local M = {}

local Lazy = {}
Lazy.__index = Lazy

local function lazy(shape, seed, mean)
  return setmetatable({ dims = shape, seed = seed, mean = mean or 0, dt = "f32" }, Lazy)
end
M.lazy = lazy

function Lazy:shape()
  local s = {}
  for i, d in ipairs(self.dims) do s[i] = d end
  return s
end
function Lazy:ndim() return #self.dims end
function Lazy:size(i) return self.dims[i] end
function Lazy:numel()
  local n = 1
  for _, d in ipairs(self.dims) do n = n * d end
  return n
end
function Lazy:dtype() return self.dt end
function Lazy:device() return "lazy" end
function Lazy:is_contiguous() return true end
function Lazy:is_quantized() return false end

function Lazy:narrow(dim, start, len)
  local s = self:shape()
  s[dim] = len
  return lazy(s, self.seed * 1000003 + dim * 7919 + start, self.mean)
end

local quantized = require("moonshard.core").quantized

-- Draws the weight on a device: a new tensor of dtype holding mean + 0.02 * normal values (a
-- block-quantized dtype gets them drawn in f32, then quantized).
function Lazy:to(dtype, device)
  dtype, device = dtype or "f32", device or "cpu"
  if quantized[dtype] then
    local f = self:to("f32", device)
    local q = f:to(dtype, device)
    f:free()
    return q
  end
  local t, err = tensor.new(self.dims, dtype, device)
  if not t then error(err, 2) end
  return t:randn(self.seed, self.mean, 0.02)
end

-- Draws the weight into t, a tensor of its shape (a block of rows of a fused weight, say).
function Lazy:draw_into(t)
  if t:is_quantized() then
    local f = self:to("f32", t:device())
    t:copy_from(f)
    f:free()
    return
  end
  t:randn(self.seed, self.mean, 0.02)
end

function Lazy:values() return self:to("f32", "cpu"):values() end

function Lazy:__tostring()
  return string.format("lazy(%s)", table.concat(self.dims, "x"))
end

-- M.load(config_path) -> desc | nil, message
function M.load(path)
  local f, err = io.open(path, "rb")
  if not f then return nil, string.format("cannot read '%s': %s", path, err) end
  local cfg, jerr = cjson.decode(f:read("*a"))
  f:close()
  if type(cfg) ~= "table" then return nil, string.format("'%s' is not valid JSON: %s", path, tostring(jerr)) end
  local ok, d = pcall(hf.parse_config, cfg, path)
  if not ok then return nil, d end
  local seed = 1
  local function rnd(shape, mean)
    seed = seed + 1
    return lazy(shape, seed, mean)
  end
  -- every weight the architecture declares; norms drawn around 1, the rest around 0
  local models = require "moonshard.models"
  local arch = models.get(d.arch).arch
  local sizes = models.sizes(d)
  local function draw(e)
    if e.tied and d.tie then return false end
    return rnd(models.shape(e, sizes), e[1]:match("norm$") and 1 or 0)
  end
  local w = { layers = {} }
  for _, e in ipairs(arch.globals) do w[e[1]] = draw(e) or w[e.tied] end
  for l = 1, d.n_layers do
    local lw = {}
    for _, e in ipairs(arch.layer) do lw[e[1]] = draw(e) end
    w.layers[l] = lw
  end
  d.weights = w
  d.format = "dummy"
  d.path = path
  return d
end

return M
