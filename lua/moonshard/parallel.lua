-- moonshard.parallel: turns a loaded model description into this rank's part of a tensor x
-- pipeline parallel run. Ranks come from moonshard.dist (the launcher's, torchrun's or Slurm's
-- variables and the rendezvous); the slicing and stage balancing are the policies in
-- moonshard.policy.shard and moonshard.policy.pipeline.
local M = {}

-- M.setup(desc, opts) -> { desc, pg, tp_comm, pp_comm, layers, rank, device } | nil, message
--   opts.tp, opts.pp      degrees (default 1)
--   opts.pp_layers        "0-12,13-25": the layers of each stage (default: balanced by cost)
--   opts.vocab_parallel   false: every tensor-parallel rank keeps the whole output head
--   opts.pp_balance       "decode" (default) or "prefill": what the balance evens out
--                         (moonshard.policy.pipeline)
--   opts.dist             an existing process group (moonshard.dist.init) to reuse
--   opts.device           "cpu" (TCP between ranks) or "cuda" (NCCL; each rank on its local GPU)
function M.setup(desc, opts)
  local tp, pp = opts.tp or 1, opts.pp or 1
  local pg, err = opts.dist
  if not pg then
    local device = opts.device
    if device and device:match("^cuda$") then device = nil end -- one GPU per local rank
    pg, err = require("moonshard.dist").init {
      tp = tp, pp = pp, device = device or (opts.device == "cuda" and "cuda" or opts.device),
      backend = (opts.device or "cpu"):match("^cuda") and "nccl" or "tcp",
    }
    if not pg then return nil, err end
  end
  if pg.world % (tp * pp) ~= 0 then
    return nil, string.format("%d ranks do not form tensor-parallel %d x pipeline %d groups", pg.world, tp, pp)
  end
  local c = pg.coords or { tp = 0, pp = 0, dp = 0 }
  local sliced
  sliced, err = require("moonshard.policy.shard").slice(desc, tp, c.tp, { vocab_parallel = opts.vocab_parallel })
  if not sliced then return nil, err end
  local ranges
  ranges, err = require("moonshard.policy.pipeline").plan(desc, pp, { layers = opts.pp_layers, balance = opts.pp_balance })
  if not ranges then return nil, err end
  return {
    desc = sliced, pg = pg, rank = pg.rank, world = pg.world,
    tp_comm = tp > 1 and pg.tp or nil, pp_comm = pp > 1 and pg.pp or nil,
    -- the data-parallel ranks (world / (tp * pp)) holding the same slice: ZeRO-3's partition group
    dp_comm = pg.dp, dp_size = pg.dp and pg.dp:size() or 1, dp_rank = c.dp,
    layers = ranges[c.pp + 1], stages = ranges,
    first_stage = c.pp == 0, last_stage = c.pp == pp - 1,
    device = pg.device ~= "cpu" and pg.device or nil,
  }
end

-- M.agree(pg, n) -> rank 0's integer n on every rank (a seed drawn from the clock, say).
function M.agree(pg, n)
  local tensor = require "moonshard.tensor"
  local dev = pg.comm:device()
  local t = assert(tensor.new({ 1 }, "i32", "cpu"))
  t:set_values { n }
  if dev ~= "cpu" then t = t:to("i32", dev) end
  assert(pg.comm:broadcast(t, 0))
  if dev ~= "cpu" then t = t:to("i32", "cpu") end
  return t:item(0)
end

return M
