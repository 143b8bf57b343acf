-- moonshard.memplan: the bytes a model needs on a device and what would fit, on the CPU with
-- made-up free memory. Every suggestion is checked by applying it: it fits, and one step further
-- (a longer context, a smaller degree) does not.
local h = require "helpers"
local memplan = require "moonshard.memplan"
local dummy = require "moonshard.loaders.dummy"
local ffi = require "ffi"

local GiB = 1024 ^ 3

local function shape(name)
  return assert(dummy.load(h.root .. "/tools/bench/shapes/" .. name .. ".json"))
end

local function with(opts, extra)
  local o = {}
  for k, v in pairs(opts) do o[k] = v end
  for k, v in pairs(extra) do o[k] = v end
  return o
end

local function find(sugg, pattern)
  for _, s in ipairs(sugg) do
    if s.flag:match(pattern) then return s end
  end
end

describe("memplan", function()
  local d8 = shape("llama-3-8b")
  local gpu = { device = "cuda:0", dtype = "bf16", kv_dtype = "bf16" }

  it("counts a Llama-3-8B shape's weights, KV cache and activations", function()
    local need = memplan.estimate(d8, gpu)
    assert.are.equal(8030261248, need.params)
    assert.are.equal(2 * 8030261248, need.weights)
    -- 32 layers x (k, v) x 8 KV heads x 128 x 2 bytes x 8192 positions = 1 GiB
    assert.are.equal(32 * 2 * 8 * 128 * 2 * 8192, need.kv)
    assert.are.equal(need.weights + need.kv + need.act + need.scratch, need.total)
    assert.is_true(need.act > 0 and need.scratch >= memplan.GPU_RESERVE)
    -- separate q/k/v and gate/up: k, v and up buffers instead of the stacked outputs (256 rows of
    -- 32 x 128 + 14336 fewer floats)
    local sep = memplan.estimate(d8, with(gpu, { fuse = false }))
    assert.are.equal(4 * 256 * (32 * 128 + 14336), need.act - sep.act)
    -- f32 weights on the CPU: no GPU reserve; a shorter context and a batch scale the cache
    local cpu = memplan.estimate(d8, { device = "cpu", float_dtype = "f32", max_seq = 1024, batch = 3 })
    assert.are.equal(4 * 8030261248, cpu.weights)
    assert.are.equal(32 * 2 * 8 * 128 * 4 * 1024 * 3, cpu.kv)
    assert.are.equal(0, cpu.scratch)
    -- one pipeline stage: its layers only, the head without the embedding
    local last = memplan.estimate(d8, with(gpu, { layers = { 17, 32 }, embed = false }))
    local per_layer = (4096 * 4096 * 2 + 1024 * 4096 * 2 + 3 * 4096 * 14336 + 2 * 4096) * 2
    assert.are.equal(16 * per_layer + (128256 * 4096 + 4096) * 2, last.weights)
    -- a tensor-parallel rank: its share of the layers, the embedding, head and norms whole
    local tp2 = memplan.estimate(d8, with(gpu, { tp = 2 }))
    local shared = (2 * 128256 * 4096 + 4096 + 32 * 2 * 4096) * 2
    assert.are.equal(shared + (need.weights - shared) / 2, tp2.weights)
    assert.are.equal(need.kv / 2, tp2.kv)
  end)

  it("chooses the KV cache's dtype as the runner and the planner use it", function()
    assert.equal("f32", memplan.kv_dtype("cpu", "bf16"))
    assert.equal("f32", memplan.kv_dtype(nil, nil))
    assert.equal("bf16", memplan.kv_dtype("cuda", "bf16"))
    assert.equal("bf16", memplan.kv_dtype("cuda:1", "i4g64"))
    assert.equal("bf16", memplan.kv_dtype("cuda", nil))
    assert.equal("f32", memplan.kv_dtype("cuda", "f32"))
    assert.equal("f16", memplan.kv_dtype("cuda", "f16"))
  end)

  it("passes a model that fits and returns what it needs", function()
    local need = assert(memplan.check(d8, with(gpu, { free_bytes = 20 * GiB })))
    assert.is_true(need.total < 20 * GiB)
  end)

  it("names the model, the parts, the device and what would fit", function()
    local free = 10 * GiB
    local ok, msg, need, sugg = memplan.check(d8, with(gpu, { free_bytes = free, total_bytes = 11 * GiB }))
    assert.is_nil(ok)
    for _, needle in ipairs { "8.0B-parameter model (32 layers, hidden size 4096)", "15.0 GiB of weights (bf16)",
                              "1.0 GiB of KV cache (bf16, 8192 positions x 1)", "on cuda:0, which has 10.0 GiB free of 11.0 GiB",
                              "it would fit with --tp 2 (2 GPUs like this one)" } do
      assert.truthy(msg:find(needle, 1, true), "message lacks '" .. needle .. "': " .. msg)
    end
    assert.is_true(need.total > free)
    -- the weights alone do not fit: no shorter context helps
    assert.is_nil(find(sugg, "^%-%-max%-seq"))
    local tp = assert(find(sugg, "^%-%-tp (%d+)$"))
    local n = tonumber(tp.flag:match("%d+"))
    assert.is_true(memplan.estimate(d8, with(gpu, { tp = n })).total <= free)
  end)

  it("suggests the longest context that fits, and it is the longest (to 256 positions)", function()
    local base = memplan.estimate(d8, with(gpu, { max_seq = 1 }))
    local per = base.kv_per_position
    for _, extra in ipairs { 0.3, 0.75 } do
      local free = base.total + per * 8192 * extra -- room for part of the 8192-position cache
      local ok, msg, _, sugg = memplan.check(d8, with(gpu, { free_bytes = free }))
      assert.is_nil(ok)
      local s = assert(find(sugg, "^%-%-max%-seq"), msg)
      assert.truthy(msg:find(s.flag, 1, true))
      assert.is_true(memplan.estimate(d8, with(gpu, { max_seq = s.max_seq })).total <= free)
      assert.is_true(memplan.estimate(d8, with(gpu, { max_seq = s.max_seq + 256 })).total > free)
      assert.are.equal(0, s.max_seq % 256)
    end
    -- below 512 positions the exact largest (from 256 on, the activations no longer grow)
    local free = memplan.estimate(d8, with(gpu, { max_seq = 256 })).total + per * 45.5
    local _, _, _, sugg = memplan.check(d8, with(gpu, { free_bytes = free }))
    local s = assert(find(sugg, "^%-%-max%-seq"))
    assert.are.equal(301, s.max_seq)
  end)

  it("suggests a smaller batch, bf16 weights and a bf16 cache when they fit", function()
    local b1 = memplan.estimate(d8, with(gpu, { max_seq = 4096, batch = 1 }))
    local free = b1.total + 2.5 * b1.kv -- room for 3 sequences' caches
    local _, _, _, sugg = memplan.check(d8, with(gpu, { max_seq = 4096, batch = 8, free_bytes = free }))
    local b = assert(find(sugg, "^%-%-batch%-size"))
    assert.are.equal(3, b.batch)
    local f32 = { device = "cuda:0", dtype = "f32", kv_dtype = "f32" }
    local bf = memplan.estimate(d8, with(f32, { dtype = "bf16" }))
    local _, msg, _, sugg2 = memplan.check(d8, with(f32, { free_bytes = bf.total + 1 }))
    assert.truthy(find(sugg2, "^%-%-dtype bf16$"), msg)
    assert.truthy(msg:find("(f32)", 1, true))
    local kvb = memplan.estimate(d8, with(gpu, { kv_dtype = "bf16" }))
    local _, _, _, sugg3 = memplan.check(d8, with(gpu, { kv_dtype = "f32", free_bytes = kvb.total + 1 }))
    assert.truthy(find(sugg3, "^%-%-kv%-dtype bf16$"))
  end)

  it("suggests tensor x pipeline parallel for a 1T-parameter shape, the fewest stages that fit", function()
    local big = shape("llama-1t")
    local free = 78.2 * GiB
    local ok, msg, _, sugg = memplan.check(big, with(gpu, { free_bytes = free }))
    assert.is_nil(ok)
    assert.truthy(msg:find("1.01T-parameter model", 1, true), msg)
    local s = assert(find(sugg, "^%-%-tp 8 %-%-pp %d+$"), msg)
    local pp = tonumber(s.flag:match("%-%-pp (%d+)"))
    local pipeline = require "moonshard.policy.pipeline"
    local function worst(n)
      local m = 0
      for i, r in ipairs(assert(pipeline.plan(big, n))) do
        local need = memplan.estimate(big, with(gpu, { tp = 8, layers = r, embed = i == 1, head = i == n }))
        m = math.max(m, need.total)
      end
      return m
    end
    assert.is_true(worst(pp) <= free)
    assert.is_true(worst(pp - 1) > free)
    assert.truthy(msg:find(string.format("(%d GPUs like this one)", 8 * pp), 1, true))
  end)

  it("says when nothing it can change would fit", function()
    local ok, msg = memplan.check(d8, with(gpu, { free_bytes = 0.5 * GiB }))
    assert.is_nil(ok)
    assert.truthy(msg:find("does not fit on GPUs of this size", 1, true), msg)
  end)

  it("counts the GPUs when a device does not exist", function()
    local n = ffi.new("int[1]")
    assert.are.equal(0, require("moonshard").C.msh_device_count(1, n))
    local ok, msg = memplan.device_memory("cuda:" .. (n[0] + 7))
    assert.is_nil(ok)
    assert.truthy(msg:find("cuda:" .. (n[0] + 7) .. " ", 1, true), msg)
    if require("moonshard").C.msh_has_cuda() == 0 then
      assert.truthy(msg:find("no CUDA backend", 1, true), msg)
    elseif n[0] == 0 then
      assert.truthy(msg:find("no CUDA GPU is present", 1, true), msg)
    else
      assert.truthy(msg:find(string.format("this machine has %d GPU", n[0]), 1, true), msg)
    end
    local ok2, msg2 = memplan.check(d8, { device = "cuda:" .. (n[0] + 7) })
    assert.is_nil(ok2)
    assert.are.equal(msg, msg2)
    assert.is_nil((memplan.check(d8, { device = "tpu:0" })))
  end)
end)

describe("memplan on the CPU", function()
  local d8 = shape("llama-3-8b")
  local stories = assert(require("moonshard.loader").load(h.stories)).desc
  local cpu = { device = "cpu", float_dtype = "f32" }

  it("counts only the weights placing allocates: stacked, converted or drawn, not those used in place", function()
    local native = memplan.estimate(stories, { device = "cpu" })
    -- the f32 file's weights stay views of the mapped file; q/k/v and gate/up are stacked into
    -- new tensors (5 layers x (64 + 32 + 32 + 172 + 172) rows of 64 floats)
    local stacked = 5 * (64 + 32 + 32 + 172 + 172) * 64 * 4
    assert.are.equal(stacked, native.weights)
    assert.are.equal(4 * native.params - stacked, native.in_place)
    assert.are.equal(native.weights + native.kv + native.act, native.total)
    -- kept apart, nothing is allocated for the weights; converted to bf16, all of them are
    local apart = memplan.estimate(stories, { device = "cpu", fuse = false })
    assert.are.equal(0, apart.weights)
    assert.are.equal(4 * apart.params, apart.in_place)
    local bf = memplan.estimate(stories, { device = "cpu", dtype = "bf16" })
    assert.are.equal(2 * bf.params, bf.weights)
    assert.are.equal(0, bf.in_place)
    -- the same on a GPU: everything is copied there
    local g = memplan.estimate(stories, { device = "cuda:0", dtype = "native" })
    assert.are.equal(4 * g.params, g.weights)
  end)

  it("agrees with the bytes moonshard.stage allocates on the CPU", function()
    local stage = require "moonshard.stage"
    for _, o in ipairs { {}, { fuse = false }, { dtype = "bf16" }, { float_dtype = "f16" } } do
      local s = stage.resident(stories.weights, "cpu", { dtype = o.dtype, float_dtype = o.float_dtype, fuse = o.fuse,
        plan = false })
      local owned = 0
      for _, t in ipairs(s.owned) do owned = owned + t:nbytes() end
      s:close()
      local need = memplan.estimate(stories, with(o, { device = "cpu" }))
      assert.are.equal(owned, need.weights)
    end
  end)

  it("refuses, naming the parts, the memory available and what would fit", function()
    local ok, msg, need, sugg = memplan.check(d8, with(cpu, { free_bytes = 20 * GiB, total_bytes = 24 * GiB }))
    assert.is_nil(ok)
    for _, needle in ipairs { "8.0B-parameter model (32 layers, hidden size 4096)", "29.9 GiB of weights (f32)",
                              "2.0 GiB of KV cache (f32, 8192 positions x 1)",
                              "of memory on the CPU, which has 20.0 GiB available of 24.0 GiB",
                              "it would fit with --dtype bf16" } do
      assert.truthy(msg:find(needle, 1, true), "message lacks '" .. needle .. "': " .. msg)
    end
    assert.falsy(msg:find("\n", 1, true))
    assert.is_true(need.total > 20 * GiB)
    assert.is_nil(find(sugg, "^%-%-tp")) -- ranks on one machine share its memory
    assert.is_nil(find(sugg, "^%-%-pp"))
    -- 16-bit weights do not fit, 8-bit ones do
    local _, msg2, _, sugg2 = memplan.check(d8, with(cpu, { free_bytes = 12 * GiB }))
    assert.truthy(find(sugg2, "^%-%-dtype q8_0$"), msg2)
    assert.is_nil(find(sugg2, "^%-%-dtype bf16$"))
    assert.is_true(memplan.estimate(d8, with(cpu, { dtype = "q8_0" })).total <= 12 * GiB)
    assert.is_true(memplan.estimate(d8, with(cpu, { dtype = "bf16" })).total > 12 * GiB)
  end)

  it("suggests the largest batch, a shorter context and a bf16 cache when they fit", function()
    local o = with(cpu, { dtype = "bf16", batch = 64 }) -- a 128 GiB f32 cache
    local free = 40 * GiB
    local ok, msg, _, sugg = memplan.check(d8, with(o, { free_bytes = free }))
    assert.is_nil(ok)
    local b = assert(find(sugg, "^%-%-batch%-size"), msg)
    assert.is_true(memplan.estimate(d8, with(o, { batch = b.batch })).total <= free)
    assert.is_true(memplan.estimate(d8, with(o, { batch = b.batch + 1 })).total > free)
    local s = assert(find(sugg, "^%-%-max%-seq"), msg)
    assert.is_true(memplan.estimate(d8, with(o, { max_seq = s.max_seq })).total <= free)
    assert.is_true(memplan.estimate(d8, with(o, { max_seq = s.max_seq + 256 })).total > free)
    assert.is_nil(find(sugg, "^%-%-kv%-dtype")) -- a 64 GiB bf16 cache does not fit either
    local _, _, _, sugg2 = memplan.check(d8, with(o, { batch = 16, free_bytes = free }))
    assert.truthy(find(sugg2, "^%-%-kv%-dtype bf16$"))
  end)

  it("says when nothing it can change would fit", function()
    local ok, msg = memplan.check(d8, with(cpu, { free_bytes = 2 * GiB }))
    assert.is_nil(ok)
    assert.truthy(msg:find("does not fit in this machine's memory with any setting moonshard can change", 1, true), msg)
  end)

  it("counts a paged KV pool instead of batch x max_seq positions, as the runner allocates it", function()
    local runner = require "moonshard.runner"
    for _, o in ipairs { { batch = 3, kv_blocks = 40, block_size = 4, chunk = 8 }, { batch = 2, kv_blocks = true },
      { batch = 4, kv_blocks = 7 }, { batch = 4 } } do
      local r = assert(runner.build(stories, with(o, { device = "cpu" })))
      local need = memplan.estimate(stories, with(o, { device = "cpu" }))
      assert.are.equal(r.cache.bytes, need.kv)
      assert.are.equal(r.act.bytes, need.act)
      r:close()
    end
    -- 5 layers x (k, v) x 4 KV heads x 8 x 4 bytes = 1280 bytes a position
    assert.are.equal(1280 * 40 * 4, memplan.estimate(stories, { batch = 3, kv_blocks = 40, block_size = 4 }).kv)
    assert.are.equal(1280 * 512 * 2, memplan.estimate(stories, { batch = 2, kv_blocks = true }).kv)
    -- Llama-3-8B serving 64 sequences of 8192 positions from 4096 blocks of 16: 16 GiB of f32
    -- cache where 64 full slots would need 128 GiB; refused below it, with a smaller pool offered
    local serve = with(cpu, { dtype = "bf16", batch = 64, kv_blocks = 4096 })
    local need = memplan.estimate(d8, serve)
    assert.are.equal(32 * 2 * 8 * 128 * 4 * 4096 * 16, need.kv)
    assert.is_true(need.kv * 8 == memplan.estimate(d8, with(cpu, { dtype = "bf16", batch = 64 })).kv)
    assert.truthy(memplan.check(d8, with(serve, { free_bytes = need.total })))
    local free = need.total - need.kv / 2
    local ok, msg, _, sugg = memplan.check(d8, with(serve, { free_bytes = free }))
    assert.is_nil(ok)
    assert.truthy(msg:find("16.0 GiB of KV cache (f32, a pool of 4096 blocks x 16 positions)", 1, true), msg)
    local s = assert(find(sugg, "^%-%-kv%-blocks %d+$"), msg)
    assert.is_true(memplan.estimate(d8, with(serve, { kv_blocks = s.kv_blocks })).total <= free)
    assert.is_true(memplan.estimate(d8, with(serve, { kv_blocks = s.kv_blocks + 1 })).total > free)
  end)

  it("reads the memory available from /proc/meminfo, and checks against it when not given", function()
    local avail, total = memplan.parse_meminfo("MemTotal:       24576000 kB\nMemFree:  100 kB\n"
      .. "MemAvailable:   20480000 kB\n")
    assert.are.equal(20480000 * 1024, avail)
    assert.are.equal(24576000 * 1024, total)
    assert.is_nil((memplan.parse_meminfo("MemTotal: 1 kB\n")))
    if memplan.cpu_memory() then
      assert.truthy(memplan.check(stories, { device = "cpu" }))
      -- ten million sequences of 512 positions: many TiB of cache, refused before any is allocated
      local r, err = require("moonshard.runner").build(stories, { device = "cpu", batch = 10000000 })
      assert.is_nil(r)
      assert.truthy(err:find("of memory on the CPU, which has", 1, true), err)
      assert.truthy(err:find("it would fit with --batch-size", 1, true), err)
    end
  end)
end)
