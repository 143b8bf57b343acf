-- Run under `moonshard launch -n N` by serve_multi_spec: the serving engine over a tp x pp model
-- whose rank 0 drives and whose other ranks follow its runner calls (moonshard.follow), without
-- HTTP; or alone (tp = pp = 1) for the reference. Rank 0 prints one JSON line: each request's
-- output ids (greedy), the echo request's prompt log-probabilities and the calls it mirrored.
-- usage: follow_rank.lua MODEL TP PP KV_BLOCKS (0: a cache of slots, not paged)
local moonshard = require "moonshard"
local follow = require "moonshard.follow"
local model = assert(moonshard.load(arg[1], { tp = tonumber(arg[2]), pp = tonumber(arg[3]), batch = 4,
  kv_blocks = tonumber(arg[4]) > 0 and tonumber(arg[4]) or nil, block_size = 16 }))
local group = model.dist and assert(follow.start(model, { name = "follow_rank" }))
if model.rank ~= 0 then return end
local engine = assert(require("moonshard.engine").new(model, { max_batch = 4, max_tokens_per_step = 24 }))
local reqs = {}
for i, p in ipairs { "Once upon a time", "Lily and Ben went to the park. They saw a big dog", "The sun",
  "One day, a little bird named Tweet flew over the tall trees and the blue lake and saw", "Tom had a red ball. He" } do
  reqs[i] = assert(engine:submit { prompt = p, max_tokens = 24, temperature = 0 })
end
local echo = assert(engine:submit { prompt = "The cat sat on the mat and looked at the dog", max_tokens = 0, echo = true,
  logprobs = 1 })
engine:run()
local out = { outputs = {}, echo = {} }
for i, r in ipairs(reqs) do out.outputs[i] = r.output_ids end
for i = 2, #echo.prompt_logprobs do out.echo[#out.echo + 1] = echo.prompt_logprobs[i] end
out.calls = group and group.calls or 0
io.stdout:write(require("cjson").encode(out), "\n")
io.stdout:flush()
engine:close()
model:close()
