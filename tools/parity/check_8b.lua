-- Parity of moonshard's bf16 Llama-3-8B shape with transformers' on the same random weights:
-- loads DIR (made by tools/parity/hf_8b.py) on a GPU in bf16, computes the top-1 token at each of
-- the reference's 512 positions and greedy continuations of its 10 prompts, and prints one JSON
-- object comparing them with transformers' answers (reference.json).
--
--   moonshard tools/parity/check_8b.lua DIR [--device cuda:0] [--kv-dtype bf16]
--
-- top1_agreement counts a position as agreeing when our top-1 token is one of the tokens tied
-- for transformers' largest bf16 logit (its logits are rounded to bf16, so several tokens can
-- share the top value; top1_agreement_strict asks for its argmax itself). prompts_identical:
-- prompts whose 64 greedy tokens are all transformers' bf16 ones. The f32 fields compare with
-- transformers on the same weights in f32 (how far bf16 itself moves the answers). The load
-- fields time placing the weights from the files (page cache, staging buffers) on the device.
-- top1_agreement_stable and top1_agreement_decisive restrict top1_agreement to the positions where
-- transformers' own answer does not hinge on rounding: where its bf16 and f32 top-1 agree, and
-- where its bf16 top-1 leads the runner-up by at least decisive_gap (random weights give near-flat
-- logits, so most positions are neither; they are reported, not part of the pass).
-- Exit status 0 when top1_agreement >= --min-top1 and prompts_identical >= --min-prompts,
-- 1 when below, 2 when the check could not run.
local args = require "moonshard.args"
local cjson = require "cjson"
local uv = require "luv"

local opts, pos = args.parse(arg, {
  usage = "moonshard tools/parity/check_8b.lua DIR [options]", positional = true,
  { "device", "string", "GPU to run on", default = "cuda" },
  { "kv-dtype", "string", "KV cache dtype", default = "bf16" },
  { "min-top1", "number", "least top-1 agreement that passes", default = 0.99 },
  { "min-prompts", "int", "least number of identical greedy continuations that passes", default = 9 },
})
local dir = pos[1]
local function fail(msg)
  io.stderr:write("check_8b: ", msg, "\n")
  os.exit(2)
end
if not dir then fail("give the directory written by tools/parity/hf_8b.py") end

local f = io.open(dir .. "/reference.json", "rb")
if not f then fail(string.format("'%s/reference.json' is missing: run python3 tools/parity/hf_8b.py %s first", dir, dir)) end
local ref = cjson.decode(f:read("*a"))
f:close()

local moonshard = require "moonshard"
local C, ffi = moonshard.C, require "ffi"
local kind, index = moonshard.tensor.device_id(opts.device)

local function sync() moonshard.core.check(C.msh_device_sync(kind, index)) end

-- load: the weights from the mapped files to the device
local gen = #ref.greedy_bf16[1]
local max_seq = math.max(#ref.ids, #ref.prompts[1] + gen)
local t0 = uv.hrtime()
local m, err = moonshard.load(dir, { device = opts.device, dtype = "bf16", kv_dtype = opts.kv_dtype, max_seq = max_seq })
if not m then fail(err) end
sync()
local load_s = (uv.hrtime() - t0) / 1e9
local file_bytes = 0
do
  local w = m.desc.weights
  local function add(t) file_bytes = file_bytes + t:nbytes() end
  add(w.embed); add(w.norm)
  if w.output ~= w.embed then add(w.output) end
  for _, lw in ipairs(w.layers) do
    for _, t in pairs(lw) do add(t) end
  end
end

-- top-1 at every position of the fixed sequence
local T = #ref.ids
t0 = uv.hrtime()
local logits = assert(m:forward(ref.ids, 0, { all_logits = true }))
local top = ffi.new("int32_t[?]", T)
moonshard.core.check(C.msh_op_argmax(logits, top))
logits:free()
local forward_s = (uv.hrtime() - t0) / 1e9

local strict, tied, vs_f32, hf_vs_f32 = 0, 0, 0, 0
-- the same agreement restricted to positions where transformers' answer is stable: its bf16 and
-- f32 runs agree (stable), or its bf16 top-1 leads the runner-up by at least DECISIVE (decisive)
local DECISIVE = 0.125 -- four bf16 steps at logits of magnitude 4 to 8
local stable_n, stable_hit, decisive_n, decisive_hit = 0, 0, 0, 0
local misses = {}
for i = 1, T do
  local ours = top[i - 1]
  local want = ref.top1_bf16[i]
  if ours == want then strict = strict + 1 end
  local hit = false
  for _, t in ipairs(ref.ties_bf16[i] or { want }) do
    if t == ours then hit = true break end
  end
  if want == ref.top1_f32[i] then
    stable_n = stable_n + 1
    if hit then stable_hit = stable_hit + 1 end
  end
  local l5 = ref.top5_logits_bf16[i]
  if l5 and l5[2] and l5[1] - l5[2] >= DECISIVE then
    decisive_n = decisive_n + 1
    if hit then decisive_hit = decisive_hit + 1 end
  end
  if hit then tied = tied + 1
  elseif #misses < 10 then
    -- transformers' logit gap between its top-1 and ours (when ours is in its top 5)
    local gap
    for k, t in ipairs(ref.top5_bf16[i]) do
      if t == ours then gap = ref.top5_logits_bf16[i][1] - ref.top5_logits_bf16[i][k] end
    end
    misses[#misses + 1] = { position = i - 1, ours = ours, transformers = want, transformers_f32 = ref.top1_f32[i],
      transformers_gap = gap or "not in its top 5" }
  end
  if ours == ref.top1_f32[i] then vs_f32 = vs_f32 + 1 end
  if want == ref.top1_f32[i] then hf_vs_f32 = hf_vs_f32 + 1 end
end

-- greedy continuations
t0 = uv.hrtime()
local identical, identical_f32, first_diff = 0, 0, {}
for p, prompt in ipairs(ref.prompts) do
  m:reset()
  local out = {}
  local lg = assert(m:forward(prompt, 0))
  for k = 1, gen do
    local id = m:argmax(lg)
    out[k] = id
    if k < gen then lg = assert(m:forward(id)) end
  end
  local d, d32
  for k = 1, gen do
    if not d and out[k] ~= ref.greedy_bf16[p][k] then d = k - 1 end
    if not d32 and out[k] ~= ref.greedy_f32[p][k] then d32 = k - 1 end
  end
  if not d then identical = identical + 1 end
  if not d32 then identical_f32 = identical_f32 + 1 end
  first_diff[p] = d or -1
end
local greedy_s = (uv.hrtime() - t0) / 1e9

local top1 = tied / T
local result = {
  check = "llama3_8b_parity_bf16", device = opts.device, kv_dtype = opts.kv_dtype,
  positions = T, top1_agreement = top1, top1_agreement_strict = strict / T,
  top1_agreement_vs_transformers_f32 = vs_f32 / T, transformers_bf16_vs_f32_top1 = hf_vs_f32 / T,
  stable_positions = stable_n, top1_agreement_stable = stable_n > 0 and stable_hit / stable_n or cjson.null,
  decisive_positions = decisive_n, decisive_gap = DECISIVE,
  top1_agreement_decisive = decisive_n > 0 and decisive_hit / decisive_n or cjson.null,
  prompts = #ref.prompts, gen = gen, prompts_identical = identical, prompts_identical_vs_f32 = identical_f32,
  transformers_bf16_vs_f32_prompts_identical = ref.meta and ref.meta.hf_bf16_vs_f32_prompts_identical,
  first_difference = first_diff, misses = misses,
  min_top1 = opts.min_top1, min_prompts = opts.min_prompts,
  load_s = load_s, load_bytes = file_bytes, load_GBps = file_bytes / load_s / 1e9,
  forward_512_s = forward_s, greedy_s = greedy_s,
  transformers = ref.meta and ref.meta.transformers, torch = ref.meta and ref.meta.torch,
}
result.pass = top1 >= opts.min_top1 and identical >= opts.min_prompts
print(cjson.encode(result))
os.exit(result.pass and 0 or 1)
