-- Strong and weak scaling over ranks: `moonshard bench` under `moonshard launch -n tp*pp` with
-- tensor and pipeline parallelism on CPU ranks (TCP communicator; the same flags on GPUs).
--
--   moonshard sweep examples/sweeps/scaling.lua               # stories260K, up to 4 ranks, ~20 s
--
-- Strong scaling: batch 8 on 1, 2 and 4 ranks. Weak scaling: 2 sequences a rank (batch 2 on one
-- rank, 4 on two, 8 on four). Plots: strong_scaling.png and weak_scaling.png against the ideal
-- line (speed-up = ranks), latency_vs_tp.png. On a machine with fewer cores than ranks each rank
-- gets one thread, so the curves show the communication cost rather than a speed-up.
local root = require("moonshard.host").root
return {
  name = "scaling",
  command = "bench",
  model = root .. "/../shared/data/models/stories260K",
  flags = { ["prompt-len"] = 32, ["gen-len"] = 32, loops = 3, ["no-ceilings"] = true, threads = 1 },
  axes = { tp = { 1, 2 }, pp = { 1, 2 }, batch = { 2, 4, 8 } },
  where = function(p) return p.batch == 8 or p.batch == 2 * p.world end,
}
