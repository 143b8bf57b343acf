-- moonshard.dsconfig: DeepSpeed configs (ds_config.json) mapped onto a plan, and a plan written
-- back as one. Read: zero_optimization (stage; offload_param: device cpu / nvme / none,
-- pin_memory, nvme_path, buffer_count, buffer_size; stage3_prefetch_bucket_size,
-- stage3_param_persistence_threshold), tensor_parallel (tp_size or autotp_size), bf16 / fp16,
-- train_micro_batch_size_per_gpu (the batch), and ZeRO-Inference's weight_quantization
-- (quantized_initialization: num_bits, group_size). Training-only keys are named in one warning and
-- ignored; a value moonshard cannot honour is an error naming the key.
local cjson = require "cjson.safe"

local M = {}

-- keys that only matter to training (top level, and inside zero_optimization)
M.TRAINING = { "optimizer", "scheduler", "gradient_accumulation_steps", "gradient_clipping", "train_batch_size",
  "gradient_predivide_factor", "prescale_gradients", "steps_per_print", "wall_clock_breakdown", "amp",
  "activation_checkpointing", "data_types", "zero_allow_untested_optimizer", "communication_data_type" }
M.ZERO_TRAINING = { "offload_optimizer", "reduce_bucket_size", "reduce_scatter", "overlap_comm", "contiguous_gradients",
  "allgather_bucket_size", "allgather_partitions", "stage3_max_live_parameters", "stage3_max_reuse_distance",
  "stage3_gather_16bit_weights_on_model_save", "sub_group_size", "round_robin_gradients", "elastic_checkpoint",
  "ignore_unused_parameters", "zero_hpz_partition_size", "zero_quantized_weights", "zero_quantized_gradients",
  "stage3_gather_fp16_weights_on_model_save", "memory_efficient_linear" }

local function enabled(v)
  if type(v) == "table" then return v.enabled == true end
  return v == true
end

-- M.parse(cfg, where) -> { plan = { tp, zero, tier, pin, prefetch, dtype, batch }, offload_dir, notes }, warning
-- | nil, message
function M.parse(cfg, where)
  where = where or "ds_config"
  if type(cfg) ~= "table" then return nil, where .. ": not a JSON object" end
  local function bad(key, msg) return nil, string.format("%s: %s %s", where, key, msg) end
  local plan, notes, ignored = {}, {}, {}
  for _, k in ipairs(M.TRAINING) do if cfg[k] ~= nil then ignored[#ignored + 1] = k end end
  local z = cfg.zero_optimization
  if z ~= nil then
    if type(z) ~= "table" then return bad("zero_optimization", "must be an object") end
    for _, k in ipairs(M.ZERO_TRAINING) do if z[k] ~= nil then ignored[#ignored + 1] = "zero_optimization." .. k end end
    local stage = z.stage or 0
    if stage == 3 then
      plan.zero = 3
    elseif stage == 1 or stage == 2 then
      ignored[#ignored + 1] = "zero_optimization.stage " .. stage .. " (partitions training state only)"
    elseif stage ~= 0 then
      return bad("zero_optimization.stage", string.format("%s: stages are 0 to 3", tostring(stage)))
    end
    local op = z.offload_param
    if op ~= nil then
      if type(op) ~= "table" then return bad("zero_optimization.offload_param", "must be an object") end
      local dev = op.device or "none"
      if dev == "cpu" then
        plan.tier = "host"
      elseif dev == "nvme" then
        plan.tier = "disk"
        if type(op.nvme_path) ~= "string" or op.nvme_path == "" then
          return bad("zero_optimization.offload_param.nvme_path", "is required with device \"nvme\"")
        end
      elseif dev == "none" then
        plan.tier = "resident"
      else
        return bad("zero_optimization.offload_param.device", string.format("'%s': moonshard offloads to cpu or nvme",
          tostring(dev)))
      end
      if stage ~= 3 and dev ~= "none" and z.stage ~= nil then
        return bad("zero_optimization.offload_param", "needs stage 3 (DeepSpeed offloads parameters only there)")
      end
      if op.pin_memory ~= nil then plan.pin = op.pin_memory == true end
      if op.buffer_count ~= nil then
        if type(op.buffer_count) ~= "number" or op.buffer_count < 1 or op.buffer_count % 1 ~= 0 then
          return bad("zero_optimization.offload_param.buffer_count", "must be a whole number >= 1")
        end
        plan.prefetch = op.buffer_count - 1 -- one slot computes while the others fill
      end
      if op.buffer_size ~= nil then notes[#notes + 1] = "buffer_size: moonshard sizes each ring slot to one layer" end
      if op.max_in_cpu ~= nil then ignored[#ignored + 1] = "zero_optimization.offload_param.max_in_cpu" end
    end
    if z.stage3_prefetch_bucket_size ~= nil then
      local v = z.stage3_prefetch_bucket_size
      if type(v) ~= "number" or v < 0 then return bad("zero_optimization.stage3_prefetch_bucket_size", "must be >= 0") end
      plan.prefetch_bytes = v
    end
    if z.stage3_param_persistence_threshold ~= nil then
      local v = z.stage3_param_persistence_threshold
      if type(v) ~= "number" or v < 0 then return bad("zero_optimization.stage3_param_persistence_threshold", "must be >= 0") end
      notes[#notes + 1] = "stage3_param_persistence_threshold: 1-D weights (norms, biases) stay resident"
    end
  end
  local tpc = cfg.tensor_parallel
  if tpc ~= nil then
    local tp = type(tpc) == "table" and (tpc.tp_size or tpc.autotp_size or (type(tpc.tp) == "table" and tpc.tp.tp_size))
    if tp ~= nil then
      if type(tp) ~= "number" or tp < 1 or tp % 1 ~= 0 then return bad("tensor_parallel.tp_size", "must be a whole number >= 1") end
      plan.tp = tp
    end
  end
  if enabled(cfg.bf16) and enabled(cfg.fp16) then return bad("bf16/fp16", "both enabled: choose one") end
  if enabled(cfg.bf16) then plan.dtype = "bf16" elseif enabled(cfg.fp16) then plan.dtype = "f16" end
  local wq = cfg.weight_quantization
  if wq ~= nil then
    local qi = type(wq) == "table" and (wq.quantized_initialization or wq.post_init_quant) or nil
    if type(qi) ~= "table" then return bad("weight_quantization", "needs quantized_initialization { num_bits, group_size }") end
    local bits, group = qi.num_bits or 8, qi.group_size or 64
    if bits ~= 4 and bits ~= 8 then return bad("weight_quantization.quantized_initialization.num_bits", bits .. ": 4 or 8") end
    if group ~= 32 and group ~= 64 and group ~= 128 then
      return bad("weight_quantization.quantized_initialization.group_size", group .. ": 32, 64 or 128")
    end
    plan.dtype = string.format("i%dg%d", bits, group)
  end
  local mb = cfg.train_micro_batch_size_per_gpu
  if mb ~= nil then
    if type(mb) ~= "number" or mb < 1 or mb % 1 ~= 0 then return bad("train_micro_batch_size_per_gpu", "must be a whole number >= 1") end
    plan.batch = mb
  end
  local out = { plan = plan, notes = notes,
    offload_dir = z and type(z.offload_param) == "table" and z.offload_param.nvme_path or nil }
  local warning
  if #ignored > 0 then
    warning = string.format("%s: training-only settings ignored: %s", where, table.concat(ignored, ", "))
  end
  return out, warning
end

-- M.read(path) -> parsed, warning | nil, message
function M.read(path)
  local f, err = io.open(path, "rb")
  if not f then return nil, string.format("cannot read '%s': %s", path, err) end
  local text = f:read("*a")
  f:close()
  local cfg, jerr = cjson.decode(text)
  if type(cfg) ~= "table" then return nil, string.format("'%s' is not valid JSON: %s", path, tostring(jerr)) end
  return M.parse(cfg, path)
end

-- M.from_plan(plan) -> a DeepSpeed config table with the plan's choices.
function M.from_plan(p)
  local cfg = { train_micro_batch_size_per_gpu = p.batch }
  if p.dtype == "bf16" then cfg.bf16 = { enabled = true }
  elseif p.dtype == "f16" then cfg.fp16 = { enabled = true } end
  local bits, group = tostring(p.dtype):match("^i(%d)g(%d+)$")
  if bits then
    cfg.bf16 = { enabled = true }
    cfg.weight_quantization = { quantized_initialization = { num_bits = tonumber(bits), group_size = tonumber(group),
      group_dim = 1, symmetric = true } }
  end
  local z = { stage = p.zero or 0 }
  if p.tier == "host" or p.tier == "disk" then
    z.stage = 3
    z.offload_param = { device = p.tier == "host" and "cpu" or "nvme", pin_memory = p.pin ~= false,
      buffer_count = (p.prefetch or 2) + 1 }
    if p.tier == "disk" then z.offload_param.nvme_path = p.offload_dir or "/tmp/moonshard-offload" end
  end
  cfg.zero_optimization = z
  if p.tp and p.tp > 1 then cfg.tensor_parallel = { tp_size = p.tp } end
  return cfg
end

return M
