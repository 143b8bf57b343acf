-- moonshard: the Lua face of the runtime.
--
--   local moonshard = require "moonshard"
--   local m = assert(moonshard.load("../shared/data/models/stories260K"))
--   local logits = m:forward(m.tokenizer:encode("Once upon a time", true))
--   print(m.tokenizer:piece(m:argmax(logits)))
local core = require "moonshard.core"
local ffi = require "ffi"

local M = {
  core = core,
  C = core.C,
  tensor = require "moonshard.tensor",
  ops = require "moonshard.ops",
  version = ffi.string(core.C.msh_version()),
}

local Model = {}
Model.__index = Model

-- M.load(path, opts?) -> model | nil, message
--   opts.device ("cpu"), opts.max_seq, opts.chunk, opts.kv_dtype, opts.dtype (weights' dtype on
--   the device, or "native" for each weight's own; CPU default: float weights in f32,
--   block-quantized ones (GGUF Q8_0/Q4_0/Q4_1) kept as they are; GPU default "bf16"),
--   opts.tokenizer (path), opts.fuse (false: keep q/k/v and gate/up as separate weights),
--   opts.batch (sequences model:forward_batch runs at once, default 1)
function M.load(path, opts)
  opts = opts or {}
  local loaded, err = require("moonshard.loader").load(path, opts)
  if not loaded then return nil, err end
  local device = opts.device or "cpu"
  -- tensor / pipeline parallel: this rank's slice of the weights and its run of layers
  local par
  if (opts.tp or 1) > 1 or (opts.pp or 1) > 1 or opts.dist then
    par, err = require("moonshard.parallel").setup(loaded.desc, opts)
    if not par then return nil, err end
    device = par.device or device
  end
  local desc = par and par.desc or loaded.desc
  local net
  net, err = require("moonshard.runner").build(desc, {
    device = device, max_seq = opts.max_seq, chunk = opts.chunk, kv_dtype = opts.kv_dtype, batch = opts.batch,
    dtype = opts.dtype or (device ~= "cpu" and "bf16" or nil), float_dtype = "f32", fuse = opts.fuse,
    layers = par and par.layers, embed = not par or par.first_stage, head = not par or par.last_stage,
    tp_comm = par and par.tp_comm, pp_comm = par and par.pp_comm, graphs = opts.graphs,
  })
  if not net then return nil, string.format("'%s' on %s: %s", path, device, err) end
  return setmetatable({
    desc = loaded.desc, tokenizer = loaded.tokenizer, net = net, path = path,
    dist = par and par.pg, rank = par and par.rank or 0,
  }, Model)
end

-- model:close(): frees the model's device and host buffers, its KV cache and its weights now
-- (the model is unusable afterwards).
function Model:close() self.net:close() end

-- model:forward(ids, pos0?, opts?) -> logits tensor (see moonshard.runner)
function Model:forward(ids, pos0, opts) return self.net:forward(ids, pos0, opts) end
-- model:forward_batch(tokens, pos0?, slot0?) -> logits (B, V) of several sequences at once
-- (opts.batch slots; see moonshard.runner)
function Model:step(batch) return self.net:step(batch) end
function Model:forward_batch(tokens, pos0, slot0) return self.net:forward_batch(tokens, pos0, slot0) end
function Model:reset() self.net:reset() end

local argmax_out = ffi.new("int32_t[1]")
-- model:argmax(logits) -> id of the largest logit of the (last) row
function Model:argmax(logits)
  local rows = logits:numel() / logits:size(logits:ndim())
  local row = rows > 1 and logits:narrow(1, rows - 1, 1) or logits
  local host = row:device() == "cpu" and row or row:to("f32", "cpu")
  local id = M.ops.argmax(host, argmax_out)
  if host ~= row then host:free() end
  if row ~= logits then row:free() end
  return id
end

-- model:generate(opts, on_text) -> stats | nil, message (see moonshard.generate)
function Model:generate(opts, on_text)
  return require("moonshard.generate").run(self, opts, on_text or function(s) io.write(s) end)
end

M.Model = Model
return M
