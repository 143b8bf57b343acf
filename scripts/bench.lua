-- Benchmark prefill and decode speed; prints one JSON object per configuration.
local args = require "moonshard.args"
local cjson = require "cjson"
local uv = require "luv"

local opts = args.parse(arg, {
  usage = "moonshard bench (--model PATH | --dummy CONFIG) [options]",
  summary = "Times prefill of --prompt-len tokens and greedy decode of --gen-len tokens, --loops times.",
  { "model", "string", "model directory or checkpoint" },
  { "dummy", "string", "config.json of a model to build with random weights" },
  { "batch-size", "int", "sequences per step (1 for now)", default = 1, min = 1, max = 1 },
  { "prompt-len", "int", "prompt tokens", default = 32, min = 1 },
  { "gen-len", "int", "generated tokens", default = 200, min = 1 },
  { "loops", "int", "timed repetitions (the median is reported)", default = 5, min = 1 },
  { "warmup", "int", "untimed repetitions first", default = 1, min = 0 },
  { "threads", "int", "CPU threads (default: all cores)", min = 1 },
  { "device", "string", "cpu or cuda[:N]", default = "cpu" },
})
if not opts.model and not opts.dummy then
  io.stderr:write("moonshard bench: give --model PATH or --dummy CONFIG\n")
  os.exit(2)
end

local moonshard = require "moonshard"
if opts.threads then moonshard.C.msh_set_num_threads(opts.threads) end

local desc, err, name
if opts.dummy then
  desc, err = require("moonshard.loaders.dummy").load(opts.dummy)
  name = opts.dummy
else
  local loaded
  loaded, err = require("moonshard.loader").load(opts.model)
  desc = loaded and loaded.desc
  name = opts.model
end
if not desc then
  io.stderr:write("moonshard bench: ", err, "\n")
  os.exit(1)
end
local need = opts.prompt_len + opts.gen_len
if need > desc.max_seq then
  io.stderr:write(string.format("moonshard bench: prompt-len + gen-len = %d exceeds the context of %d\n", need, desc.max_seq))
  os.exit(1)
end
local stage = require("moonshard.stage").resident(desc.weights, opts.device,
  { dtype = opts.device == "cpu" and "f32" or "bf16" })
local net = require("moonshard.models.llama").new(desc, { device = opts.device, stage = stage, max_seq = need })

local prompt = {}
for i = 1, opts.prompt_len do prompt[i] = (i * 7919) % desc.vocab_size end
local argmax_out = require("ffi").new("int32_t[1]")
local host_logits = opts.device ~= "cpu" and moonshard.tensor.new({ 1, desc.vocab_size }, "f32", "cpu")

local function next_token(logits)
  if host_logits then logits = host_logits:copy_from(logits) end
  return moonshard.ops.argmax(logits, argmax_out)
end

local function once()
  net:reset()
  local t0 = uv.hrtime()
  local logits = assert(net:forward(prompt, 0))
  local id = next_token(logits)
  local t1 = uv.hrtime()
  for _ = 2, opts.gen_len do
    logits = assert(net:forward(id))
    id = next_token(logits)
  end
  local t2 = uv.hrtime()
  return (t1 - t0) / 1e9, (t2 - t1) / 1e9
end

for _ = 1, opts.warmup do once() end
local pre, dec = {}, {}
for i = 1, opts.loops do pre[i], dec[i] = once() end
local function median(t)
  table.sort(t)
  local n = #t
  return n % 2 == 1 and t[(n + 1) / 2] or (t[n / 2] + t[n / 2 + 1]) / 2
end
local p, d = median(pre), median(dec)
local params = 0
local function count(t) params = params + t:numel() end
count(desc.weights.embed)
if desc.weights.output ~= desc.weights.embed then count(desc.weights.output) end
for _, lw in ipairs(desc.weights.layers) do for _, t in pairs(lw) do count(t) end end
print(cjson.encode {
  model = name, device = opts.device, threads = moonshard.C.msh_get_num_threads(),
  batch_size = opts.batch_size, prompt_len = opts.prompt_len, gen_len = opts.gen_len, loops = opts.loops,
  params = params,
  prefill_tok_s = opts.prompt_len / p, time_to_first_token_s = p,
  decode_tok_s = (opts.gen_len - 1) / d,
  total_tok_s = (opts.prompt_len + opts.gen_len) / (p + d),
})
