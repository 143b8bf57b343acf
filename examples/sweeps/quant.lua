-- Quantization trade-off: accuracy (moonshard eval) and speed (moonshard bench) of the same model
-- with its weights in f32, bf16, int8 and int4 (group-wise, quantized at load).
--
--   moonshard sweep examples/sweeps/quant.lua                 # stories260K on the CPU, ~1 min
--   moonshard sweep examples/sweeps/quant.lua --model .cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
--
-- The eval points of all widths use the same documents (limit), so the accuracy column moves
-- only with the arithmetic. Plots: accuracy_vs_quant_bits.png, throughput_vs_quant_bits.png.
local root = require("moonshard.host").root
return {
  name = "quant",
  command = { "eval", "bench" },
  model = root .. "/../shared/data/models/stories260K",
  flags = {
    eval = { tasks = "arc_easy,piqa", limit = 200 },
    bench = { ["prompt-len"] = 32, ["gen-len"] = 64, loops = 3, ["no-ceilings"] = true },
  },
  axes = { quant_bits = { 32, 16, 8, 4 } },
}
