-- moonshard.rope: rotary position embedding frequencies, as a policy over the model's config.
--   cfg = { theta = 10000, rotary_dim = head_dim, scaling = nil
--           | { type = "linear", factor }
--           | { type = "llama3", factor, low_freq_factor, high_freq_factor,
--               original_max_position_embeddings } },
--         freq_factors = nil | { f1, f2, ... } (divisors per frequency: GGUF rope_freqs.weight) }
-- Returns a Lua array of rotary_dim / 2 inverse frequencies (angle = position * inv_freq[i]).
local M = {}

function M.inv_freq(cfg, head_dim)
  cfg = cfg or {}
  local theta = cfg.theta or 10000
  local rot = cfg.rotary_dim or head_dim
  assert(rot % 2 == 0 and rot <= head_dim, "rotary_dim must be even and at most the head size")
  local inv = {}
  for i = 0, rot / 2 - 1 do
    inv[i + 1] = 1 / theta ^ (2 * i / rot)
  end
  local ff = cfg.freq_factors
  if ff then
    assert(#ff == #inv, "freq_factors must hold rotary_dim / 2 values")
    for i = 1, #inv do inv[i] = inv[i] / ff[i] end
  end
  local sc = cfg.scaling
  if not sc or sc.type == nil or sc.type == "default" then return inv end
  if sc.type == "linear" then
    for i = 1, #inv do inv[i] = inv[i] / sc.factor end
  elseif sc.type == "llama3" then
    local factor, lo, hi = sc.factor, sc.low_freq_factor, sc.high_freq_factor
    local old = sc.original_max_position_embeddings
    local lo_wavelen, hi_wavelen = old / lo, old / hi
    for i = 1, #inv do
      local wavelen = 2 * math.pi / inv[i]
      if wavelen > lo_wavelen then
        inv[i] = inv[i] / factor
      elseif wavelen >= hi_wavelen then
        local smooth = (old / wavelen - lo) / (hi - lo)
        inv[i] = (1 - smooth) * inv[i] / factor + smooth * inv[i]
      end
    end
  else
    error("unsupported rope scaling type '" .. tostring(sc.type) .. "'", 2)
  end
  return inv
end

return M
