-- moonshard.sampler: seeded, reproducible token sampling (temperature, top-k, top-p).
local core = require "moonshard.core"

local ffi, C = core.ffi, core.C

local M = {}
local Sampler = {}
Sampler.__index = Sampler

-- M.first_bad(logits) -> nil when every logit of a contiguous f32 CPU tensor is a number below
-- +inf (-inf masks a token and is allowed), else the 0-based index of the first that is not and
-- its value. One pass over the vocabulary, no allocation (the loop compiles).
function M.first_bad(logits)
  local n = logits:numel()
  local p = ffi.cast("const float*", logits:data())
  local inf = math.huge
  for i = 0, n - 1 do
    local x = p[i]
    if x ~= x or x == inf then return i, x end
  end
  return nil
end

-- M.check_logits(logits, position) -> true | nil, message naming the position and the value
function M.check_logits(logits, position)
  local i, x = M.first_bad(logits)
  if not i then return true end
  return nil, string.format("the logits at position %d are not finite (token id %d: %s): the weights or the "
    .. "computation produced NaN or infinity, so no token can be sampled", position, i, x ~= x and "nan" or "inf")
end

local function check_opt(v, name, lo, hi)
  if v == nil then return end
  if type(v) ~= "number" or v ~= v or v < lo or v > hi then
    error(string.format("sampler: %s must be a number in %s..%s (got %s)", name, lo, hi, tostring(v)), 3)
  end
end

-- M.new{ seed, temperature = 1, top_k = 0, top_p = 1 }
-- temperature must be finite and >= 0, top_p in 0..1, top_k >= 0, seed an integer below 2^53.
function M.new(opts)
  opts = opts or {}
  check_opt(opts.temperature, "temperature", 0, 1e30)
  check_opt(opts.top_p, "top_p", 0, 1)
  check_opt(opts.top_k, "top_k", 0, 2 ^ 31 - 1)
  check_opt(opts.seed, "seed", 0, 2 ^ 53 - 1)
  local out = ffi.new("msh_sampler*[1]")
  core.check(C.msh_sampler_new(out, opts.seed or 0), 2)
  return setmetatable({
    h = ffi.gc(out[0], C.msh_sampler_free),
    temperature = opts.temperature or 1, top_k = opts.top_k or 0, top_p = opts.top_p or 1,
    tok = ffi.new("int32_t[1]"),
  }, Sampler)
end

-- sampler:sample(logits) -> id, for a (V) or (1, V) f32 CPU tensor
function Sampler:sample(logits)
  local s = C.msh_sampler_sample(self.h, logits, self.temperature, self.top_k, self.top_p, self.tok)
  if s ~= 0 then core.check(s, 2) end
  return self.tok[0]
end

function Sampler:reseed(seed)
  C.msh_sampler_reseed(self.h, seed)
end

return M
