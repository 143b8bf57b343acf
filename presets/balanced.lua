-- Balanced: good tokens/s at moderate batches without giving up much latency; the default.
return {
  name = "balanced",
  objective = "balanced",        -- tokens/s at batch <= max_batch, a step at most 2x the fastest plan's
  max_batch = 16,                -- sequences decoded at once
  min_batch = 1,
  context = 4096,                -- positions per sequence (capped by the model's)
  kv_share = 0.5,                -- of the device memory left after weights and activations, for the KV cache
  kv_dtype = "bf16",
  quantization = { "bf16", "i8g64" },            -- weight dtypes allowed on GPUs, preferred first
  tiers = { "resident", "host", "disk" },        -- weight tiers allowed, preferred first
  max_tp = 8,
  max_prefetch = 4,
  latency_slack = 2.0,
}
