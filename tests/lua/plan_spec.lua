-- moonshard.plan and `moonshard plan`: the planner's choices for each preset on the synthetic
-- topologies (tests/fixtures/topology) and model shapes (tools/bench/shapes), and a useful CPU plan
-- on this machine.
local h = require "helpers"
local plan = require "moonshard.plan"
local topology = require "moonshard.topology"
local cjson = require "cjson"

local F = h.root .. "/tests/fixtures/topology/"
local S = h.root .. "/tools/bench/shapes/"

local function topo(name, opts)
  opts = opts or {}
  opts.topology = F .. name
  return assert(topology.discover(opts))
end
local function model(name) return assert(plan.model(S .. name .. ".json")) end
local function make(t, m, preset, extra)
  local o = { preset = assert(plan.preset(preset)) }
  for k, v in pairs(extra or {}) do o[k] = v end
  return assert(plan.make(t, m, o))
end

-- every tensor-parallel group of the plan lies inside one island
local function tp_inside_islands(t, p)
  local per_node = p.gpus / p.nodes
  for node = 0, p.nodes - 1 do
    for g0 = 0, per_node - 1, p.tp do
      local isl = t.gpus[t.nodes[node + 1].gpus[g0 + 1] + 1].island
      for k = 1, p.tp - 1 do
        if t.gpus[t.nodes[node + 1].gpus[g0 + k + 1] + 1].island ~= isl then return false end
      end
    end
  end
  return true
end

local dgx, pcie, pcie2, laptop = topo("dgx8.xml"), topo("pcie4.xml"), topo("pcie4x2.json"), topo("laptop.xml")
local m8, m70, m1t = model("llama-3-8b"), model("llama-2-70b"), model("llama-1t")

describe("plan", function()

  it("loads the presets as data and refuses an unknown one", function()
    for _, n in ipairs { "balanced", "latency", "throughput" } do
      local p = assert(plan.preset(n))
      assert.are.equal(n, p.name)
      assert.is_table(p.tiers)
      assert.is_table(p.quantization)
    end
    local p, err = plan.preset("fastest")
    assert.is_nil(p)
    assert.matches("unknown preset 'fastest'", err)
  end)

  it("keeps tensor parallelism inside an island for every preset", function()
    for _, pre in ipairs { "latency", "balanced", "throughput" } do
      for _, case in ipairs { { pcie, m70 }, { pcie2, m70 }, { dgx, m8 }, { pcie, m8 } } do
        local p = make(case[1], case[2], pre)
        assert.is_true(p.tp <= 2 or case[1] == dgx, pre)
        assert.is_true(tp_inside_islands(case[1], p), pre)
      end
    end
    -- two PCIe nodes: TP within a switch, the rest pipeline stages across islands and nodes
    local p = make(pcie2, m70, "latency")
    assert.are.equal(2, p.tp)
    assert.are.equal(8, p.tp * p.pp * p.dp)
    assert.are.equal(2, p.launch.nnodes)
    assert.are.equal(4, p.launch.nproc_per_node)
  end)

  it("Latency prefers tensor parallelism over offload", function()
    local p = make(pcie, m70, "latency", { gpus = 2 })
    assert.are.equal("resident", p.tier)
    assert.are.equal(2, p.tp)
    assert.are.equal("bf16", p.dtype)
    assert.are.equal(1, p.batch)
    -- on one GPU the same model must stream
    local one = make(pcie, m70, "latency", { gpus = 1 })
    assert.are.equal("host", one.tier)
    assert.is_true(one.predicted.token_latency_ms > 10 * p.predicted.token_latency_ms)
    -- on the NVLink node the 8B shape goes as wide as the island when that is fastest
    local d = make(dgx, m8, "latency")
    assert.are.equal("resident", d.tier)
    assert.is_true(d.tp > 1)
  end)

  it("sends a model larger than the GPUs' memory to ZeRO-3 offload", function()
    local p = make(dgx, m1t, "balanced")
    assert.are_not.equal("resident", p.tier)
    assert.are.equal(3, p.zero)
    assert.is_true(p.dp > 1)
    assert.is_true(p.prefetch >= 1)
    assert.is_true(p.memory.stages[1].host > 0)
    assert.is_true(p.memory.stages[1].total <= p.memory.capacity)
    local flags = table.concat(plan.flags(p, "bench"), " ")
    assert.matches("%-%-zero 3", flags)
    assert.matches("%-%-prefetch", flags)
  end)

  it("Throughput takes larger batches than Balanced, Balanced than Latency", function()
    local lat, bal, thr = make(dgx, m8, "latency"), make(dgx, m8, "balanced"), make(dgx, m8, "throughput")
    assert.are.equal(1, lat.batch)
    assert.is_true(bal.batch > lat.batch)
    assert.is_true(thr.batch > bal.batch)
    assert.is_true(thr.predicted.decode_tok_s > bal.predicted.decode_tok_s)
    -- with the same weights, Latency's token comes no later than Balanced's
    local bal16 = make(dgx, m8, "balanced", { dtype = "bf16" })
    assert.is_true(lat.predicted.token_latency_ms <= 1.05 * bal16.predicted.token_latency_ms)
  end)

  it("lets an explicit choice override its part", function()
    local p = make(dgx, m8, "latency", { tp = 2 })
    assert.are.equal(2, p.tp)
    p = make(dgx, m8, "balanced", { dtype = "i8g64", batch = 4, max_seq = 1024 })
    assert.are.equal("i8g64", p.dtype)
    assert.are.equal(4, p.batch)
    assert.are.equal(1024, p.max_seq)
    p = make(pcie, m70, "balanced", { tier = "host", gpus = 4, pp = 1, tp = 1 })
    assert.are.equal("host", p.tier)
    assert.are.equal(3, p.zero)
    assert.are.equal(4, p.dp)
  end)

  it("plans for the CPU of a laptop", function()
    local p = make(laptop, m8, "balanced")
    assert.are.equal("cpu", p.device)
    assert.are.equal(1, p.tp)
    assert.is_true(p.memory.stages[1].total <= 16 * 2 ^ 30)
    assert.matches("no GPU", p.reasons.device)
    assert.matches("memory per device", plan.format(p))
  end)

  it("counts a paged KV pool (moonshard serve) instead of batch x max_seq positions", function()
    local slots = make(dgx, m8, "throughput", { tp = 1, pp = 1, dtype = "bf16", batch = 32, max_seq = 8192 })
    local pool = make(dgx, m8, "throughput", { tp = 1, pp = 1, dtype = "bf16", batch = 32, max_seq = 8192,
      kv_blocks = 2048 })
    -- 32 layers x (k, v) x 8 KV heads x 128 x 2 bytes: 128 KiB a position; 32 x 8192 positions
    -- (32 GiB) against 2048 blocks x 16 (4 GiB)
    assert.are.equal(32 * 8192 * 131072, slots.memory.stages[1].kv)
    assert.are.equal(2048 * 16 * 131072, pool.memory.stages[1].kv)
    assert.are.equal(2048, pool.kv_blocks)
    assert.are.equal(16, pool.block_size)
    assert.matches("paged KV pool of 2048 blocks x 16 positions", pool.reasons.batch)
    -- two stages: each holds the pool for its own layers (4 KiB a layer and position)
    local pp2 = make(dgx, m8, "throughput", { tp = 1, pp = 2, dtype = "bf16", batch = 32, max_seq = 8192,
      kv_blocks = 2048 })
    local layers = 0
    for _, st in ipairs(pp2.memory.stages) do
      local n = st.layers[2] - st.layers[1] + 1
      layers = layers + n
      assert.are.equal(2048 * 16 * 4096 * n, st.kv)
    end
    assert.are.equal(32, layers)
    local out, err, code = h.run { "plan", "--dummy", S .. "llama-3-8b.json", "--topology", F .. "dgx8.xml", "--tp", "1",
      "--pp", "1", "--dtype", "bf16", "--batch-size", "32", "--kv-blocks", "2048", "--json" }
    assert.are.equal(0, code, err)
    local j = cjson.decode(out)
    assert.are.equal(2048, j.kv_blocks)
    assert.are.equal(2048 * 16 * 131072, j.memory.stages[1].kv)
  end)

  it("applies a plan only where no flag was given", function()
    local p = make(dgx, m8, "throughput")
    local opts = plan.apply({ tp = 1, batch_size = 3, dtype = "f32" }, { "--batch-size", "3" }, p, "bench")
    assert.are.equal(p.tp, opts.tp)
    assert.are.equal(3, opts.batch_size)
    assert.are.equal(p.dtype, opts.dtype)
    assert.are.equal("cuda", opts.device)
  end)

  it("`moonshard plan` prints a CPU plan here and a launch descriptor as JSON", function()
    local out, err, code = h.run { "plan", "--dummy", S .. "llama-3-8b.json", "--topology", F .. "laptop.xml" }
    assert.are.equal(0, code, err)
    assert.matches("CPU", out)
    assert.matches("memory per device", out)
    out, err, code = h.run { "plan", "--dummy", S .. "llama-3-8b.json", "--topology", F .. "dgx8.xml", "--preset",
      "latency", "--json" }
    assert.are.equal(0, code, err)
    local j = cjson.decode(out)
    assert.are.equal("cuda", j.device)
    assert.are.equal(j.tp * j.pp * j.dp, j.launch.nproc_per_node)
    assert.are.equal("bench", j.launch.command)
    out, err, code = h.run { "plan", "--dummy", S .. "llama-3-8b.json", "--preset", "nope" }
    assert.are.equal(2, code)
    assert.matches("unknown preset", err)
    -- this machine, whatever it has
    out, err, code = h.run { "plan", "--dummy", S .. "llama-3-8b.json" }
    assert.are.equal(0, code, err)
    assert.matches("predicted", out)
  end)
end)

describe("moonshard launch --plan", function()
  it("runs the descriptor of `moonshard plan --json`", function()
    local dir = h.tmpdir()
    local out, err, code = h.run { "plan", "--model", h.stories, "--preset", "latency", "--json" }
    assert.are.equal(0, code, err)
    h.write(dir .. "/p.json", out)
    local argv = assert(require("moonshard.launch").plan_argv { "--plan", dir .. "/p.json", "--timeout", "60" })
    assert.are.same({ "-n", "1", "--nnodes", "1", "--timeout", "60", "generate", "--model", h.stories }, { unpack(argv, 1, 9) })
    out, err, code = h.run { "launch", "--plan", dir .. "/p.json", "--log-dir", dir .. "/logs" }
    h.rmdir(dir)
    assert.are.equal(0, code, err)
    assert.is_true(#out > 20)
    local bad
    bad, err = require("moonshard.launch").plan_argv { "--plan", h.root .. "/README.md" }
    assert.is_nil(bad)
    assert.matches("not a plan", err)
  end)
end)

describe("dsconfig", function()
  local ds = require "moonshard.dsconfig"
  local D = h.root .. "/tests/fixtures/dsconfig/"

  it("maps ZeRO-3 CPU offload, pinning, buffers and the batch; names training keys in one warning", function()
    local r, warn = assert(ds.read(D .. "zero3_cpu.json"))
    assert.are.same({ zero = 3, tier = "host", pin = true, prefetch = 4, dtype = "bf16", batch = 4,
      prefetch_bytes = 50000000 }, r.plan)
    assert.matches("training%-only settings ignored: optimizer, gradient_accumulation_steps, wall_clock_breakdown", warn)
  end)

  it("maps NVMe offload with ZeRO-Inference int4 weights, and autotp", function()
    local r, warn = assert(ds.read(D .. "zero3_nvme_int4.json"))
    assert.are.equal("disk", r.plan.tier)
    assert.are.equal("/local_nvme", r.offload_dir)
    assert.are.equal("i4g64", r.plan.dtype)
    assert.matches("zero_optimization.offload_optimizer", warn)
    assert.matches("max_in_cpu", warn)
    local a = assert(ds.read(D .. "autotp.json"))
    assert.are.same({ tp = 2, dtype = "bf16", batch = 8 }, a.plan)
  end)

  it("refuses what it cannot honour, naming the key", function()
    local r, err = ds.read(D .. "bad_device.json")
    assert.is_nil(r)
    assert.matches("offload_param.device 'gpu'", err)
    r, err = ds.parse({ bf16 = { enabled = true }, fp16 = { enabled = true } })
    assert.is_nil(r)
    assert.matches("both enabled", err)
    r, err = ds.parse({ weight_quantization = { quantized_initialization = { num_bits = 3 } } })
    assert.is_nil(r)
    assert.matches("num_bits", err)
  end)

  it("writes a plan back and reads it to the same choices", function()
    local p = make(dgx, m1t, "balanced")
    local cfg = ds.from_plan(p)
    assert.are.equal(3, cfg.zero_optimization.stage)
    local back = assert(ds.parse(cjson.decode(cjson.encode(cfg))))
    assert.are.equal(p.tier, back.plan.tier)
    assert.are.equal(p.dtype, back.plan.dtype)
    assert.are.equal(p.batch, back.plan.batch)
    assert.are.equal(p.prefetch, back.plan.prefetch)
    assert.are.equal(p.tp > 1 and p.tp or nil, back.plan.tp)
    local out, err, code = h.run { "plan", "--dummy", S .. "llama-3-8b.json", "--topology", F .. "pcie4.xml",
      "--ds-config", D .. "zero3_cpu.json", "--json" }
    assert.are.equal(0, code, err)
    assert.matches("training%-only", err)
    local j = cjson.decode(out)
    assert.are.equal("host", j.tier)
    assert.are.equal(4, j.batch)
    assert.are.equal(4, j.prefetch)
  end)
end)
