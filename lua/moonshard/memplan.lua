-- moonshard.memplan: what a model needs on a device before anything is placed there (weights in
-- the dtypes the stage will give them, the KV cache, activation buffers and scratch), checked
-- against the device's free memory. When it does not fit, the message says by how much and what
-- would fit: the smallest tensor/pipeline-parallel degrees, the longest context, a smaller dtype.
-- On the CPU the check is against the memory available (MemAvailable), and only the weights that
-- placing allocates count: one used in place is a view of the mapped file.
--
-- Pure arithmetic over the description's shapes and plain numbers: M.estimate and M.check take
-- the free memory as an argument (opts.free_bytes) so that the policy runs and is tested on a
-- CPU-only machine; only M.check without it asks the device.
local core = require "moonshard.core"
local ffi = core.ffi
local C = core.C

local M = {}

local GiB = 1024 ^ 3
local MiB = 1024 ^ 2

-- Bytes the CUDA side keeps beyond the model's own buffers: cuBLAS workspaces, CUDA graphs,
-- the staging conversion scratch and the allocator's rounding. The context itself is already
-- gone from the free memory the device reports.
M.GPU_RESERVE = 256 * MiB
-- Most GPUs one tensor-parallel group spans (one node).
M.MAX_TP = 8

local dtype_cache = {}
-- Bytes per element of a dtype name (fractional for block-quantized ones).
local function elem_bytes(name)
  local b = dtype_cache[name]
  if b then return b end
  local id = core.dtypes[name]
  if not id then error("unknown dtype '" .. tostring(name) .. "'", 3) end
  b = tonumber(C.msh_dtype_block_bytes(id)) / C.msh_dtype_block_elems(id)
  dtype_cache[name] = b
  return b
end
M.elem_bytes = elem_bytes

-- M.kv_dtype(device, dtype) -> the KV cache's dtype when none is asked: f32 on the CPU; on a GPU
-- the weights' own when they are f32 or f16, bf16 otherwise (16-bit caches read half the bytes of
-- f32 and take the tensor-core attention kernels). The runner and the planner both use it.
function M.kv_dtype(device, dtype)
  if (device or "cpu") == "cpu" then return "f32" end
  return (dtype == "f32" or dtype == "f16") and dtype or "bf16"
end

local function numel(t)
  local n = 1
  for _, d in ipairs(t:shape()) do n = n * d end
  return n
end

-- "cuda:1" -> "cuda", 1 ; "cpu" -> "cpu", 0
local function parse_device(device)
  device = device or "cpu"
  local kind, idx = device:match("^(%a+):?(%d*)$")
  if kind ~= "cpu" and kind ~= "cuda" then return nil end
  return kind, tonumber(idx) or 0
end

-- Which part of a tensor-parallel layer's weight a rank keeps, from the architecture's
-- declaration (moonshard.models): a column- or row-parallel weight the rank's share of its unit
-- (query heads, KV heads or feed-forward rows), anything else all of it.
local function share(arch, name, p, d)
  local e = arch.by_name[name]
  if p.tp == 1 or not e or not e.shard or e.shard == "vocab" then return 1 end
  if e.unit == "q" then return p.heads / d.n_heads end
  if e.unit == "kv" then return p.kv_heads / d.n_kv_heads end
  return p.hidden / d.hidden_dim
end

-- Bytes of one weight placed on a device of `kind` (0: CPU) with the stage's dtype rule.
local function placed_bytes(t, kind, dtype, float_dtype)
  local target = require("moonshard.stage").target_dtype(t, kind, dtype, float_dtype)
  return numel(t) * elem_bytes(target), target
end

-- Whether the stage keeps weight t as it is on the CPU (a view of the mapped file, no new
-- memory): already a contiguous CPU tensor in its target dtype (moonshard.stage's place). Drawn
-- (lazy), converted and stacked weights are new tensors.
local function kept_in_place(t, dtype, float_dtype)
  return t:device() == "cpu" and t:is_contiguous()
    and t:dtype() == require("moonshard.stage").target_dtype(t, 0, dtype, float_dtype)
end

-- The names of layer weights lw that moonshard.stage stacks into one new tensor (its fuse: every
-- part present, matrices of one width or vectors, one target dtype), as a set.
local function stacked(lw, stacks, kind, dtype, float_dtype)
  local out = {}
  if not stacks then return out end
  local target_dtype = require("moonshard.stage").target_dtype
  for _, group in pairs(stacks) do
    local first = lw[group[1]]
    local ok = first ~= nil and first:ndim() <= 2
    if ok then
      local nd, want = first:ndim(), target_dtype(first, kind, dtype, float_dtype)
      for _, k in ipairs(group) do
        local p = lw[k]
        if not p or p:ndim() ~= nd or (nd == 2 and p:size(2) ~= first:size(2))
          or target_dtype(p, kind, dtype, float_dtype) ~= want then ok = false break end
      end
    end
    if ok then for _, k in ipairs(group) do out[k] = true end end
  end
  return out
end

-- M.estimate(desc, opts) -> need: bytes a model needs on one device.
--   opts.device       "cpu" or "cuda[:i]" (decides the weights' dtypes as moonshard.stage does)
--   opts.dtype, opts.float_dtype   as moonshard.stage.resident
--   opts.kv_dtype     the KV cache's dtype (default "f32", as the model's)
--   opts.max_seq      context length (default and at most desc.max_seq)
--   opts.batch        sequences sharing the device (KV cache per sequence; default 1)
--   opts.chunk        tokens per forward pass (default min(256, max_seq))
--   opts.layers       { first, last } layers held (default all); opts.embed / opts.head = false
--                     leave out the embedding / the final norm and output head
--   opts.tp           tensor-parallel degree to apply to desc (default 1: desc as it is)
--   opts.fuse         false: the layers keep q/k/v and gate/up apart (as moonshard.stage's opts.fuse)
--   opts.kv_offload   true: the KV cache lives in pinned host memory (--kv-offload)
--   opts.kv_blocks    a paged KV cache (moonshard serve, moonshard.load's kv_blocks): a pool of
--                     kv_blocks blocks of opts.block_size (default 16) positions shared by the
--                     batch, counted instead of batch x max_seq positions (true: batch x
--                     ceil(max_seq / block_size) blocks, as the runner makes), with the step's
--                     staging rows and block tables among the activations
-- need = { weights, in_place, kv, act, scratch, total, host, params, kv_per_position, weights_dtype,
--          kv_dtype, max_seq, batch, tp, layers = { first, last }, cpu, kv_blocks, block_size }
--          (kv_blocks, block_size: the paged pool's, nil without one)
-- Two columns: `total` is what the device holds, `host` what lives in (pinned) host memory, the
-- KV cache under opts.kv_offload (then in `kv` and `host`, not in `total`). On the CPU both are
-- the one memory, and a check counts their sum.
-- On the CPU `weights` counts only the weights placing allocates (drawn, converted to another
-- dtype, or stacked); those used in place from the mapped file are `in_place` bytes, not in total.
function M.estimate(desc, opts)
  opts = opts or {}
  local kind_name = parse_device(opts.device) or "cpu"
  local kind = kind_name == "cpu" and 0 or 1
  local tp = opts.tp or 1
  local plan = { tp = 1, heads = desc.n_heads, kv_heads = desc.n_kv_heads, hidden = desc.hidden_dim }
  if tp > 1 then
    local p, err = require("moonshard.policy.shard").plan(desc, tp)
    if not p then return nil, err end
    plan = p
  end
  local w = desc.weights
  local first, last = 1, desc.n_layers or (w and #w.layers) or 0
  if opts.layers then first, last = opts.layers[1], opts.layers[2] end
  local want_embed, want_head = opts.embed ~= false, opts.head ~= false
  local weights, in_place, params, dtypes = 0, 0, 0, {}
  local function add(t, share, new_tensor)
    local b, target = placed_bytes(t, kind, opts.dtype, opts.float_dtype)
    share = share or 1
    params = params + numel(t) * share
    if kind == 0 and not new_tensor and kept_in_place(t, opts.dtype, opts.float_dtype) then
      in_place = in_place + b * share
      return
    end
    weights = weights + b * share
    dtypes[target] = (dtypes[target] or 0) + b * share
  end
  if w then
    if want_embed then add(w.embed) end
    if want_head then
      add(w.norm)
      if not (w.output == w.embed and want_embed) then add(w.output) end
    end
    local arch = require("moonshard.models").get(desc.arch).arch
    local stacks = kind == 0 and opts.fuse ~= false and arch.stacks or nil
    for l = first, last do
      local lw = w.layers[l]
      local new = stacked(lw, stacks, kind, opts.dtype, opts.float_dtype)
      for name, t in pairs(lw) do add(t, share(arch, name, plan, desc), new[name]) end
    end
  end
  -- the dtype holding most of the bytes names the weights in messages
  local main, most = nil, -1
  for dt, b in pairs(dtypes) do
    if b > most then main, most = dt, b end
  end
  local batch = opts.batch or 1
  local kv_dtype = opts.kv_dtype or "f32"
  local max_seq, kv, act, kv_per_position, T = 0, 0, 0, 0, 0
  local kv_blocks, block_size
  local D = desc.dim
  if D then -- a whole description (weights alone: only they are counted)
    max_seq = math.min(opts.max_seq or desc.max_seq, desc.max_seq)
    local hd = desc.head_dim or D / desc.n_heads
    local H, KVH, F, V = plan.heads, plan.kv_heads, plan.hidden, desc.vocab_size
    kv_per_position = (last - first + 1) * 2 * KVH * hd * elem_bytes(kv_dtype) * batch
    kv = kv_per_position * max_seq
    if opts.kv_blocks then -- the pool holds the positions, whatever the batch
      block_size = opts.block_size or 16
      kv_blocks = opts.kv_blocks == true and batch * math.ceil(max_seq / block_size) or opts.kv_blocks
      kv = kv_per_position / batch * kv_blocks * block_size
    end
    -- the model's activation buffers (f32), for chunk x batch rows: x, h, o (D); q, att (H hd);
    -- gate (F); the stacked projections' outputs ((H + 2 KVH) hd, 2F), or with opts.fuse = false
    -- the separate ones' k, v (KVH hd) and up (F); ids, pos (i32); per sequence its last row,
    -- norm, logits and start; the last row and its logits
    T = math.min(opts.chunk or 256, max_seq) * batch
    local proj = opts.fuse == false and 2 * KVH * hd + F or (H + 2 * KVH) * hd + 2 * F
    act = 4 * (T * (3 * D + 2 * H * hd + F + proj + 2) + batch * (2 * D + V + 1) + D + V)
    if desc.vocab_local and desc.tp then -- a vocabulary-parallel head's columns and their gather
      act = act + 4 * desc.vocab_local * (batch + 1 + desc.tp.size * batch)
    end
    if kv_blocks then -- the step's k, v rows before the pool (f32), its slots, q_start, ctx_len,
      -- last_rows and block table (i32)
      act = act + 4 * (2 * T * KVH * hd + T + 3 * batch + 1 + batch * math.ceil(max_seq / block_size))
    end
    T = T * math.max(D, F, H * hd) -- elements of the widest activation, for the scratch below
  end
  -- device scratch: activations converted to 16 bits for the GEMMs, plus the fixed reserve
  local scratch = 0
  if kind == 1 then scratch = T * 2 * 1.25 + M.GPU_RESERVE end
  local host = opts.kv_offload and kv or 0
  return {
    weights = weights, in_place = in_place, kv = kv, act = act, scratch = scratch,
    total = weights + kv - host + act + scratch, host = host, cpu = kind == 0,
    params = params, kv_per_position = kv_per_position, weights_dtype = main or opts.dtype or "f32",
    kv_dtype = kv_dtype, max_seq = max_seq, batch = batch, tp = tp, layers = { first, last },
    kv_blocks = kv_blocks, block_size = block_size,
  }
end

-- ------------------------------------------------------------------------------ messages

-- bytes in GiB, or MiB / KiB below one of the larger unit (a small model's parts are not "0.0 GiB")
local function gib(b)
  if b >= GiB then return string.format("%.1f GiB", b / GiB) end
  if b >= MiB then return string.format("%.1f MiB", b / MiB) end
  return string.format("%.1f KiB", b / 1024)
end

local function count_str(n)
  if n >= 1e12 then return string.format("%.2fT", n / 1e12) end
  if n >= 1e9 then return string.format("%.1fB", n / 1e9) end
  if n >= 1e6 then return string.format("%.1fM", n / 1e6) end
  return string.format("%.0fK", n / 1e3)
end

-- "a 70.6B-parameter model (80 layers, hidden size 8192)": all of it, whatever one device holds.
function M.describe(desc)
  local n = 0
  local w = desc.weights
  if w then
    n = numel(w.embed) + numel(w.norm) + (w.output ~= w.embed and numel(w.output) or 0)
    for _, lw in ipairs(w.layers) do
      for _, t in pairs(lw) do n = n + numel(t) end
    end
  end
  if desc.tp then n = nil end -- a rank's slice: its count would mislead
  if not desc.dim then return string.format("a model of %s parameters", count_str(n or 0)) end
  local shape = string.format("%d layers, hidden size %d", desc.n_layers, desc.dim)
  if not n then return string.format("this rank's slice of a model (%s)", shape) end
  return string.format("a %s-parameter model (%s)", count_str(n), shape)
end

-- ---------------------------------------------------------------------------- suggestions

-- (on the CPU the host column is the same memory as the device's)
local function fits(need, free) return need.total + (need.cpu and need.host or 0) <= free end

-- Largest x in [lo, hi] with ok(x) (ok monotone: true up to some point), or nil.
local function largest(lo, hi, ok)
  if hi < lo or not ok(lo) then return nil end
  while lo < hi do
    local mid = math.floor((lo + hi + 1) / 2)
    if ok(mid) then lo = mid else hi = mid - 1 end
  end
  return lo
end

-- The tensor-parallel degrees desc allows, ascending, up to limit.
local function tp_degrees(desc, limit)
  local shard = require "moonshard.policy.shard"
  local list = {}
  for tp = 2, limit do
    if shard.plan(desc, tp) then list[#list + 1] = tp end
  end
  return list
end

-- The most any stage of a pp-stage pipeline (balanced as moonshard.policy.pipeline does) needs
-- at tensor-parallel degree tp, or nil when desc cannot be split so.
local function pipeline_need(desc, opts, tp, pp)
  local ranges = require("moonshard.policy.pipeline").plan(desc, pp)
  if not ranges then return nil end
  local worst
  for s, r in ipairs(ranges) do
    local o = {}
    for k, v in pairs(opts) do o[k] = v end
    o.tp, o.layers, o.embed, o.head = tp, r, s == 1, s == #ranges
    local need = M.estimate(desc, o)
    if not need then return nil end
    if not worst or need.total > worst.total then worst = need end
  end
  return worst
end

-- Whether every matrix of desc has rows that split into whole blocks of dtype (a block-quantized
-- dtype needs that; any other always fits).
local function blocks_fit(desc, dtype)
  local id = core.dtypes[dtype]
  local blk = tonumber(C.msh_dtype_block_elems(id))
  if blk <= 1 or not desc.weights then return true end
  local function ok(t) return t:ndim() ~= 2 or t:size(2) % blk == 0 end
  local w = desc.weights
  if not (ok(w.embed) and ok(w.output)) then return false end
  for _, lw in ipairs(w.layers) do
    for _, t in pairs(lw) do if not ok(t) then return false end end
  end
  return true
end

-- What would fit on devices with `free` bytes each: a list of { flag = "--tp 2", ... } entries.
-- On the CPU no parallel degrees (ranks on one machine share its memory).
function M.suggest(desc, opts, free)
  local out = {}
  local base = M.estimate(desc, opts)
  if not desc.dim then return out end -- weights alone: no shapes to plan with
  local cpu = parse_device(opts.device) ~= "cuda"
  local tp0 = desc.tp and desc.tp.size or 1 -- desc may already be one rank's slice
  -- tensor parallel alone, inside one node
  local tps = cpu and {} or tp_degrees(desc, math.max(1, math.floor(M.MAX_TP / tp0)))
  local best_tp
  for _, tp in ipairs(tps) do
    local o = setmetatable({ tp = tp }, { __index = opts })
    local need = M.estimate(desc, o)
    if need and fits(need, free) then best_tp = tp break end
  end
  if best_tp then
    out[#out + 1] = { flag = string.format("--tp %d", best_tp * tp0),
      note = string.format("%d GPUs like this one", best_tp * tp0) }
  elseif desc.n_layers > 1 and not cpu then
    -- tensor parallel as wide as a node allows, then the fewest pipeline stages
    local tp = tps[#tps] or 1
    local lo = 2
    -- a lower bound first (every stage holds at least 1/pp of the layers), then the real plans
    while lo <= desc.n_layers do
      local need = pipeline_need(desc, opts, tp, lo)
      if need and fits(need, free) then break end
      lo = lo + math.max(1, math.floor(lo / 8))
    end
    if lo <= desc.n_layers then
      -- step back to the smallest count that fits (the step above may have overshot)
      local pp = lo
      while pp > 2 do
        local need = pipeline_need(desc, opts, tp, pp - 1)
        if not (need and fits(need, free)) then break end
        pp = pp - 1
      end
      local flag = tp > 1 and string.format("--tp %d --pp %d", tp * tp0, pp) or string.format("--pp %d", pp)
      out[#out + 1] = { flag = flag, note = string.format("%d GPUs like this one", tp * tp0 * pp) }
    end
  end
  -- the largest value below the current one of an option that fits with the others unchanged
  local function largest_fitting(key)
    if base[key] <= 1 then return nil end
    return largest(1, base[key] - 1, function(v)
      return fits(M.estimate(desc, setmetatable({ [key] = v }, { __index = opts })), free)
    end)
  end
  -- a shorter context (the KV cache shrinks; the model's weights stay)
  local s = largest_fitting("max_seq")
  if s then
    if s >= 512 then s = s - s % 256 end
    out[#out + 1] = { flag = string.format("--max-seq %d", s), max_seq = s }
  end
  -- fewer sequences at once
  local b = largest_fitting("batch")
  if b then out[#out + 1] = { flag = string.format("--batch-size %d", b), batch = b } end
  -- a smaller paged pool (moonshard serve --kv-blocks)
  if base.kv_blocks then
    local nb = largest_fitting("kv_blocks")
    if nb then out[#out + 1] = { flag = string.format("--kv-blocks %d", nb), kv_blocks = nb } end
  end
  -- 16-bit weights or cache instead of f32; on the CPU the first of 16-bit, 8-bit and 4-bit
  -- weights that fits (weights used in place from the file may cost less than converted ones)
  if cpu then
    for _, dt in ipairs { "bf16", "q8_0", "q4_0" } do
      local need = blocks_fit(desc, dt) and M.estimate(desc, setmetatable({ dtype = dt }, { __index = opts }))
      if need and dt ~= opts.dtype and need.total < base.total and fits(need, free) then
        out[#out + 1] = { flag = "--dtype " .. dt, dtype = dt }
        break
      end
    end
  elseif base.weights_dtype == "f32" then
    local o = setmetatable({ dtype = "bf16" }, { __index = opts })
    if fits(M.estimate(desc, o), free) then out[#out + 1] = { flag = "--dtype bf16" } end
  end
  if base.kv_dtype == "f32" then
    local o = setmetatable({ kv_dtype = "bf16" }, { __index = opts })
    if fits(M.estimate(desc, o), free) then out[#out + 1] = { flag = "--kv-dtype bf16" } end
  end
  -- on a GPU, the KV cache in pinned host memory
  if not cpu and not opts.kv_offload and base.kv > 0 then
    local o = setmetatable({ kv_offload = true }, { __index = opts })
    if fits(M.estimate(desc, o), free) then
      out[#out + 1] = { flag = "--kv-offload", note = string.format("%s of KV cache in pinned host memory", gib(base.kv)) }
    end
  end
  return out
end

-- ----------------------------------------------------------------------------------- check

-- Available and total bytes of the CPU's memory from the text of /proc/meminfo (MemAvailable:
-- what can be allocated without swapping, reclaimable page cache included), or nil, message.
function M.parse_meminfo(text)
  local avail = text:match("MemAvailable:%s*(%d+) kB")
  local total = text:match("MemTotal:%s*(%d+) kB")
  if not avail then return nil, "no MemAvailable in /proc/meminfo" end
  return tonumber(avail) * 1024, total and tonumber(total) * 1024
end

-- The CPU's available and total bytes now, or nil, message where /proc/meminfo cannot be read.
function M.cpu_memory()
  local f, err = io.open("/proc/meminfo", "r")
  if not f then return nil, err end
  local text = f:read("*a")
  f:close()
  return M.parse_meminfo(text or "")
end

-- Free and total bytes of a device, or nil, message (naming how many GPUs there are when the
-- device does not exist). On the CPU: the memory available and the total (M.cpu_memory).
function M.device_memory(device)
  local kind, idx = parse_device(device)
  if not kind then return nil, string.format("unknown device '%s' (want cpu or cuda[:N])", tostring(device)) end
  if kind == "cpu" then return M.cpu_memory() end
  if C.msh_has_cuda() == 0 then
    -- the CUDA module did not load (absent from the build, or no driver): the loader says why
    return nil, string.format("%s does not exist: %s (use --device cpu)", device,
      ffi.string(C.msh_last_error()):gsub("^.-CUDA is not available: ", "CUDA is not available: "))
  end
  local n = ffi.new("int[1]")
  core.check(C.msh_device_count(C.MSH_CUDA, n))
  local count = n[0]
  if idx >= count then
    if count == 0 then return nil, string.format("%s does not exist: no CUDA GPU is present (use --device cpu)", device) end
    return nil, string.format("%s does not exist: this machine has %d GPU%s (cuda:0%s)", device, count,
      count == 1 and "" or "s", count == 1 and "" or " to cuda:" .. (count - 1))
  end
  local f, t = ffi.new("uint64_t[1]"), ffi.new("uint64_t[1]")
  local ok, msg = core.try(C.msh_device_mem_info(C.MSH_CUDA, idx, f, t))
  if not ok then return nil, msg end
  return tonumber(f[0]), tonumber(t[0])
end

-- M.check(desc, opts) -> need | nil, message. opts as M.estimate, plus opts.free_bytes and
-- opts.total_bytes (default: asked from the device now; on the CPU the memory available, and
-- nothing is checked where /proc/meminfo cannot be read). The message names the model, what it
-- needs by part, what the device has and what would fit.
function M.check(desc, opts)
  opts = opts or {}
  local device = opts.device or "cpu"
  local kind = parse_device(device)
  if not kind then return nil, string.format("unknown device '%s' (want cpu or cuda[:N])", tostring(device)) end
  local need, err = M.estimate(desc, opts)
  if not need then return nil, err end
  local free, total = opts.free_bytes, opts.total_bytes
  if not free then
    free, total = M.device_memory(device)
    if not free then
      if kind == "cpu" then return need end
      return nil, total
    end
  end
  if fits(need, free) then return need end
  local wdesc = need.weights_dtype
  if need.in_place > 0 then wdesc = string.format("%s; %s more used in place from the file", wdesc, gib(need.in_place)) end
  local parts = { string.format("%s of weights (%s)", gib(need.weights), wdesc) }
  local positions = need.kv_blocks and string.format("a pool of %d blocks x %d positions", need.kv_blocks,
    need.block_size) or string.format("%d positions x %d", need.max_seq, need.batch)
  if need.max_seq > 0 and need.host == 0 then
    parts[#parts + 1] = string.format("%s of KV cache (%s, %s)", gib(need.kv), need.kv_dtype, positions)
  elseif need.max_seq > 0 and kind == "cpu" then
    parts[#parts + 1] = string.format("%s of KV cache in pinned memory (%s, %s)", gib(need.kv), need.kv_dtype,
      positions)
  end
  parts[#parts + 1] = string.format("%s of activations and scratch", gib(need.act + need.scratch))
  local msg
  if kind == "cpu" then
    msg = string.format("%s needs %s = %s of memory on the CPU, which has %s available%s", M.describe(desc),
      table.concat(parts, " + "), gib(need.total + need.host), gib(free), total and (" of " .. gib(total)) or "")
  else
    msg = string.format("%s needs %s = %s on %s, which has %s free%s%s", M.describe(desc), table.concat(parts, " + "),
      gib(need.total), device, gib(free), total and (" of " .. gib(total)) or "",
      need.host > 0 and string.format(" (its %s of KV cache is in pinned host memory)", gib(need.host)) or "")
  end
  local sugg = M.suggest(desc, opts, free)
  if #sugg == 0 and kind == "cpu" then
    msg = msg .. "; it does not fit in this machine's memory with any setting moonshard can change"
  elseif #sugg == 0 then
    msg = msg .. "; it does not fit on GPUs of this size with any setting moonshard can change (try --device cpu)"
  else
    local alts = {}
    for i, s in ipairs(sugg) do alts[i] = s.note and string.format("%s (%s)", s.flag, s.note) or s.flag end
    msg = msg .. "; it would fit with " .. table.concat(alts, ", or ")
  end
  return nil, msg, need, sugg
end

return M
