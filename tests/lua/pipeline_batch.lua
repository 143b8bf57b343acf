-- A batch of N sequences of stories260K: greedy tokens from the micro-batched pipeline
-- (moonshard.schedule) on pipeline ranks, or from one rank's batched forward passes (the
-- reference). Prints "tokens <json>" (the last stage) and, on the pipeline, its bubble.
--   moonshard launch -n 2 pipeline_batch.lua pp N M GEN [lookahead|-] [cuda]
--   moonshard pipeline_batch.lua ref N 1 GEN [-] [cuda]
-- With cuda, every rank runs on its GPU (f32 weights and cache; NCCL between the stages).
local stories = require("moonshard.host").root .. "/../shared/data/models/stories260K"
local cjson = require "cjson"
local mode, N, m, G, lookahead = arg[1], tonumber(arg[2]), tonumber(arg[3]), tonumber(arg[4]), arg[5] == "lookahead"
local gpu = arg[6] == "cuda"
local dev_opts = gpu and { dtype = "f32", kv_dtype = "f32" } or {}
local moonshard = require "moonshard"
local ffi = require "ffi"

local L = 7
local function prompts_for(V)
  local prompts = {}
  for b = 1, N do
    prompts[b] = { 1 }
    for i = 2, L do prompts[b][i] = (i * 37 + b * 101) % V end
  end
  return prompts
end

if mode == "ref" then
  local model = assert(moonshard.load(stories, { batch = N, device = gpu and "cuda:0" or nil, dtype = dev_opts.dtype,
    kv_dtype = dev_opts.kv_dtype }))
  local net = model.net
  local prompts = prompts_for(net.vocab_size)
  local out, ids, steps = {}, ffi.new("int32_t[?]", N), {}
  for b = 1, N do out[b], steps[b] = {}, { 0 } end
  local logits = assert(net:forward_batch(prompts, 0, 0))
  for r = 1, G do
    moonshard.ops.argmax(logits, ids)
    for b = 1, N do
      out[b][r] = ids[b - 1]
      steps[b][1] = ids[b - 1]
    end
    if r < G then logits = assert(net:forward_batch(steps, L + r - 1, 0)) end
  end
  print("tokens " .. cjson.encode(out))
  return
end

local telemetry = require "moonshard.telemetry"
local schedule = require "moonshard.schedule"
local model = assert(moonshard.load(stories, { pp = 2, batch = N, device = gpu and "cuda" or nil,
  dtype = dev_opts.dtype, kv_dtype = dev_opts.kv_dtype }))
local net = model.net
local tel = telemetry.null { rank = model.rank }
net.hooks = tel:stage_hooks(net.device, net.pp_rank)
local probe = net.hooks.probe
assert(model.dist.comm:barrier())
probe:window_begin()
local tokens = schedule.run(net, { prompts = net.pp_rank == 0 and prompts_for(net.vocab_size) or nil, batch = N,
  prompt_len = L, gen_len = G, micro_batches = m, lookahead = lookahead })
assert(model.dist.comm:barrier())
probe:window_end()
local s = probe:summary()
print(string.format("stage %d passes %d busy %.6f idle %.6f bubble %.4f", net.pp_rank, s.passes, s.busy_s, s.idle_s,
  s.bubble))
if net.pp_rank == net.pp_size - 1 then print("tokens " .. cjson.encode(tokens)) end
