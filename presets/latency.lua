-- Latency: the fastest token for one sequence; tensor parallelism before any offload.
return {
  name = "latency",
  objective = "latency",         -- the shortest decode step at batch 1
  max_batch = 1,
  min_batch = 1,
  context = 4096,
  kv_share = 0.3,
  kv_dtype = "bf16",
  quantization = { "bf16" },                      -- no rounding of weights
  tiers = { "resident", "host", "disk" },
  max_tp = 8,
  max_prefetch = 4,
}
