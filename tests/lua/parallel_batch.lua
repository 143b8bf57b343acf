-- Run under `moonshard launch`: loads a Hugging Face test checkpoint with --tp/--pp from the
-- arguments and opts.batch 3, compares model:forward_batch with each sequence run alone through
-- model:forward (tests/lua/batch_check.lua), and (rank 0) prints the largest difference and the
-- rows compared.  usage: parallel_batch.lua NAME TP PP [DEVICE [DTYPE]]
local moonshard = require "moonshard"
local host = require "moonshard.host"
package.path = host.root .. "/tests/lua/?.lua;" .. package.path
local check = require "batch_check"
local name, tp, pp, device, dtype = arg[1], tonumber(arg[2]), tonumber(arg[3]), arg[4], arg[5]
local m = assert(moonshard.load(host.root .. "/tests/fixtures/hf-tiny/" .. name,
  { tp = tp, pp = pp, device = device, dtype = dtype, batch = 3 }))
local diff, rows = check.run(m, m, m.desc.vocab_size)
if m.rank == 0 then print(string.format("max_abs_diff %.3g rows %d", diff, rows)) end
