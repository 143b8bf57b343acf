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
--   opts.batch (sequences model:forward_batch runs at once, default 1), opts.kv_blocks and
--   opts.block_size (a paged KV cache of kv_blocks blocks: model:step takes block tables; see
--   moonshard.runner), opts.step_tokens (without opts.chunk: the most tokens a step of the
--   serving engine computes; the activation buffers hold that many rows, batch x chunk, rather
--   than batch x 256), opts.kv_dtype (default moonshard.memplan.kv_dtype's)
-- Offloading and ZeRO-3 (moonshard.offload): opts.offload "host" (--cpu-offload; with
--   opts.offload_dir the disk where host memory cannot hold the layers) or "disk"
--   (--disk-offload) with opts.offload_dir, opts.pin (true / false / nil: pinned where allowed),
--   opts.prefetch (layers ahead), opts.zero = 3 (each data-parallel rank keeps 1/R of every layer,
--   all-gathered just in time; without an offload tier the parts stay on the device)
--   opts.kv_offload = true (--kv-offload): the KV cache in pinned host memory, which the device's
--   kernels read and write across the link (moonshard.kv_offload; opts.pin applies to it too)
function M.load(path, opts)
  opts = opts or {}
  -- before any weight or pinned buffer is allocated: this rank's NUMA node (moonshard.topology.bind)
  local numa, nerr = M.bind_numa(opts)
  if not numa then return nil, nerr end
  local loaded, err = require("moonshard.loader").load(path, opts)
  if not loaded then return nil, err end
  return M.build(loaded.desc, opts, { path = path, tokenizer = loaded.tokenizer })
end

-- M.build(desc, opts, from?) -> model | nil, message: a model from a description already made
-- (moonshard.loader's, or moonshard.loaders.dummy's random weights of a config.json); opts as
-- M.load's; from.path names it in messages (and in --disk-offload's identity), from.tokenizer is
-- its tokenizer (none: prompts are given as token ids), from.par a moonshard.parallel setup made
-- already (this rank's slice), from.identity the disk tier's identity in place of the files'.
function M.build(desc0, opts, from)
  opts, from = opts or {}, from or {}
  local numa, nerr = M.bind_numa(opts) -- once per process: M.load's binding stands
  if not numa then return nil, nerr end
  local path, err = from.path or "model"
  local device = opts.device or "cpu"
  -- tensor / pipeline parallel: this rank's slice of the weights and its run of layers
  local par = from.par
  if opts.zero and opts.zero ~= 0 and opts.zero ~= 3 then
    return nil, string.format("--zero %s: only ZeRO stage 3 (partitioned weights) exists for inference", tostring(opts.zero))
  end
  local zero = opts.zero == 3
  if par then
    device = par.device or device
  elseif (opts.tp or 1) > 1 or (opts.pp or 1) > 1 or opts.dist or zero then
    par, err = require("moonshard.parallel").setup(desc0, opts)
    if not par then return nil, err end
    device = par.device or device
  end
  local desc = par and par.desc or desc0
  local chunk = opts.chunk
  if not chunk and opts.step_tokens then
    local batch = opts.batch or 1
    chunk = math.ceil(math.max(opts.step_tokens, batch) / batch)
  end
  local net
  net, err = require("moonshard.runner").build(desc, {
    device = device, max_seq = opts.max_seq, chunk = chunk,
    kv_dtype = opts.kv_dtype or require("moonshard.memplan").kv_dtype(device, opts.dtype), batch = opts.batch,
    kv_blocks = opts.kv_blocks, block_size = opts.block_size, kv_offload = opts.kv_offload,
    dtype = opts.dtype or (device ~= "cpu" and "bf16" or nil), float_dtype = "f32", fuse = opts.fuse,
    layers = par and par.layers, embed = not par or par.first_stage, head = not par or par.last_stage,
    tp_comm = par and par.tp_comm, pp_comm = par and par.pp_comm, graphs = opts.graphs,
    offload = opts.offload, offload_dir = opts.offload_dir, offload_readonly = opts.offload_readonly,
    pin = opts.pin, prefetch = opts.prefetch, queue_depth = opts.queue_depth,
    zero_comm = zero and par and par.dp_comm or nil, rank = par and par.rank or 0,
    identity = (opts.offload == "disk" or opts.offload_dir) and (from.identity or M.identity(path, opts, par)) or nil,
  })
  if not net then return nil, string.format("'%s' on %s: %s", path, device, err) end
  return setmetatable({
    desc = desc0, tokenizer = from.tokenizer, net = net, path = path,
    dist = par and par.pg, rank = par and par.rank or 0, par = par,
  }, Model)
end

-- M.bind_numa(opts) -> binding | nil, message: binds this process to the NUMA node of its GPU
-- (opts.device "cuda[:i]"; under moonshard launch, cuda means cuda:LOCAL_RANK) or, for CPU ranks
-- sharing a machine of several NUMA nodes, to its share of them ($MOONSHARD_NUMA: off, auto, N).
function M.bind_numa(opts)
  local id = require("moonshard.dist").identity()
  local local_rank, local_world = 0, 1
  if id then local_rank, local_world = id.local_rank, id.local_world end
  local device = opts.device or "cpu"
  if device == "cuda" then device = "cuda:" .. local_rank end
  return require("moonshard.topology").bind { device = device, local_rank = local_rank, local_world = local_world }
end

-- The checkpoint's identity for the disk tier's file: every file of the model (path, size,
-- mtime), the dtype asked for, and the rank's slice (tp, pp and dp coordinates and sizes).
function M.identity(path, opts, par)
  local uv = require "luv"
  local parts = { path, tostring(opts.dtype) }
  local function add(p)
    local st = uv.fs_stat(p)
    if st and st.type == "file" then
      parts[#parts + 1] = string.format("%s:%d:%d.%d", p, st.size, st.mtime.sec, st.mtime.nsec)
    end
  end
  local st = uv.fs_stat(path)
  if st and st.type == "directory" then
    local names = {}
    local h = uv.fs_scandir(path)
    while h do
      local name = uv.fs_scandir_next(h)
      if not name then break end
      names[#names + 1] = name
    end
    table.sort(names)
    for _, n in ipairs(names) do add(path .. "/" .. n) end
  else
    add(path)
  end
  if par then
    local c = par.pg and par.pg.coords or {}
    parts[#parts + 1] = string.format("tp%s/%s pp%s/%s dp%s zero%s", tostring(c.tp), tostring(opts.tp),
      tostring(c.pp), tostring(opts.pp), tostring(c.dp), tostring(opts.zero))
  end
  return table.concat(parts, "|")
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

-- model:score(ids, first) -> { logprobs, greedy, sum, is_greedy } | nil, message: the
-- log-probabilities of tokens ids[first + 1 ..] (positions first .. #ids - 1, 0-based) given the
-- tokens before each, and whether each was the greedy pick; the head runs over those positions
-- only. model:score_batch(reqs) does the same for a list of { ids, first } side by side (up to
-- opts.batch at once); see moonshard.score.
function Model:score(ids, first) return require("moonshard.score").score(self.net, ids, first) end
function Model:score_batch(reqs) return require("moonshard.score").score_batch(self.net, reqs) end

M.Model = Model
return M
