-- Run under `moonshard launch -n N` by paged_multi_spec: the serving engine over a paged KV pool
-- on a tp x pp model whose rank 0 drives and whose other ranks follow its runner calls
-- (moonshard.follow), or alone (tp = pp = 1) for the reference. Ragged prompts, some sharing
-- full blocks of a prefix (prefix-cache hits share pool blocks), split in chunks by a small step
-- budget, in a pool too small for all of them at once (preemption and recompute), and one
-- request cancelled mid-answer. Rank 0 prints one JSON line: each request's greedy output ids
-- (batched), on one rank also each prompt's output alone, the engine's block accounting after
-- the run and the calls the other ranks mirrored.
-- usage: paged_rank.lua MODEL TP PP
local moonshard = require "moonshard"
local follow = require "moonshard.follow"
local tp, pp = tonumber(arg[2]), tonumber(arg[3])
-- 14 blocks of 16 positions: the four longest answers at once need more
local model = assert(moonshard.load(arg[1], { tp = tp, pp = pp, batch = 4, kv_blocks = 14, block_size = 16 }))
local group = model.dist and assert(follow.start(model, { name = "paged_rank" }))
if model.rank ~= 0 then return end
local engine = assert(require("moonshard.engine").new(model, { max_batch = 4, max_tokens_per_step = 16 }))
local STORY = "Once upon a time, there was a little girl named Lily. She loved to play outside in the sun. "
local PROMPTS = {
  STORY .. "One day, she saw a big dog",
  "The sun",
  STORY .. "Her friend Ben came to play",
  "Tom had a red ball. He threw it high into the sky and",
  STORY,
  "A cat",
}
local MAX = { 40, 24, 36, 32, 28, 40 }
local CANCEL = 6 -- cancelled from its callback after 3 tokens

local function submit(i, cancel)
  local req
  req = assert(engine:submit { prompt = PROMPTS[i], max_tokens = MAX[i], temperature = 0, ignore_eos = true,
    on_token = cancel and function(r) if #r.output_ids == 3 then engine:cancel(r) end end or nil })
  return req
end

local out = { batched = {} }
local reqs = {}
for i = 1, #PROMPTS do reqs[i] = submit(i, i == CANCEL) end
engine:run()
for i, r in ipairs(reqs) do out.batched[i] = r.output_ids end
out.finish = {}
for i, r in ipairs(reqs) do out.finish[i] = r.finish_reason end
local st = engine:stats()
out.stats = { used = st.kv_blocks_used, free = st.kv_blocks_free, total = st.kv_blocks_total,
  preemptions = st.preemptions, prefix_hits = st.prefix_hits, steps = st.steps }
local ok, err = engine.sched:check()
out.check = ok and true or err
if tp * pp == 1 then -- each prompt alone (the cancelled one too, to its end)
  out.alone = {}
  for i = 1, #PROMPTS do
    local r = submit(i, false)
    engine:run()
    out.alone[i] = r.output_ids
  end
end
out.calls = group and group.calls or 0
io.stdout:write(require("cjson").encode(out), "\n")
io.stdout:flush()
engine:close()
model:close()
