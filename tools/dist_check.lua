-- tools/dist_check.lua: a distributed self-check for any launcher (moonshard launch, srun,
-- torchrun-style variables): rendezvous, world communicator, one all-reduce, one barrier.
--
--   moonshard launch -n 2 tools/dist_check.lua
--   srun -n 2 build/moonshard tools/dist_check.lua
--   moonshard launch -n 2 tools/dist_check.lua --backend nccl     (GPU ranks)
--
-- Every rank prints one line "rank R of W (source S, local L of N, host H): sum ok"; the exit
-- status is 0 when every check passed.
local args = require "moonshard.args"
local opts = args.parse(arg, {
  usage = "moonshard tools/dist_check.lua [--backend tcp|nccl] [--timeout S]",
  { "backend", "string", "tcp or nccl", default = "tcp" },
  { "timeout", "number", "rendezvous timeout in seconds", default = 60 },
})
local dist = require "moonshard.dist"
local tensor = require "moonshard.tensor"

local device = opts.backend == "nccl" and ("cuda:" .. (os.getenv("LOCAL_RANK") or os.getenv("SLURM_LOCALID") or "0"))
  or "cpu"
local pg, err = dist.init { timeout = opts.timeout, backend = opts.backend, device = device }
if not pg then
  io.stderr:write("dist_check: ", err, "\n")
  os.exit(1)
end
local t = assert(tensor.from({ pg.rank + 1, 1 }):to("f32", pg.device))
local ok, cerr = pg.comm:all_reduce(t)
if not ok then
  io.stderr:write("dist_check: rank ", pg.rank, ": ", cerr, "\n")
  os.exit(1)
end
local v = t:values()
local W = pg.world
local good = v[1] == W * (W + 1) / 2 and v[2] == W
assert(pg.comm:barrier())
print(string.format("rank %d of %d (source %s, local %d of %d, host %s): sum %s", pg.rank, W, pg.source,
  pg.local_rank, pg.local_world, pg.hosts[pg.rank + 1], good and "ok" or "WRONG"))
pg:close()
os.exit(good and 0 or 1)
