-- Throughput: the most tokens per second over many sequences; large batches, ZeRO-3 replicas,
-- weight quantization allowed to make room for the KV cache.
return {
  name = "throughput",
  objective = "throughput",      -- tokens/s at the largest batch that fits
  max_batch = 256,
  min_batch = 8,
  context = 2048,
  kv_share = 0.9,
  kv_dtype = "bf16",
  quantization = { "bf16", "i8g64", "i4g64" },
  tiers = { "resident", "host", "disk" },
  max_tp = 8,
  max_prefetch = 4,
}
