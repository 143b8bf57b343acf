-- Run under `moonshard launch -n 2` by live_spec: a long-running rank of a tensor-parallel job
-- (stories260K split --tp 2) that takes REPL sessions (moonshard.live) until a session sets
-- `live.stop = true`, or 60 s pass.  usage: live_rank.lua MODEL TP
local moonshard = require "moonshard"
local uv = require "luv"
local m = assert(moonshard.load(arg[1], { tp = tonumber(arg[2]) or 2 }))
-- a scheduler for the sessions to try changing (the driver's, on rank 0)
local sched = require("moonshard.scheduler").new { slots = 1, max_seq = 64 }
local live = assert(require("moonshard.live").listen { name = "live_rank", model = m, pg = m.dist, scheduler = sched })
local deadline = uv.now() + 60000
local t = uv.new_timer()
t:start(50, 50, function()
  if live.stop or uv.now() > deadline then
    t:close()
    live:close()
  end
end)
