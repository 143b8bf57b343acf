-- moonshard.plan: a preset, a topology (moonshard.topology) and a model description in; a plan
-- out: tensor-parallel degree (inside one NVLink or PCIe-switch island), pipeline stages (across
-- islands and nodes), ZeRO-3, the weight tier (resident, pinned host, NVMe), the weight dtype,
-- prefetch depth, batch size and KV budget, with the memory each device needs (moonshard.memplan)
-- and the tokens/s predicted from ceilings, and the reason for each choice.
--
--   local plan = require "moonshard.plan"
--   local p = assert(plan.make(topo, desc, { preset = plan.preset("latency"), gpus = 2 }))
--   print(plan.format(p)); plan.flags(p) -> { "--tp", "2", ... }
--
-- Pure arithmetic over plain tables (the model's shapes come from its description: a dummy one
-- from config.json allocates nothing), so it runs and is tested on a machine without GPUs.
local memplan = require "moonshard.memplan"

local M = {}

local GiB = 2 ^ 30

-- Ceilings when nothing was measured (PERFORMANCE.md, 2026-11-22): HBM copy by GPU memory size,
-- pinned and pageable host-to-device, bf16 matrix rate, one-shot all-reduce over NVLink, and a
-- stated NVMe read rate. Efficiencies: what moonshard reaches of each (91% decode, 68% batch 64).
M.CEILINGS = {
  hbm_gbs_80 = 3000, hbm_gbs_141 = 4210, h2d_pinned_gbs = 55.0, h2d_pageable_gbs = 19.9, tflops = 795,
  allreduce_us_nvlink = 5.4, allreduce_us_pcie = 25, allreduce_us_net = 60, disk_gbs = 3.0, cpu_gbs = 20,
  cpu_gflops = 100, hbm_eff = 0.9, h2d_eff = 0.9, matrix_eff = 0.7,
}
-- share of RAM pinned memory may take (offload.c's guard: $MSH_PIN_SHARE, default 0.5)
M.PIN_SHARE = tonumber(os.getenv("MSH_PIN_SHARE") or "") or 0.5

-- --------------------------------------------------------------------------- presets

-- M.preset(name_or_path) -> table | nil, message: presets/NAME.lua of the tree, or a file.
function M.preset(name)
  name = name or "balanced"
  if type(name) == "table" then return name end
  local path = name
  if not name:match("%.lua$") then
    path = require("moonshard.host").root .. "/presets/" .. name .. ".lua"
  end
  local chunk, err = loadfile(path)
  if not chunk then
    if not name:match("%.lua$") then
      return nil, string.format("unknown preset '%s' (balanced, latency, throughput, or a FILE.lua)", name)
    end
    return nil, err
  end
  setfenv(chunk, {})
  local ok, t = pcall(chunk)
  if not ok or type(t) ~= "table" then return nil, string.format("preset '%s' does not return a table", name) end
  t.name = t.name or name
  return t
end

-- M.model(path) -> desc | nil, message: the shapes of a model without its weights (config.json of
-- a Hugging Face directory, a config file, or any file moonshard.loader reads).
function M.model(path)
  local function isfile(p) local f = io.open(p, "rb") if f then f:close() return true end end
  local cfg
  if path:match("%.json$") then cfg = path elseif isfile(path .. "/config.json") then cfg = path .. "/config.json" end
  if cfg then return require("moonshard.loaders.dummy").load(cfg) end
  local m, err = require("moonshard.loader").load(path)
  if not m then return nil, err end
  return m.desc or m
end

-- ------------------------------------------------------------------------------ helpers

local function copy(t, into)
  into = into or {}
  for k, v in pairs(t or {}) do into[k] = v end
  return into
end

local function gib(b)
  if b >= GiB then return string.format("%.1f GiB", b / GiB) end
  return string.format("%.0f MiB", b / 2 ^ 20)
end
M.gib = gib

local function divisors(n)
  local d = {}
  for i = 1, n do if n % i == 0 then d[#d + 1] = i end end
  return d
end

-- the GPUs a plan may use: the first `per_node` of each of `nodes` nodes
local function pick_gpus(topo, per_node, nodes)
  local out = {}
  for ni = 1, nodes do
    local n = topo.nodes[ni]
    if not n then break end
    for i = 1, math.min(per_node, #n.gpus) do out[#out + 1] = topo.gpus[n.gpus[i] + 1] end
  end
  return out
end

-- the largest tensor-parallel group inside one island among the chosen GPUs (per node)
local function island_size(topo, gpus)
  local count = {}
  for _, g in ipairs(gpus) do count[g.island] = (count[g.island] or 0) + 1 end
  local smallest, kind = math.huge, nil
  for isl, c in pairs(count) do
    if c < smallest then smallest, kind = c, topo.islands[isl].kind end
  end
  return smallest == math.huge and 1 or smallest, kind
end

-- ---------------------------------------------------------------------------- estimate

-- Memory and time of one candidate, or nil, reason.
local function evaluate(c, env)
  local desc, pre, ceil = env.desc, env.preset, env.ceil
  local pipeline = require "moonshard.policy.pipeline"
  local ranges = c.pp == 1 and { { 1, desc.n_layers } } or pipeline.plan(desc, c.pp)
  if not ranges then return nil, "pipeline split" end
  local device = env.gpu and "cuda" or "cpu"
  local stages = {}
  local worst_t, worst_stage = 0, nil
  for s, r in ipairs(ranges) do
    local base = { device = device, dtype = c.dtype, kv_dtype = c.kv_dtype, max_seq = c.max_seq, batch = c.batch,
      tp = c.tp, layers = r, embed = s == 1, head = s == #ranges, chunk = math.min(256, c.max_seq),
      kv_blocks = env.kv_blocks, block_size = env.block_size }
    local need, err = memplan.estimate(desc, base)
    if not need then return nil, err end
    local st = { stage = s - 1, layers = r, weights = need.weights, kv = need.kv, kv_blocks = need.kv_blocks, act = need.act,
      scratch = need.scratch, params = need.params, host = 0, ring = 0 }
    local layer_bytes = 0
    if c.tier ~= "resident" then
      local g = memplan.estimate(desc, copy({ layers = { r[1], r[1] - 1 } }, copy(base)))
      local one = memplan.estimate(desc, copy({ layers = { r[1], r[1] }, embed = false, head = false, max_seq = 1,
        batch = 1 }, copy(base)))
      layer_bytes = one.weights
      st.host = (need.weights - g.weights) / c.dp -- each rank keeps its partition in the tier
      st.ring = (c.prefetch + 1) * layer_bytes
      st.weights = g.weights
    end
    st.total = st.weights + st.ring + st.kv + st.act + st.scratch
    if st.total > env.capacity then
      return nil, string.format("stage %d needs %s, more than the %s a device has", s - 1, gib(st.total), gib(env.capacity))
    end
    -- one decode step of this stage at the micro-batch size
    local mb = c.batch >= c.pp and math.ceil(c.batch / c.pp) or c.batch
    local kv_read = need.kv_per_position / c.batch * mb * c.max_seq / 2
    local t_mem = (need.weights + kv_read) / env.bw
    local t_math = 2 * need.params / c.tp * mb / env.flops
    local t = math.max(t_mem, t_math)
    local bound = t_mem >= t_math and (env.gpu and "HBM" or "memory") or "compute"
    if c.tp > 1 then t = t + 2 * (r[2] - r[1] + 1) * env.allreduce_s end
    if c.tier ~= "resident" then
      local streamed = (need.weights - st.weights) -- this rank's share of the stage's layers
      local bw = c.tier == "disk" and env.disk_bw or (c.pinned and env.h2d or env.h2d_pageable)
      local t_stream = streamed / (bw * math.min(c.dp, env.roots))
      if c.tier == "disk" then t_stream = streamed * env.ranks_per_node / env.disk_bw end
      if t_stream > t then t, bound = t_stream, c.tier == "disk" and "NVMe" or "PCIe" end
    end
    st.step_s = t
    stages[s] = st
    if t > worst_t then worst_t, worst_stage = t, st end
    st.bound = bound
  end
  -- pipeline: a sequence's token passes every stage; with m = pp micro-batches all stages work
  local latency = worst_t * c.pp
  local tok_s = c.dp * c.batch / latency
  return { stages = stages, step_s = worst_t, latency_s = latency, tok_s = tok_s, bound = worst_stage.bound }
end

-- ------------------------------------------------------------------------------- plan

local TIER_FLAG = { host = "--cpu-offload", disk = "--disk-offload" }

-- M.make(topo, desc, opts) -> plan | nil, message
--   opts.preset   a preset table (default: balanced)
--   opts.gpus     GPUs per node to use (default all); opts.nodes (default all of topo's)
--   opts.device   "cpu" plans for the CPU even where GPUs exist
--   overrides, each fixing its part of the plan: opts.tp, pp, zero, tier ("resident", "host",
--   "disk"), dtype, batch, max_seq, prefetch, kv_dtype, pin (false: pageable host memory)
--   opts.kv_blocks, opts.block_size  a paged KV cache (moonshard serve): each stage holds a pool
--                 of kv_blocks blocks of block_size (default 16) positions for its layers, counted
--                 instead of batch x max_seq positions (moonshard.memplan)
--   opts.ceilings measured numbers replacing M.CEILINGS' entries (hbm_gbs, h2d_pinned_gbs, ...)
function M.make(topo, desc, opts)
  opts = opts or {}
  local pre = opts.preset or assert(M.preset("balanced"))
  local ceil = copy(M.CEILINGS)
  copy(opts.ceilings, ceil)
  local nodes = math.min(opts.nodes or #topo.nodes, #topo.nodes)
  local per_node = opts.gpus or (topo.nodes[1] and #topo.nodes[1].gpus) or 0
  local gpus = opts.device == "cpu" and {} or pick_gpus(topo, per_node, nodes)
  if opts.gpus and opts.gpus > 0 and #gpus < opts.gpus * nodes then
    local have = #gpus / math.max(nodes, 1)
    return nil, string.format("--gpus %d: the topology has %d GPU%s a node%s", opts.gpus, have, have == 1 and "" or "s",
      have == 0 and " (to plan for another machine: --topology FILE.xml, or --fake-gpus TABLE.json as NVML lists them)" or "")
  end
  local gpu = #gpus > 0
  local max_seq = math.min(opts.max_seq or pre.context or desc.max_seq, desc.max_seq)
  local env = { desc = desc, preset = pre, ceil = ceil, gpu = gpu, kv_blocks = opts.kv_blocks,
    block_size = opts.kv_blocks and (opts.block_size or 16) or nil }
  local reasons = {}
  local N = #gpus
  if gpu then
    local g = gpus[1]
    local mem = g.memory_free or g.memory
    env.capacity = mem
    local hbm = ceil.hbm_gbs or ((g.memory or 0) > 100e9 and ceil.hbm_gbs_141 or ceil.hbm_gbs_80)
    env.bw = hbm * 1e9 * ceil.hbm_eff
    env.flops = ceil.tflops * 1e12 * ceil.matrix_eff
    local h2d = math.min(ceil.h2d_pinned_gbs, g.host_gbs or ceil.h2d_pinned_gbs)
    env.h2d, env.h2d_pageable = h2d * 1e9 * ceil.h2d_eff, ceil.h2d_pageable_gbs * 1e9 * ceil.h2d_eff
    env.disk_bw = ceil.disk_gbs * 1e9
    local roots = {}
    env.roots = 0
    for _, x in ipairs(gpus) do
      if x.node == gpus[1].node and not roots[x.root] then roots[x.root] = true; env.roots = env.roots + 1 end
    end
    env.ranks_per_node = N / nodes
  else
    local node = topo.nodes[1] or { available = memplan.cpu_memory() or 0, cores = 1 }
    env.capacity = node.available or node.memory
    env.bw = (ceil.cpu_gbs_measured or ceil.cpu_gbs) * 1e9
    env.flops = ceil.cpu_gflops * 1e9
    env.roots, env.ranks_per_node = 1, 1
  end
  local isl_size, isl_kind = 1, nil
  if gpu then isl_size, isl_kind = island_size(topo, gpus) end
  env.allreduce_s = (isl_kind == "nvlink" and ceil.allreduce_us_nvlink or ceil.allreduce_us_pcie) * 1e-6

  -- candidates
  local shard = require "moonshard.policy.shard"
  local cands = {}
  local dtypes = opts.dtype and { opts.dtype } or (gpu and pre.quantization or { "f32", "bf16", "q8_0" })
  local tiers = gpu and (opts.tier and { opts.tier } or pre.tiers) or { "resident" }
  local max_tp = math.min(pre.max_tp or 8, isl_size, N > 0 and N / nodes or 1)
  local batches = {}
  local maxb = opts.batch or pre.max_batch or 1
  local b = maxb
  while b >= (opts.batch or pre.min_batch or 1) and b >= 1 do batches[#batches + 1] = b; b = math.floor(b / 2) end
  if #batches == 0 then batches = { maxb } end
  for _, tp in ipairs(divisors(math.max(N, 1))) do
    if tp <= max_tp and (tp == 1 or shard.plan(desc, tp)) and (not opts.tp or opts.tp == tp) then
      for _, pp in ipairs(divisors(math.max(N, 1) / tp)) do
        if pp <= desc.n_layers and (not opts.pp or opts.pp == pp) then
          for ti, tier in ipairs(tiers) do
            local dp = math.max(N, 1) / (tp * pp)
            -- resident weights use tp x pp GPUs (replicas are separate runs); offloaded ones
            -- partition every layer over the rest (ZeRO-3)
            if tier == "resident" and dp > 1 then goto next_tier end
            if opts.zero == 3 and dp == 1 and N > 1 then goto next_tier end
            for di, dt in ipairs(dtypes) do
              for _, bb in ipairs(batches) do
                cands[#cands + 1] = { tp = tp, pp = pp, dp = dp, tier = tier, tier_rank = ti, dtype = dt, dtype_rank = di,
                  batch = bb, max_seq = max_seq, kv_dtype = opts.kv_dtype or (gpu and pre.kv_dtype) or memplan.kv_dtype(gpu and "cuda" or "cpu", dt),
                  zero = (tier ~= "resident" and dp > 1) and 3 or nil, prefetch = opts.prefetch or 2,
                  pinned = opts.pin ~= false }
              end
            end
            ::next_tier::
          end
        end
      end
    end
  end
  if not gpu then
    for _, c in ipairs(cands) do c.dtype = c.dtype end
  end

  -- evaluate: memory first (device, then host), then time
  local feasible, why = {}, {}
  for _, c in ipairs(cands) do
    local r, err = evaluate(c, env)
    if r then
      -- the KV cache may take at most the preset's share of what the weights leave
      local over
      for _, st in ipairs(r.stages) do
        local left = env.capacity - st.weights - st.ring - st.act - st.scratch
        if st.kv > (pre.kv_share or 1) * left and c.batch > 1 then over = true end
      end
      if c.tier == "host" then
        local per_node = 0
        for _, st in ipairs(r.stages) do per_node = per_node + st.host * c.tp * c.dp end
        per_node = per_node / nodes
        local ram = topo.nodes[1] and topo.nodes[1].available or 0
        local pin_ok = per_node <= M.PIN_SHARE * ram and (r.stages[1].host <= (topo.memlock.soft or math.huge))
        if per_node > 0.9 * ram then over = true; err = "host memory" end
        if not pin_ok and c.pinned then c.pinned = false; r = evaluate(c, env) or r; c.pin_note = true end
        r.host_per_node = per_node
      elseif c.tier == "disk" then
        local per_node = 0
        for _, st in ipairs(r.stages) do per_node = per_node + st.host * c.tp * c.dp end
        r.host_per_node = per_node / nodes
      end
      if not over then
        c.result = r
        feasible[#feasible + 1] = c
      end
    else
      why[#why + 1] = err
    end
  end
  if #feasible == 0 then
    return nil, string.format("no plan fits: %s of this model (%d GPU%s of %s each%s)", why[1] or "every candidate",
      N, N == 1 and "" or "s", gib(env.capacity), gpu and "" or ", CPU")
  end

  -- choose: a preset that is not about throughput keeps to its first tier that fits
  local objective = pre.objective or "balanced"
  if objective ~= "throughput" then
    local best_tier = math.huge
    for _, c in ipairs(feasible) do best_tier = math.min(best_tier, c.tier_rank) end
    local keep = {}
    for _, c in ipairs(feasible) do if c.tier_rank == best_tier then keep[#keep + 1] = c end end
    feasible = keep
  end
  local best_lat = math.huge
  for _, c in ipairs(feasible) do
    if c.batch == 1 or objective == "latency" then best_lat = math.min(best_lat, c.result.latency_s) end
  end
  if best_lat == math.huge then for _, c in ipairs(feasible) do best_lat = math.min(best_lat, c.result.latency_s) end end
  local function better(a, b)
    local ra, rb = a.result, b.result
    if objective == "latency" then
      if math.abs(ra.latency_s - rb.latency_s) > 0.02 * rb.latency_s then return ra.latency_s < rb.latency_s end
    else
      if objective == "balanced" then
        local sa = ra.latency_s <= (pre.latency_slack or 2) * best_lat
        local sb = rb.latency_s <= (pre.latency_slack or 2) * best_lat
        if sa ~= sb then return sa end
      end
      if math.abs(ra.tok_s - rb.tok_s) > 0.02 * rb.tok_s then return ra.tok_s > rb.tok_s end
    end
    -- ties: fewer GPUs, the preferred dtype and tier, TP before ZeRO-3, a smaller batch
    local ga, gb = a.tp * a.pp * a.dp, b.tp * b.pp * b.dp
    if ga ~= gb then return ga < gb end
    if a.dtype_rank ~= b.dtype_rank then return a.dtype_rank < b.dtype_rank end
    if a.tier_rank ~= b.tier_rank then return a.tier_rank < b.tier_rank end
    if a.tp ~= b.tp then return a.tp > b.tp end
    return a.batch < b.batch
  end
  table.sort(feasible, better)
  local c = feasible[1]
  local r = c.result

  -- prefetch depth: as many ring slots as a quarter of the memory left holds (offload.plan_prefetch)
  if c.tier ~= "resident" and not opts.prefetch then
    local st = r.stages[1]
    local slot = st.ring / (c.prefetch + 1)
    local left = env.capacity - (st.total - st.ring)
    c.prefetch = math.max(1, math.min(pre.max_prefetch or 4, math.floor(left / 4 / math.max(slot, 1)) - 1,
      desc.n_layers - 1))
    r = evaluate(c, env) or r
  end

  -- reasons
  local names = { resident = "resident on the device", host = "in host memory", disk = "in NVMe files" }
  if not gpu then
    reasons.device = "no GPU found: the plan is for the CPU"
  end
  reasons.tp = c.tp > 1 and string.format("TP %d inside one %s island of %d GPUs (%s all-reduce per layer)", c.tp,
    isl_kind or "?", isl_size, isl_kind == "nvlink" and "NVLink" or "PCIe")
    or (gpu and (isl_size > 1 and "TP 1: more GPUs in the island would not make this preset's step faster"
    or "TP 1: no island of several GPUs") or "TP 1 on the CPU")
  reasons.pp = c.pp > 1 and string.format("%d pipeline stages across %s", c.pp, nodes > 1 and "nodes" or "islands")
    or "one stage"
  reasons.tier = string.format("weights %s%s", names[c.tier], c.tier == "resident" and "" or
    string.format(" (%s a rank%s)", gib(r.stages[1].host), c.pin_note and "; beyond the pinned limit: pageable" or ""))
  if c.tier ~= "resident" and c.tier_rank > 1 then
    reasons.tier = reasons.tier .. "; " .. "they do not fit resident on " .. N .. " GPU" .. (N == 1 and "" or "s")
  end
  reasons.zero = c.zero and string.format("ZeRO-3 over %d ranks: each rank's link streams 1/%d of a layer", c.dp, c.dp)
    or "no ZeRO-3"
  reasons.dtype = c.dtype_rank == 1 and string.format("%s weights (the preset's first choice)", c.dtype)
    or string.format("%s weights: the preset allows it and the earlier choices do not fit or are slower", c.dtype)
  reasons.batch = string.format("batch %d (preset %s: %d to %d) with %d positions each", c.batch, pre.name or "?",
    pre.min_batch or 1, pre.max_batch or 1, c.max_seq)
  if env.kv_blocks then
    reasons.batch = reasons.batch .. string.format(", sharing a paged KV pool of %d blocks x %d positions",
      r.stages[1].kv_blocks, env.block_size)
  end
  reasons.prefetch = c.tier ~= "resident" and string.format("%d layers ahead", c.prefetch) or "nothing streamed"
  reasons.bound = string.format("predicted from %s%s", r.bound == "compute" and "the matrix rate" or (r.bound .. " bandwidth"), opts.ceilings and " (measured ceilings)"
    or " (PERFORMANCE.md's ceilings)")

  local plan = {
    preset = pre.name, objective = objective, device = gpu and "cuda" or "cpu", nodes = gpu and nodes or 1,
    gpus = gpu and c.tp * c.pp * c.dp or 0, tp = c.tp, pp = c.pp, dp = c.dp, zero = c.zero, tier = c.tier,
    dtype = c.dtype, kv_dtype = c.kv_dtype, batch = c.batch, max_seq = c.max_seq,
    kv_blocks = r.stages[1].kv_blocks, block_size = env.block_size,
    prefetch = c.tier ~= "resident" and c.prefetch or nil, pin = c.tier == "host" and c.pinned or nil,
    micro_batches = c.pp > 1 and c.pp or nil,
    memory = { capacity = env.capacity, stages = r.stages, host_per_node = r.host_per_node },
    predicted = { decode_tok_s = r.tok_s, step_ms = r.step_s * 1e3, token_latency_ms = r.latency_s * 1e3,
      bound = r.bound },
    reasons = reasons, model = { layers = desc.n_layers, dim = desc.dim, path = desc.path },
  }
  plan.launch = M.launch_descriptor(plan, opts.command or "generate", opts.model_args)
  return plan
end

-- The command-line flags of a plan for generate / chat / bench.
function M.flags(p, command)
  local f = {}
  local function add(...) for _, v in ipairs { ... } do f[#f + 1] = tostring(v) end end
  if p.device == "cuda" then add("--device", "cuda") end
  if p.tp > 1 then add("--tp", p.tp) end
  if p.pp > 1 then add("--pp", p.pp) end
  if p.zero then add("--zero", p.zero) end
  if TIER_FLAG[p.tier] then add(TIER_FLAG[p.tier]) end
  if p.tier == "disk" then add("--offload-dir", p.offload_dir or "/tmp/moonshard-offload") end
  if p.tier == "host" and p.pin == false then add("--no-pin-memory") end
  if p.prefetch then add("--prefetch", p.prefetch) end
  if p.dtype then add("--dtype", p.dtype) end
  add("--max-seq", p.max_seq)
  if command == "bench" then
    add("--batch-size", p.batch)
    if p.micro_batches then add("--micro-batches", p.micro_batches) end
    if p.device == "cuda" then add("--kv-dtype", p.kv_dtype) end
  end
  return f
end

-- The launch descriptor: what `moonshard launch --plan FILE.json` starts.
function M.launch_descriptor(p, command, model_args)
  local args = {}
  for _, a in ipairs(model_args or {}) do args[#args + 1] = a end
  for _, a in ipairs(M.flags(p, command)) do args[#args + 1] = a end
  local world = math.max(p.gpus, 1)
  return { nproc_per_node = math.max(1, math.floor(world / p.nodes)), nnodes = p.nodes, command = command, args = args }
end

-- A text view: the choices with their reasons, then a memory table per device.
function M.format(p)
  local out = {}
  local function line(...) out[#out + 1] = string.format(...) end
  line("plan (%s preset, %s): %s", p.preset, p.objective, p.device == "cuda"
    and string.format("%d GPU%s on %d node%s", p.gpus, p.gpus == 1 and "" or "s", p.nodes, p.nodes == 1 and "" or "s")
    or "CPU")
  local order = { "device", "tp", "pp", "zero", "tier", "dtype", "batch", "prefetch", "bound" }
  local label = { device = "device", tp = "tensor parallel", pp = "pipeline", zero = "ZeRO", tier = "weights",
    dtype = "dtype", batch = "batch", prefetch = "prefetch", bound = "speed" }
  for _, k in ipairs(order) do
    if p.reasons[k] then line("  %-16s %s", label[k], p.reasons[k]) end
  end
  line("  predicted        %.1f tok/s decode (%.2f ms a step, %.2f ms a token for one sequence)",
    p.predicted.decode_tok_s, p.predicted.step_ms, p.predicted.token_latency_ms)
  line("memory per device (%s each):", gib(p.memory.capacity))
  line("  %-6s %-9s %10s %10s %10s %10s %10s %10s", "stage", "layers", "weights", "ring", "KV", "act+scr", "total",
    "host")
  for _, st in ipairs(p.memory.stages) do
    line("  %-6d %-9s %10s %10s %10s %10s %10s %10s", st.stage, string.format("%d-%d", st.layers[1] - 1, st.layers[2] - 1),
      gib(st.weights), gib(st.ring), gib(st.kv), gib(st.act + st.scratch), gib(st.total), gib(st.host))
  end
  if p.memory.host_per_node then line("  host memory a node: %s", gib(p.memory.host_per_node)) end
  local l = p.launch
  line("run: moonshard launch -n %d%s %s %s", l.nproc_per_node, l.nnodes > 1 and (" --nnodes " .. l.nnodes) or "",
    l.command, table.concat(l.args, " "))
  return table.concat(out, "\n")
end

-- M.apply(opts, argv, plan) -> opts: the plan's choices for options the user did not give
-- (an explicit flag in argv keeps its value). Used by --preset on generate, chat and bench.
function M.apply(opts, argv, p, command)
  local given = {}
  for _, a in ipairs(argv or {}) do
    local n = type(a) == "string" and a:match("^%-%-([%w%-]+)")
    if n then given[n:gsub("_", "-")] = true end
  end
  local function set(flag, key, v)
    if v ~= nil and not given[flag] then opts[key] = v end
  end
  if p.device == "cuda" then set("device", "device", "cuda") end
  set("tp", "tp", p.tp)
  set("pp", "pp", p.pp)
  set("dtype", "dtype", p.dtype)
  set("max-seq", "max_seq", p.max_seq)
  if command == "bench" then
    set("batch-size", "batch_size", p.batch)
    set("kv-dtype", "kv_dtype", p.device == "cuda" and p.kv_dtype or nil)
  end
  local explicit_tier = given["cpu-offload"] or given["disk-offload"]
  if not explicit_tier then
    if p.tier == "host" then opts.cpu_offload = true end
    if p.tier == "disk" and opts.offload_dir then opts.disk_offload = true end
  end
  set("zero", "zero", p.zero)
  set("prefetch", "prefetch", p.prefetch)
  return opts
end

-- M.for_command(opts, argv, command) -> opts | nil, message: with opts.preset set, plans for
-- this machine and the command's model and applies the plan where no flag was given.
function M.for_command(opts, argv, command)
  if not opts.preset then return opts end
  local pre, err = M.preset(opts.preset)
  if not pre then return nil, err end
  local topo, terr = require("moonshard.topology").discover()
  if not topo then return nil, terr end
  local path = opts.dummy or opts.model
  if not path then return opts end
  local desc, derr = M.model(path)
  if not desc then return nil, derr end
  local given = {}
  for _, a in ipairs(argv or {}) do
    local n = type(a) == "string" and a:match("^%-%-([%w%-]+)")
    if n then given[n] = true end
  end
  local device = given.device and opts.device
  local p, perr = M.make(topo, desc, { preset = pre, device = device == "cpu" and "cpu" or nil,
    tp = given.tp and opts.tp or nil, pp = given.pp and opts.pp or nil, dtype = given.dtype and opts.dtype or nil,
    max_seq = given["max-seq"] and opts.max_seq or nil, batch = given["batch-size"] and opts.batch_size or nil,
    gpus = (given.tp or given.pp) and 1 or nil, command = command })
  if not p then return nil, perr end
  -- one process runs one rank: a multi-rank plan is for `moonshard launch --plan`
  if p.gpus > 1 and not os.getenv("WORLD_SIZE") then
    io.stderr:write(string.format("moonshard %s: the %s preset plans %d GPUs; this process runs one (moonshard plan --json > p.json; moonshard launch --plan p.json)\n",
      command, pre.name, p.gpus))
    p = assert(M.make(topo, desc, { preset = pre, gpus = 1, command = command }))
  end
  return M.apply(opts, argv, p, command)
end

return M
