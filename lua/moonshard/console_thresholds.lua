-- The web console's warning thresholds (data only). moonshard.console checks each telemetry
-- sample (once a second) and the served mode against them, server-side, and sends the
-- warnings with the events. Copy this file, edit it and start `moonshard serve` with
-- --console-thresholds FILE to change them.
return {
  -- telemetry, checked on every sample (a series with no source in the run is not checked)
  bubble = 0.25,              -- pipeline bubble: idle share of a stage's time above this
  prefetch_stall_s = 0.05,    -- seconds per second that compute waited for streamed weights
  rank_silent_s = 5,          -- a rank with no telemetry for this many seconds
  queue_length = 64,          -- sequences waiting for a slot
  kv_used_fraction = 0.95,    -- KV-cache blocks in use over all blocks
  ttft_s = 5,                 -- mean time to first token over the last second
  -- the served mode against what `moonshard doctor` finds on this machine
  pinned_fraction = 1.0,      -- pinned host buffers over the pinned memory the process may lock
  gpu_memory_fraction = 0.95, -- weights and KV cache over one GPU's memory
  host_memory_fraction = 0.9, -- weights and KV cache on the CPU over the available RAM
}
