-- Run under `moonshard launch`: loads a Hugging Face test checkpoint with --tp/--pp from the
-- arguments, computes the logits of every reference position, and (rank 0) prints the largest
-- difference from transformers' logits.  usage: parallel_logits.lua NAME TP PP [DEVICE [DTYPE [HEAD]]]
-- (HEAD "replicated": every tensor-parallel rank keeps the whole output head). NAME is a folder
-- of tests/fixtures/hf-tiny, or arch/NAME one of tests/fixtures/arch (reference.safetensors beside).
local moonshard = require "moonshard"
local host = require "moonshard.host"
local name, tp, pp, device, dtype = arg[1], tonumber(arg[2]), tonumber(arg[3]), arg[4], arg[5]
if device == "-" then device = nil end
if dtype == "-" then dtype = nil end
local vocab_parallel = arg[6] ~= "replicated"
package.path = host.root .. "/tests/lua/?.lua;" .. package.path
local h = require "helpers"
local dir, ref, key = h.hf .. "/" .. name, nil, name
if name:match("^arch/") then
  key = name:sub(6)
  dir, ref = h.arch .. "/" .. key, h.arch .. "/reference.safetensors"
end
local m = assert(moonshard.load(dir, { tp = tp, pp = pp, device = device, dtype = dtype,
  vocab_parallel = vocab_parallel }))
local got = assert(m:forward(h.reference("ids", ref), 0, { all_logits = true })):values()
local diff = h.max_abs_diff(got, h.reference("logits_" .. key, ref))
if m.rank == 0 then print(string.format("max_abs_diff %.3g", diff)) end
