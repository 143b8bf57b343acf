-- Plan a run for this machine (or a described one): the preset's choices of tensor / pipeline
-- parallelism, ZeRO-3, weight tier, dtype, batch and KV budget, with the reasons and the memory
-- each device needs; --json prints a launch descriptor for `moonshard launch --plan FILE.json`.
local args = require "moonshard.args"
local cjson = require "cjson"
local opts = args.parse(arg, {
  usage = "moonshard plan (--model PATH | --dummy CONFIG) [options]",
  summary = "Prints the plan with the reason for each choice and a memory table per device.",
  { "model", "string", "model: a Hugging Face directory (its config.json), a config.json or a checkpoint", input = "model" },
  { "dummy", "string", "config.json of a model shape (as bench --dummy)", input = "config" },
  { "preset", "string", "balanced, latency, throughput, or a FILE.lua", default = "balanced" },
  { "gpus", "int", "GPUs a node to use (default: all)", min = 1 },
  { "nodes", "int", "nodes (the topology repeated; default 1)", min = 1, max = 4096 },
  { "topology", "string", "an hwloc XML file (FILE.gpus.json beside it: its GPUs) or a cluster .json", input = "topology" },
  { "fake-gpus", "string", "a GPU table (JSON, NVML's shape) instead of NVML", input = "GPU table" },
  { "device", "string", "cpu: plan for the CPU even where GPUs exist", enum = { "cpu", "cuda" } },
  { "command", "string", "the command the launch descriptor runs", default = "generate", enum = { "generate", "bench", "chat" } },
  { "tp", "int", "fix the tensor-parallel degree", min = 1 },
  { "pp", "int", "fix the pipeline stages", min = 1 },
  { "zero", "int", "3: fix ZeRO-3", enum = { 0, 3 } },
  { "tier", "string", "fix the weight tier", enum = { "resident", "host", "disk" } },
  { "dtype", "string", "fix the weight dtype (bf16, i8g64, i4g64, ...)" },
  { "batch-size", "int", "fix the batch", min = 1 },
  { "max-seq", "int", "fix the context", min = 1 },
  { "kv-blocks", "int", "a paged KV cache of this many blocks a stage (as moonshard serve --kv-blocks), counted instead of batch x max-seq positions", min = 1 },
  { "block-size", "int", "tokens a KV block holds (with --kv-blocks)", default = 16, min = 1 },
  { "prefetch", "int", "fix the prefetch depth", min = 0 },
  { "offload-dir", "string", "NVMe folder for the disk tier" },
  { "ds-config", "string", "a DeepSpeed config (zero_optimization, tensor_parallel, batch ...) fixing its parts", input = "DeepSpeed config" },
  { "emit-ds-config", "string", "write the plan as a DeepSpeed config to this file (- for stdout)" },
  { "hbm-gbs", "number", "measured device memory bandwidth (GB/s)", min = 0 },
  { "h2d-gbs", "number", "measured pinned host-to-device bandwidth (GB/s)", min = 0 },
  { "disk-gbs", "number", "measured NVMe read rate (GB/s)", min = 0 },
  { "json", "flag", "print the plan as JSON (a launch descriptor)" },
})
local plan = require "moonshard.plan"
local function fail(msg, code)
  io.stderr:write("moonshard plan: ", msg, "\n")
  os.exit(code or 1)
end
if not opts.model and not opts.dummy then fail("give --model PATH or --dummy CONFIG (see `moonshard plan --help`)", 2) end
local pre, err = plan.preset(opts.preset)
if not pre then fail(err, 2) end
local topo, terr = require("moonshard.topology").discover { topology = opts.topology, gpus = opts.fake_gpus,
  nodes = opts.nodes }
if not topo then fail(terr) end
local desc, derr = plan.model(opts.dummy or opts.model)
if not desc then fail(derr) end
local fixed = { tp = opts.tp, pp = opts.pp, zero = opts.zero ~= 0 and opts.zero or nil, tier = opts.tier,
  dtype = opts.dtype, batch = opts.batch_size, max_seq = opts.max_seq, prefetch = opts.prefetch }
if opts.ds_config then
  local ds, warn = require("moonshard.dsconfig").read(opts.ds_config)
  if not ds then fail(warn, 2) end
  if warn then io.stderr:write("moonshard plan: ", warn, "\n") end
  for k, v in pairs(ds.plan) do if fixed[k] == nil then fixed[k] = v end end
  if ds.offload_dir and not opts.offload_dir then opts.offload_dir = ds.offload_dir end
end
if fixed.zero == 3 and not fixed.tier then fixed.tier = nil end
local ceilings
if opts.hbm_gbs or opts.h2d_gbs or opts.disk_gbs then
  ceilings = { hbm_gbs = opts.hbm_gbs, h2d_pinned_gbs = opts.h2d_gbs, disk_gbs = opts.disk_gbs }
end
-- random weights of a shape run under bench (generate and chat need a checkpoint)
if opts.dummy then opts.command = "bench" end
local model_args = { opts.dummy and "--dummy" or "--model", opts.dummy or opts.model }
local p, perr = plan.make(topo, desc, { preset = pre, gpus = opts.gpus, nodes = opts.nodes, device = opts.device,
  tp = fixed.tp, pp = fixed.pp, zero = fixed.zero, tier = fixed.tier, dtype = fixed.dtype, batch = fixed.batch,
  max_seq = fixed.max_seq, prefetch = fixed.prefetch, ceilings = ceilings, command = opts.command,
  kv_blocks = opts.kv_blocks, block_size = opts.block_size,
  model_args = model_args })
if not p then fail(perr) end
if opts.offload_dir then
  p.offload_dir = opts.offload_dir
  p.launch = plan.launch_descriptor(p, opts.command, model_args)
end
if opts.emit_ds_config then
  local text = cjson.encode(require("moonshard.dsconfig").from_plan(p))
  if opts.emit_ds_config == "-" then
    io.stdout:write(text, "\n")
  else
    local f, ferr = io.open(opts.emit_ds_config, "w")
    if not f then fail(string.format("cannot write '%s': %s", opts.emit_ds_config, ferr)) end
    f:write(text, "\n")
    f:close()
  end
  if opts.emit_ds_config == "-" then return end
end
if opts.json then
  io.stdout:write(cjson.encode(p), "\n")
else
  io.stdout:write(plan.format(p), "\n")
end
