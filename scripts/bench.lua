-- Benchmark prefill and decode speed against the hardware's floors; prints JSON lines.
local args = require "moonshard.args"
local cjson = require "cjson"
local uv = require "luv"

local offload = require "moonshard.offload"
local opts = args.parse(arg, offload.add_flags {
  usage = "moonshard bench (--model PATH | --dummy CONFIG) [options]",
  summary = "Times prefill of --prompt-len tokens and greedy decode of --gen-len tokens, --loops times\n" ..
    "(the median is reported). On a GPU it also measures the copy bandwidth and the matrix rate in the\n" ..
    "same run and reports efficiency = floor / measured time (floors: weight bytes / bandwidth for\n" ..
    "decode, FLOPs / matrix rate for prefill).",
  { "model", "string", "model directory or checkpoint", input = "model" },
  { "dummy", "string", "config.json of a model to build with random weights (std 0.02)", input = "config",
    check = function(v)
      for _, a in ipairs(arg) do
        if a == "--model" or a:match("^%-%-model=") then return nil, "and --model exclude each other: give one" end
      end
      return v
    end },
  { "batch-size", "int", "sequences prefilled (--prompt-len tokens each) and decoded (--gen-len steps) together in lockstep", default = 1, min = 1, max = 4096 },
  { "prompt-len", "int", "prompt tokens", default = 32, min = 1 },
  { "gen-len", "int", "generated tokens", default = 200, min = 1 },
  { "loops", "int", "timed repetitions", default = 5, min = 1 },
  { "warmup", "int", "untimed repetitions first", default = 1, min = 0 },
  { "threads", "int", "CPU threads (default: all cores)", min = 1 },
  { "device", "string", "cpu or cuda[:N]", default = "cpu", check = require("moonshard.validate").device },
  { "dtype", "string", "weights' dtype on the device: native (each weight's own: the default on the CPU with --model), f32 (with --dummy), f16, bf16, q8_0 ... (default bf16 on a GPU)",
    enum = require("moonshard.validate").DTYPES },
  { "quant-bits", "int", "quantize the matrices at load, group-wise: 8 (int8, symmetric) or 4 (int4 with a min); sets --dtype i8g64 / i4g64 ...", enum = { 4, 8 } },
  { "quant-group-size", "int", "elements per group of --quant-bits", default = 64, enum = { 32, 64, 128 } },
  { "preset", "string", "balanced, latency, throughput or FILE.lua: a plan for this machine fills the options not given (moonshard plan)" },
  { "kv-dtype", "string", "KV cache dtype (default: f32 on the CPU; on a GPU the weights' f32 or f16, else bf16)", enum = { "f32", "f16", "bf16" } },
  { "no-ceilings", "flag", "skip measuring bandwidth and matrix rate" },
  { "tp", "int", "tensor-parallel degree (ranks from `moonshard launch`)", default = 1, min = 1 },
  { "pp", "int", "pipeline-parallel stages", default = 1, min = 1 },
  { "pp-layers", "string", "layers of each stage, e.g. 0-15,16-31 (default: balanced)",
    check = function(v) local ok, err = require("moonshard.validate").pp_layers(v) return ok and v, err end },
  { "pp-balance", "string", "what the stage balance evens out", enum = { "decode", "prefill" } },
  { "graphs", "string", "replay decode steps from CUDA graphs", default = "on", enum = { "on", "off" } },
  { "micro-batches", "int", "with --pp: run the batch as this many micro-batches through the pipeline schedule (moonshard.schedule) and report the measured bubble against (p-1)/(m+p-1)", min = 1 },
  { "log-dir", "string", "write JSON Lines events (collectives, stage busy/idle) to this folder and report all-reduce time and pipeline bubble (default: $MSH_LOG_DIR, set by `moonshard launch`)" },
})
if opts.preset then local _, perr = require("moonshard.plan").for_command(opts, arg, "bench") if perr then io.stderr:write("moonshard bench: ", perr, "\n") os.exit(2) end end
if opts.quant_bits then -- --quant-bits and --quant-group-size name a group-wise dtype (i4g64 ...)
  if opts.dtype then io.stderr:write("moonshard bench: give --dtype or --quant-bits, not both\n") os.exit(1) end
  opts.dtype = ("i%dg%d"):format(opts.quant_bits, opts.quant_group_size)
end
if not opts.model and not opts.dummy then
  io.stderr:write("moonshard bench: give --model PATH or --dummy CONFIG\n")
  os.exit(2)
end

local moonshard = require "moonshard"
local tensor, ops, C = moonshard.tensor, moonshard.ops, moonshard.C
local ffi = require "ffi"
if opts.threads then C.msh_set_num_threads(opts.threads) end
local gpu = opts.device ~= "cpu"
-- several ranks: each takes its local GPU (NCCL) or stays on the CPU (TCP); rank 0 reports
local pg
local off_opts, oerr = offload.load_opts(opts)
if not off_opts then
  io.stderr:write("moonshard bench: ", oerr, "\n")
  os.exit(2)
end
local streaming = off_opts.offload or off_opts.zero
if opts.tp * opts.pp > 1 or off_opts.zero then
  local perr
  pg, perr = require("moonshard.dist").init { tp = opts.tp, pp = opts.pp, device = gpu and "cuda" or "cpu" }
  if not pg then
    io.stderr:write("moonshard bench: ", perr, "\n")
    os.exit(1)
  end
  if gpu then opts.device = pg.device end
end
local kind, index = tensor.device_id(opts.device)
local dtype = opts.dtype or (gpu and "bf16" or (opts.dummy and "f32" or "native"))

local function fail(msg)
  io.stderr:write("moonshard bench: ", msg, "\n")
  os.exit(1)
end

local function sync()
  moonshard.core.check(C.msh_device_sync(kind, index))
end

local function mem_used()
  if not gpu then return nil end
  local f, t = ffi.new("uint64_t[1]"), ffi.new("uint64_t[1]")
  if C.msh_device_mem_info(kind, index, f, t) ~= 0 then return nil end
  return tonumber(t[0] - f[0])
end

local ceil = require "moonshard.ceilings"
local median = ceil.median

-- device memory in use once the CUDA context exists, before the ceilings' cuBLAS handles and the
-- model: what the process adds after it is what a plan's total counts (model and reserve)
local mem_ctx = mem_used()
local bw, rate, h2d, h2d_pinned
if gpu and not opts.no_ceilings then
  bw, rate = ceil.device(opts.device)
  if not bw then fail(rate) end
end
if gpu and (streaming or off_opts.kv_offload) and not opts.no_ceilings then h2d, h2d_pinned = ceil.h2d(opts.device) end

local mem0 = mem_used()
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
if not desc then fail(err) end
local need = opts.prompt_len + opts.gen_len
if need > desc.max_seq then
  fail(string.format("prompt-len + gen-len = %d exceeds the context of %d", need, desc.max_seq))
end
local par
if pg then
  par, err = require("moonshard.parallel").setup(desc, { tp = opts.tp, pp = opts.pp, dist = pg, zero = off_opts.zero,
    pp_layers = opts.pp_layers, pp_balance = opts.pp_balance })
  if not par then fail(err) end
end
local load_s -- seconds to place the weights on the device (files through staging, or drawn)
local net
do
  sync()
  local t_load = uv.hrtime()
  -- a batch's buffers hold batch x chunk rows: shorter chunks for larger batches
  local chunk = math.min(need, math.max(math.floor(2048 / opts.batch_size), 64))
  local model
  model, err = moonshard.build(desc, {
    device = opts.device, dtype = dtype, max_seq = need, batch = opts.batch_size, chunk = chunk,
    kv_dtype = opts.kv_dtype, graphs = opts.graphs ~= "off",
    tp = opts.tp, pp = opts.pp, zero = off_opts.zero,
    offload = off_opts.offload, offload_dir = off_opts.offload_dir, offload_readonly = off_opts.offload_readonly,
    pin = off_opts.pin, prefetch = off_opts.prefetch, queue_depth = off_opts.queue_depth,
    kv_offload = off_opts.kv_offload,
  }, { path = name, par = par, identity = opts.dummy and ("dummy|" .. name .. "|" .. tostring(dtype)) or nil })
  net = model and model.net
  if not net then fail(err) end
  sync()
  load_s = (uv.hrtime() - t_load) / 1e9 -- the weights placed (through staging, or drawn) and the buffers made
end
-- a long load says so while the run goes on (a run cut short by a time limit still tells)
if load_s > 10 then io.stderr:write(string.format("moonshard bench: weights placed in %.1f s\n", load_s)) end
-- the disk tier's ceiling: the offload file's own sequential read rate, in this run
local disk, disk_err
if net.stage.streaming and net.stage.path and not opts.no_ceilings then
  disk, disk_err = ceil.disk(net.stage.path)
  if not disk then io.stderr:write("moonshard bench: ", disk_err, "\n") end
  if disk and load_s > 10 then
    io.stderr:write(string.format("moonshard bench: the offload file reads at %.2f GB/s\n", disk.gbs))
  end
end


-- telemetry (only with a log folder): collectives of this rank, busy and idle time of its stage
local tel
local log_dir = opts.log_dir or os.getenv("MSH_LOG_DIR")
if log_dir and log_dir ~= "" then
  local terr
  tel, terr = require("moonshard.telemetry").open(log_dir, { rank = pg and pg.rank or 0, world = pg and pg.world or 1,
    meta = { script = "bench", model = name, tp = opts.tp, pp = opts.pp, device = opts.device } })
  if not tel then fail(terr) end
  net:observe(tel)
end
-- REPL sessions (moonshard attach), answered whenever this rank's loop runs (moonshard.live)
local live = require "moonshard.live"
live.listen { name = "bench", runner = net, pg = pg, telemetry = tel, tcp = os.getenv("MSH_REPL") }
-- all-reduce seconds recorded so far (waits for the device's pending records)
local function allreduce_s()
  tel:poll(true)
  local a = tel.totals.all_reduce
  return a and a.seconds or 0, a and a.calls or 0
end
local decode_ar_s, decode_ar_calls = {}, {}

local prompt = {}
for i = 1, opts.prompt_len do prompt[i] = (i * 7919) % desc.vocab_size end
local argmax_out = ffi.new("int32_t[1]")

-- greedy tokens are picked where the logits are (on a GPU only the ids come back)
local function next_token(logits)
  return ops.argmax(logits, argmax_out)
end

-- --batch-size B > 1: B different prompts, then B greedy tokens a step (tables made once)
local B = opts.batch_size
local prompts, steps, batch_out = {}, {}, ffi.new("int32_t[?]", B)
if B > 1 then
  for b = 1, B do
    prompts[b] = {}
    for i = 1, opts.prompt_len do prompts[b][i] = (i * 7919 + (b - 1) * 104729) % desc.vocab_size end
    steps[b] = { 0 }
  end
end

local function next_tokens(logits)
  ops.argmax(logits, batch_out)
  for b = 1, B do steps[b][1] = batch_out[b - 1] end
end

local function once_batch()
  net:reset()
  sync()
  local t0 = uv.hrtime()
  next_tokens(assert(net:forward_batch(prompts, 0)))
  local t1 = uv.hrtime()
  for _ = 2, opts.gen_len do next_tokens(assert(net:forward_batch(steps))) end
  local t2 = uv.hrtime()
  return (t1 - t0) / 1e9, (t2 - t1) / 1e9
end

-- --pp P --micro-batches m: the micro-batched pipeline (moonshard.schedule). Each repetition
-- times a prefill-only run of the batch (GPipe's fill and drain) and the whole generation, each
-- between barriers, with every stage's busy and idle time over each.
local pipe = opts.micro_batches and par and par.pp_comm
local pipe_stats = { pre = { busy = 0, idle = 0 }, full = { busy = 0, idle = 0 } }
local pipe_prompts = B > 1 and prompts or { prompt }
if opts.micro_batches and not pipe then fail("--micro-batches needs --pp 2 or more (under moonshard launch)") end
if pipe then
  tel = tel or require("moonshard.telemetry").null { rank = pg.rank }
  net.hooks = net.hooks or tel:stage_hooks(opts.device, net.pp_rank)
end

local function pipeline_run(gen_len, acc)
  local schedule = require "moonshard.schedule"
  net:reset()
  sync()
  assert(pg.comm:barrier())
  local probe_ = net.hooks.probe
  probe_:window_begin()
  local t0 = uv.hrtime()
  schedule.run(net, { prompts = net.pp_rank == 0 and pipe_prompts or nil, batch = B, prompt_len = opts.prompt_len,
    gen_len = gen_len, micro_batches = opts.micro_batches })
  sync()
  assert(pg.comm:barrier())
  local t = (uv.hrtime() - t0) / 1e9
  probe_:window_end()
  local st = probe_:summary()
  acc.busy, acc.idle = acc.busy + st.busy_s, acc.idle + st.idle_s
  return t
end

local function once()
  if pipe then
    local t_pre = pipeline_run(1, pipe_stats.pre)
    local t_all = pipeline_run(opts.gen_len, pipe_stats.full)
    return t_pre, math.max(t_all - t_pre, 1e-9)
  end
  if B > 1 then return once_batch() end
  net:reset()
  sync()
  local t0 = uv.hrtime()
  local logits = assert(net:forward(prompt, 0))
  local id = next_token(logits)
  local t1 = uv.hrtime()
  local ar0, calls0
  if tel then
    ar0, calls0 = allreduce_s()
    t1 = uv.hrtime()
  end
  for _ = 2, opts.gen_len do
    logits = assert(net:forward(id))
    id = next_token(logits)
  end
  local t2 = uv.hrtime()
  if tel then
    local ar1, calls1 = allreduce_s()
    decode_ar_s[#decode_ar_s + 1], decode_ar_calls[#decode_ar_calls + 1] = ar1 - ar0, calls1 - calls0
  end
  return (t1 - t0) / 1e9, (t2 - t1) / 1e9
end

for _ = 1, opts.warmup do once() end
decode_ar_s, decode_ar_calls = {}, {}
pipe_stats = { pre = { busy = 0, idle = 0 }, full = { busy = 0, idle = 0 } }
local probe = not pipe and tel and net.hooks.probe
if probe then
  if pg then assert(pg.comm:barrier()) end
  probe:window_begin()
end
local pre, dec = {}, {}
if net.stage.streaming then net.stage:reset_stats() end
-- sessions are answered between the timed repetitions (a chunk that runs long delays the next one)
for i = 1, opts.loops do
  pre[i], dec[i] = once()
  live.poll()
end
local stream_stats = net.stage.streaming and net.stage:stats()
if probe then
  sync()
  if pg then assert(pg.comm:barrier()) end
  probe:window_end()
end
local p, d = median(pre), median(dec)
local peak = mem_used()

-- bytes every decode step must read: all weights but the embedding table (one row of it), as
-- placed on the device
local weight_bytes, matmul_params, head_params = ceil.weights(net)
local decode_step = d / math.max(opts.gen_len - 1, 1)
local L, H, hd, T = net.last_layer - net.first_layer + 1, net.n_heads, net.head_dim, opts.prompt_len
-- prefill: the layers' projections over every token, causal attention, the head over the last token
local prefill_flops = B * (2 * (matmul_params - head_params) * T + 2 * head_params + L * H * hd * 2 * T * T)
-- KV cache bytes a decode step reads: every sequence's keys and values of this rank's layers and
-- kv heads, at the mean context of the decode steps (prompt + half the generated tokens)
local kv_bytes = B * ceil.kv_bytes_per_position(net) * (T + opts.gen_len / 2)
local result = {
  model = name, device = opts.device, dtype = dtype, threads = C.msh_get_num_threads(),
  batch_size = opts.batch_size, prompt_len = opts.prompt_len, gen_len = opts.gen_len, loops = opts.loops,
  params = matmul_params, weight_bytes = weight_bytes,
  prefill_tok_s = B * T / p, time_to_first_token_s = p,
  decode_tok_s = B * (opts.gen_len - 1) / d, decode_step_ms = decode_step * 1e3,
  total_tok_s = B * (T + opts.gen_len) / (p + d), kv_bytes_per_step = kv_bytes,
  prefill_flops = prefill_flops,
}
-- what the stage placed: every distinct weight it holds (the embedding too), over the load time
local load_bytes, seen = 0, {}
local function placed(t)
  if type(t) == "cdata" and not seen[t] then seen[t] = true; load_bytes = load_bytes + t:nbytes() end
end
placed(net.stage:embed()); placed(net.stage:norm()); placed(net.stage:output())
for l = net.first_layer, net.last_layer do
  for _, t in pairs(net.stage:acquire(l)) do placed(t) end
  net.stage:release(l)
end
result.load_s = load_s
result.load_bytes = load_bytes
result.load_GBps = load_s and load_s > 0 and load_bytes / load_s / 1e9 or nil
result.load_source = opts.dummy and "random values drawn on the device"
  or gpu and "mapped files through the staging buffers" or "mapped files (zero-copy where the dtype is kept)"
if peak then
  result.peak_device_memory_bytes = peak
  result.model_device_memory_bytes = peak - (mem0 or 0)
  result.process_device_memory_bytes = peak - (mem_ctx or 0)
end
if bw then
  result.ceiling_copy_GBps = bw / 1e9
  result.ceiling_matmul_TFLOPs = rate / 1e12
  result.decode_floor_ms = (weight_bytes + kv_bytes) / bw * 1e3
  result.decode_efficiency = ((weight_bytes + kv_bytes) / bw) / decode_step
  result.prefill_floor_s = prefill_flops / rate
  result.prefill_efficiency = (prefill_flops / rate) / p
end
if pg then
  result.tp, result.pp, result.world = opts.tp, opts.pp, pg.world
  -- the floors of one rank's share: its weights over its own device's bandwidth
end
if pg and opts.tp > 1 and net.tp_comm then
  -- collectives in isolation, back to back between barriers (captured in a CUDA graph when the
  -- communicator can): 200 all-reduces of B rows of the hidden size (f32), and 20 decode steps'
  -- collectives as the model issues them at batch 1: per layer the two residual sums, each with
  -- the RMSNorm that follows but the last, then the vocabulary-parallel head's gather
  local core, tp = moonshard.core, net.tp_comm
  local acc = assert(tensor.new({ B, net.dim }, "f32", opts.device))
  local part = assert(tensor.new({ B, net.dim }, "f32", opts.device))
  local h = assert(tensor.new({ B, net.dim }, "f32", opts.device))
  acc:randn(1, 0, 1)
  part:randn(2, 0, 0.02)
  local layers = net.last_layer - net.first_layer + 1
  local norm_w = net.attn_norms[net.first_layer]
  local function timed(n, body, capturable)
    local run = function() for _ = 1, n do body() end end
    local captured = gpu and capturable
    if captured then
      core.check(C.msh_graph_begin(kind, index))
      local ok, err = pcall(run)
      local out = ffi.new("msh_graph*[1]")
      core.check(C.msh_graph_end(kind, index, out))
      if not ok then error(err, 0) end
      local g = ffi.gc(out[0], C.msh_graph_free)
      run = function() core.check(C.msh_graph_launch(g)) end
    end
    run()
    sync()
    assert(pg.comm:barrier())
    local t0 = uv.hrtime()
    run()
    sync()
    return (uv.hrtime() - t0) / 1e3 / n, captured
  end
  local us, captured = timed(200, function() core.check(C.msh_comm_all_reduce_add(tp, acc, part)) end,
    C.msh_comm_capturable(tp, C.MSH_COMM_OP_ALL_REDUCE, part) == 1)
  local calls = 2 * layers
  result.allreduce_us = us
  result.allreduce_path = captured and "one-shot kernel, graph" or "eager"
  result.allreduce_share_isolated = calls * us / 1e3 / result.decode_step_ms
  if B == 1 then
    local a1, p1, h1 = acc:narrow(1, 0, 1), part:narrow(1, 0, 1), h:narrow(1, 0, 1)
    local step_us = timed(20, function()
      for _ = 1, calls - 1 do core.check(C.msh_comm_all_reduce_add_norm(tp, a1, p1, h1, norm_w, net.norm_eps)) end
      core.check(C.msh_comm_all_reduce_add(tp, a1, p1))
      if net.vocab_local then core.check(C.msh_comm_all_gather(tp, net.buf.logits, net.buf.logits_l)) end
    end, net:tp_capturable(1))
    result.collectives_us_per_token = step_us
    result.collectives_share_isolated = step_us / 1e3 / result.decode_step_ms
  end
  acc:free()
  part:free()
  h:free()
end
if tel and opts.tp > 1 and B == 1 and not pipe and net.use_graphs then
  -- collectives inside CUDA graphs are not recorded: time the all-reduces of one eager repetition
  net.use_graphs = false
  decode_ar_s, decode_ar_calls = {}, {}
  once()
  net.use_graphs = true
  result.allreduce_source = "one eager repetition (decode steps replay CUDA graphs, whose collectives are not timed)"
end
if tel then
  local tokens = math.max(opts.gen_len - 1, 1)
  if opts.tp > 1 and #decode_ar_s > 0 then
    local ar = median(decode_ar_s)
    result.allreduce_ms_per_token = ar / tokens * 1e3
    result.allreduce_calls_per_token = median(decode_ar_calls) / tokens
    result.allreduce_share = ar / d
  end
  -- every rank's busy and idle seconds over the timed loops, gathered to rank 0
  local s = probe and probe:summary() or { busy_s = pipe_stats.full.busy, idle_s = pipe_stats.full.idle }
  local stages, prefill_stages = { s }, nil
  if pg then
    local mine = tensor.from({ s.busy_s, s.idle_s, net.pp_rank, pipe_stats.pre.busy, pipe_stats.pre.idle }, { 5 }, "f32")
    local all = assert(tensor.new({ 5 * pg.world }, "f32", pg.comm:device()))
    if pg.comm:device() ~= "cpu" then mine = mine:to("f32", pg.comm:device()) end
    assert(pg.comm:all_gather(all, mine))
    local v = all:to("f32", "cpu"):values()
    stages, prefill_stages = {}, {}
    for r = 0, pg.world - 1 do
      stages[r + 1] = { rank = r, stage = v[5 * r + 3], busy_s = v[5 * r + 1], idle_s = v[5 * r + 2] }
      prefill_stages[r + 1] = { busy_s = v[5 * r + 4], idle_s = v[5 * r + 5] }
    end
  end
  if pipe then
    -- bubble: the whole generation; bubble_prefill: the prefill-only runs (GPipe's fill and
    -- drain), whose bound is (p-1)/(m+p-1)
    result.micro_batches = opts.micro_batches
    result.bubble_prefill = require("moonshard.telemetry").bubble(prefill_stages)
    result.bubble_bound = require("moonshard.schedule").bound(opts.pp, opts.micro_batches)
  end
  if opts.pp > 1 then
    result.bubble = require("moonshard.telemetry").bubble(stages)
    result.stage_busy_s, result.stage_idle_s = {}, {}
    for i, st in ipairs(stages) do result.stage_busy_s[i], result.stage_idle_s[i] = st.busy_s, st.idle_s end
  end
  result.log_dir = log_dir
  tel:close { bench = result }
end
-- streaming stages: what went over the host link (and the disk) during the timed loops
if stream_stats then
  local st, secs = stream_stats, 0
  for i = 1, opts.loops do secs = secs + pre[i] + dec[i] end
  result.offload = st.tier
  result.zero = off_opts.zero
  result.prefetch = st.prefetch
  result.pinned = st.pinned
  result.per_token_latency_ms = result.decode_step_ms
  result.stream_bytes = st.bytes
  result.stream_gbs = st.bytes / secs / 1e9
  if st.zero > 1 then result.allgather_gbs = st.gathered / secs / 1e9 end
  if h2d then
    result.h2d_pinned_gbs = h2d / 1e9
    result.h2d_ceiling_pinned = h2d_pinned
    result.stream_share_of_h2d = st.bytes / secs / h2d
  end
  result.prefetch_stall_s = st.wait_s
  -- a repetition is gen_len passes (the prompt's, then gen_len - 1 decode steps), each one token
  -- of every sequence
  result.prefetch_stall_ms_per_token = st.wait_s / (opts.loops * opts.gen_len) * 1e3
  result.layer_stall_ms = {}
  for l = net.first_layer, net.last_layer do
    result.layer_stall_ms[#result.layer_stall_ms + 1] = (st.layer_wait[l] or 0) / opts.loops * 1e3
  end
  if st.read_bytes then
    result.nvme_gbs = st.read_bytes / secs / 1e9
    result.nvme_queue_depth, result.nvme_max_in_flight = st.queue_depth, st.max_in_flight
    result.nvme_uring, result.nvme_direct = st.uring, st.direct
    -- layer reads queued on the disk after each acquire's prefetches, on average
    if (st.queued_n or 0) > 0 then result.nvme_queued_mean = st.queued_sum / st.queued_n end
    if disk then
      result.disk_read_gbs, result.disk_read_direct, result.disk_read_bytes = disk.gbs, disk.direct, disk.bytes
      result.disk_read_dd_gbs, result.disk_read_reader_gbs = disk.dd_gbs, disk.reader_gbs
      -- a small file's read is mostly latency: no share against it
      if disk.bytes >= ceil.DISK_MIN_BYTES then result.nvme_share_of_disk = st.read_bytes / secs / 1e9 / disk.gbs end
    end
  end
end
-- --kv-offload: the cache in pinned host memory, which every decode step's attention reads
-- across the link (kv_bytes_per_step at least; more where heads of a group reload it)
if net.kv_host then
  result.kv_offload = true
  result.kv_host_bytes, result.kv_pinned = net.kv_host.bytes, net.kv_host.pinned
  if net.kv_host.mapped then result.kv_link_gbs = kv_bytes / decode_step / 1e9 end -- (a GPU's)
  if h2d and net.kv_host.mapped then
    result.h2d_pinned_gbs = h2d / 1e9
    result.h2d_ceiling_pinned = h2d_pinned
    result.kv_link_share_of_h2d = kv_bytes / decode_step / h2d
  end
end
if not pg or pg.rank == 0 then print(cjson.encode(result)) end
