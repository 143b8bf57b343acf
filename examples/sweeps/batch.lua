-- Batch sweep: decode and prefill speed of `moonshard bench` over batch sizes.
--
--   moonshard sweep examples/sweeps/batch.lua                 # stories260K on the CPU, ~10 s
--   moonshard sweep examples/sweeps/batch.lua --model .cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
--
-- Results in runs/batch/ (results.jsonl, one launch descriptor per point), the table on stdout,
-- runs/batch/plots/throughput_vs_batch.png. Add `["--device"] = { "cuda" }` to flags for a GPU.
local root = require("moonshard.host").root
return {
  name = "batch",
  command = "bench",
  model = root .. "/../shared/data/models/stories260K",
  flags = { ["prompt-len"] = 32, ["gen-len"] = 64, loops = 3, ["no-ceilings"] = true },
  axes = { batch = { 1, 2, 4, 8, 16, 32 } },
}
