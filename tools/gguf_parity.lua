-- Logit parity of moonshard against tools/gguf_reference.py (gguf + NumPy, float64).
--
--   moonshard tools/gguf_parity.lua [--model PATH] [--fixture JSON] [--full F32FILE] [--free]
--
-- For each prompt of the fixture: prefill the prompt in one pass, then feed the reference's
-- greedy tokens one at a time, comparing at every step the top logits the fixture lists (and,
-- with --full, every logit of the reference's --dump file). --free lets moonshard continue with
-- its own greedy choices and reports where they part from the reference. Prints one JSON object.
local args = require "moonshard.args"
local cjson = require "cjson"
local host = require "moonshard.host"

local opts = args.parse(arg, {
  usage = "moonshard tools/gguf_parity.lua [options]",
  { "model", "string", "GGUF file", default = host.root .. "/.cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" },
  { "fixture", "string", "reference JSON", default = host.root .. "/tests/fixtures/gguf/smollm2_reference.json" },
  { "full", "string", "reference full logits (gguf_reference.py --dump)" },
  { "free", "flag", "continue with moonshard's own greedy tokens instead of the reference's" },
  { "dtype", "string", "weights on the CPU: f32 (default: dequantized), native (as the file has them: Q4_1 multiplied in integers), f16 or bf16", default = "f32" },
})

local moonshard = require "moonshard"
local ffi = require "ffi"

local f = assert(io.open(opts.fixture, "rb"))
local ref = cjson.decode(f:read("*a"))
f:close()
local full = opts.full and assert(io.open(opts.full, "rb"))

local m = assert(moonshard.load(opts.model, { dtype = opts.dtype, max_seq = 1024 }))
local V = m.desc.vocab_size
local max_top, max_full, agree, total, first_split = 0, 0, 0, 0, {}
for c, case in ipairs(ref.cases) do
  m:reset()
  local logits = assert(m:forward(case.prompt_ids, 0))
  local own = {}
  for step = 1, ref.steps do
    local p = ffi.cast("float*", logits:data())
    local top = case.top[step]
    for i, id in ipairs(top.ids) do
      local d = math.abs(p[id] - top.logits[i])
      if d > max_top then max_top = d end
    end
    if full then
      local bytes = full:read(V * 4)
      local r = ffi.cast("const float*", bytes)
      for i = 0, V - 1 do
        local d = math.abs(p[i] - r[i])
        if d > max_full then max_full = d end
      end
    end
    local mine = m:argmax(logits)
    own[step] = mine
    total = total + 1
    if mine == case.greedy[step] then agree = agree + 1
    elseif not first_split[c] then first_split[c] = step end
    if step < ref.steps then
      logits = assert(m:forward(opts.free and mine or case.greedy[step]))
    end
  end
  io.stderr:write(string.format("prompt %d: %s\n", c, m.tokenizer:decode(own):gsub("\n", "\\n")))
end
local splits = {}
for c = 1, #ref.cases do splits[c] = first_split[c] or cjson.null end
print(cjson.encode {
  model = opts.model, prompts = #ref.cases, steps = ref.steps,
  greedy_agreement = string.format("%d/%d", agree, total),
  first_disagreement_step = splits,
  max_abs_diff_top_logits = max_top,
  max_abs_diff_all_logits = full and max_full or cjson.null,
})
