-- Run under `moonshard launch`: loads a Hugging Face test checkpoint with --tp/--pp from the
-- arguments, computes the logits of every reference position, and (rank 0) prints the largest
-- difference from transformers' logits.  usage: parallel_logits.lua NAME TP PP [DEVICE [DTYPE [HEAD]]]
-- (HEAD "replicated": every tensor-parallel rank keeps the whole output head)
local moonshard = require "moonshard"
local ffi = require "ffi"
local host = require "moonshard.host"
local name, tp, pp, device, dtype = arg[1], tonumber(arg[2]), tonumber(arg[3]), arg[4], arg[5]
if device == "-" then device = nil end
if dtype == "-" then dtype = nil end
local vocab_parallel = arg[6] ~= "replicated"
local dir = host.root .. "/tests/fixtures/hf-tiny"
local out = ffi.new("msh_safetensors*[1]")
moonshard.core.check(moonshard.C.msh_safetensors_open(out, dir .. "/reference.safetensors"))
local st = ffi.gc(out[0], moonshard.C.msh_safetensors_free)
local function ref(key)
  local idx, t = ffi.new("int[1]"), ffi.new("msh_tensor*[1]")
  moonshard.core.check(moonshard.C.msh_safetensors_find(st, key, idx))
  moonshard.core.check(moonshard.C.msh_safetensors_tensor(st, idx[0], t))
  return ffi.gc(t[0], moonshard.C.msh_tensor_free):values()
end
local m = assert(moonshard.load(dir .. "/" .. name, { tp = tp, pp = pp, device = device, dtype = dtype,
  vocab_parallel = vocab_parallel }))
local got = assert(m:forward(ref("ids"), 0, { all_logits = true })):values()
local want, diff = ref("logits_" .. name), 0
for i = 1, #want do diff = math.max(diff, math.abs(got[i] - want[i])) end
if m.rank == 0 then print(string.format("max_abs_diff %.3g", diff)) end
