-- moonshard.sampler: seeded, reproducible token sampling (temperature, top-k, top-p).
local core = require "moonshard.core"

local ffi, C = core.ffi, core.C

local M = {}
local Sampler = {}
Sampler.__index = Sampler

-- M.new{ seed, temperature = 1, top_k = 0, top_p = 1 }
function M.new(opts)
  opts = opts or {}
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
