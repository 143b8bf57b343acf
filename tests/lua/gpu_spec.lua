-- Model paths on a CUDA device against the same golden output and reference logits as the CPU.
-- Pending (not failed) where the build has no CUDA backend or no GPU is present.
local h = require "helpers"
local moonshard = require "moonshard"
local ffi = require "ffi"

local function gpu_count()
  local n = ffi.new("int[1]")
  if moonshard.C.msh_device_count(moonshard.C.MSH_CUDA, n) ~= 0 then return 0 end
  return n[0]
end

local reference = h.reference

describe("CUDA device", function()
  if gpu_count() == 0 then
    pending("no CUDA device (or no CUDA backend in this build): GPU model tests skipped")
    return
  end

  it("generates the stories260K golden text greedily (f32 weights)", function()
    local golden = h.read(h.stories .. "/expected_greedy_200.txt")
    local m = assert(moonshard.load(h.stories, { device = "cuda", dtype = "f32" }))
    local parts = {}
    assert(m:generate({ prompt = "", max_tokens = 200, temperature = 0 }, function(s) parts[#parts + 1] = s end))
    assert.are.equal(golden, table.concat(parts))
  end)

  it("serves ragged prompts from the paged KV pool on the GPU: one pass a step, each answer as alone", function()
    local engine_mod = require "moonshard.engine"
    local prompts = { "Once upon a time", "The cat", "Lily and Tom went to the park. They saw a big", "A" }
    local ref = assert(moonshard.load(h.stories, { device = "cuda", dtype = "f32" }))
    local alone = {}
    for i, p in ipairs(prompts) do
      local parts = {}
      assert(ref:generate({ prompt = p, max_tokens = 40, temperature = 0 }, function(s) parts[#parts + 1] = s end))
      alone[i] = table.concat(parts)
    end
    ref:close()
    local pm = assert(moonshard.load(h.stories, { device = "cuda", dtype = "f32", batch = 4, kv_blocks = 48, block_size = 16 }))
    local e = assert(engine_mod.new(pm, { max_tokens_per_step = 24 }))
    assert.is_true(e.sched.paged)
    local reqs = {}
    for i, p in ipairs(prompts) do reqs[i] = assert(e:submit { prompt = p, max_tokens = 40, temperature = 0 }) end
    local steps, longest = 1, 0
    while e:step() > 0 do steps = steps + 1 end
    -- the prompts (22 tokens) fit the first step's budget of 24; then one decode a step for all
    -- (one step more when the longest answer ended on its end-of-text token, which it does not keep)
    for i = 1, #prompts do longest = math.max(longest, #reqs[i].output_ids) end
    assert.is_true(steps == longest or steps == longest + 1, steps .. " steps, longest " .. longest)
    for i = 1, #prompts do assert.are.equal(alone[i], reqs[i].text, "prompt " .. i) end
    assert.are.equal(0, e:stats().kv_blocks_used)
    e:close()
    pm:close()
  end)

  it("refuses NaN logits when the greedy pick is made on the device", function()
    local tmp = h.tmpdir()
    local pm = assert(moonshard.load(h.nan_stories(tmp), { device = "cuda", dtype = "f32", batch = 2, kv_blocks = 16 }))
    local e = assert(require("moonshard.engine").new(pm, {}))
    local req = assert(e:submit { prompt = "Lily", max_tokens = 4, temperature = 0 })
    while e:step() > 0 do end
    assert.are.equal("error", req.finish_reason)
    assert.truthy(tostring(req.error):find("logits at position %d+ are not finite"), tostring(req.error))
    e:close()
    pm:close()
    h.rmdir(tmp)
  end)

  it("bench-serve --dummy on the GPU reports the floor from the ceilings it measured", function()
    local out, err, code = h.run { "bench-serve", "--dummy", h.root .. "/tests/fixtures/arch/qwen2/config.json",
      "--device", "cuda", "--num-requests", "16", "--input-len", "16", "--output-len", "8", "--max-batch", "8" }
    assert.are.equal(0, code, err)
    local r = require("cjson").decode(out)
    assert.are.equal(16 * 8, r.output_tokens)
    assert.is_true(r.ceiling_copy_GBps > 100 and r.ceiling_matmul_TFLOPs > 10, out)
    assert.is_true(r.floor_s > 0 and r.floor_output_tok_s > r.output_tok_s, out)
    assert.is_true(r.efficiency > 0 and r.efficiency < 1, out)
  end)

  it("--kv-offload: greedy text from a KV cache in pinned host memory equals the resident cache's (f32 weights)", function()
    local golden = h.read(h.stories .. "/expected_greedy_200.txt")
    local function text(o)
      local m = assert(moonshard.load(h.stories, o))
      local parts = {}
      assert(m:generate({ prompt = "", max_tokens = 200, temperature = 0 }, function(s) parts[#parts + 1] = s end))
      local host = m.net.kv_host
      m:close()
      return table.concat(parts), host
    end
    local resident = text { device = "cuda", dtype = "f32" }
    local offloaded, host = text { device = "cuda", dtype = "f32", kv_offload = true, pin = true }
    assert.is_truthy(host and host.pinned and host.mapped, "the cache is pinned host memory mapped to the GPU")
    assert.are.equal(resident, offloaded)
    assert.are.equal(golden, offloaded)
    -- the paged pool in host memory, decode steps from CUDA graphs: each answer as the resident pool's
    local engine_mod = require "moonshard.engine"
    local function serve(o)
      local m = assert(moonshard.load(h.stories, o))
      local e = assert(engine_mod.new(m, { max_tokens_per_step = 24 }))
      local reqs = {}
      for i, p in ipairs { "Once upon a time", "The cat", "Lily and Tom went to the park. They saw a big", "A" } do
        reqs[i] = assert(e:submit { prompt = p, max_tokens = 40, temperature = 0 })
      end
      e:run()
      local out = {}
      for i, r in ipairs(reqs) do out[i] = r.text end
      local mapped = m.net.kv_host and m.net.kv_host.mapped
      e:close()
      m:close()
      return out, mapped
    end
    local pool = { device = "cuda", dtype = "f32", batch = 4, kv_blocks = 48, block_size = 16 }
    local want = serve(pool)
    pool.kv_offload, pool.pin = true, true
    local got, mapped = serve(pool)
    assert.is_true(mapped)
    assert.are.same(want, got)
  end)

  for _, case in ipairs { { "f32", "f32", 1e-4 }, { "bf16", "f32", 1e-4 }, { "llama3", "f32", 1e-4 },
                          { "f32", "bf16", 5e-2 } } do
    local name, dtype, tol = case[1], case[2], case[3]
    it(string.format("%s checkpoint, %s weights on the GPU: logits within %g of transformers", name, dtype, tol), function()
      local ids = reference("ids")
      local m = assert(moonshard.load(h.hf .. "/" .. name, { device = "cuda", dtype = dtype }))
      local logits = assert(m:forward(ids, 0, { all_logits = true }))
      local diff = h.max_abs_diff(logits:values(), reference("logits_" .. name))
      assert.is_true(diff < tol, string.format("max |diff| %.3g", diff))
    end)
  end

  it("gives the device's memory back when a model is closed, 50 times over", function()
    local memplan = require "moonshard.memplan"
    local function once()
      local m = assert(moonshard.load(h.hf .. "/llama3", { device = "cuda", max_seq = 2048, batch = 4 }))
      assert(m:forward({ 1, 2, 3, 4 }, 0))
      assert(m:forward(5)) -- a decode step: a CUDA graph recorded, freed with the model
      m:close()
    end
    once()
    local free0 = assert(memplan.device_memory("cuda"))
    for _ = 1, 50 do once() end
    local free1 = assert(memplan.device_memory("cuda"))
    -- each model holds a few MB of cache and buffers on the device: 50 leaked would be far more
    assert.is_true(free0 - free1 < 4 * 2 ^ 20, string.format("free device memory fell by %.1f MB", (free0 - free1) / 2 ^ 20))
  end)

  -- the architectures of the registry (tests/fixtures/arch): their biases (add_bias), head
  -- norms and tied heads on the GPU; prefill and then decode steps through CUDA graphs
  for _, name in ipairs { "qwen2", "qwen2-untied", "qwen3", "mistral" } do
    it(name .. " on the GPU (f32 weights): logits within 1e-4 of transformers, prefill and decode", function()
      local ref = h.arch .. "/reference.safetensors"
      local ids = reference("ids", ref)
      local want = reference("logits_" .. name, ref)
      local m = assert(moonshard.load(h.arch .. "/" .. name, { device = "cuda", dtype = "f32" }))
      local logits = assert(m:forward(ids, 0, { all_logits = true }))
      local diff = h.max_abs_diff(logits:values(), want)
      assert.is_true(diff < 1e-4, string.format("max |diff| %.3g", diff))
      logits:free()
      -- the same positions one token at a time: decode steps (graphs), each against its row
      local V, worst = m.desc.vocab_size, 0
      for i, id in ipairs(ids) do
        local row = assert(m:forward(id, i - 1)):values()
        worst = math.max(worst, h.max_abs_diff(row, { unpack(want, (i - 1) * V + 1, i * V) }))
      end
      assert.is_true(worst < 1e-4, string.format("decode: max |diff| %.3g", worst))
      assert.is_true(m.net.use_graphs, "decode steps ran from CUDA graphs")
      m:close()
    end)
  end

  -- batched steps: cuBLAS over B * T rows against GEMV over one; decode steps replay CUDA graphs
  -- per (slots, batch size, context bucket), at per-sequence positions read on the device
  for _, case in ipairs { { h.stories, "f32", "f32", 1e-4 }, { h.hf .. "/llama3", "f32", "f32", 1e-4 },
                          { h.hf .. "/f32", "bf16", "bf16", 5e-2 } } do
    local path, dtype, kv, tol = case[1], case[2], case[3], case[4]
    it(string.format("forward_batch on the GPU (%s, %s weights, %s cache): each sequence as alone within %g",
      path:match("[^/]+$"), dtype, kv, tol), function()
      local check = require "batch_check"
      local m = assert(moonshard.load(path, { device = "cuda", dtype = dtype, kv_dtype = kv, batch = 3 }))
      local s = assert(moonshard.load(path, { device = "cuda", dtype = dtype, kv_dtype = kv }))
      local diff, rows = check.run(m, s, m.desc.vocab_size)
      assert.are.equal(12, rows)
      assert.is_true(diff < tol, string.format("max |diff| %.3g", diff))
      assert.is_true(m.net.use_graphs, "decode steps ran from CUDA graphs")
    end)
  end

  describe("two GPUs (NCCL)", function()
    if gpu_count() < 2 then
      pending("fewer than two CUDA devices: NCCL parallel specs skipped")
      return
    end
    it("stops the other rank when one is killed inside NCCL all-reduces, and names it", function()
      local dir = h.tmpdir()
      -- two ranks all-reducing a device tensor in a loop: rank 0 is left waiting on the device for
      -- a peer that is gone, which is the case a GPU adds to the CPU fault specs
      h.write(dir .. "/loop.lua", [[
        local dist = require "moonshard.dist"
        local tensor = require "moonshard.tensor"
        local uv = require "luv"
        local pg = assert(dist.init { device = "cuda", timeout = 20 })
        local t = tensor.from({ 1, 2, 3, 4 }):to("f32", pg.device)
        assert(pg.comm:all_reduce(t))
        local f = io.open(arg[1] .. "/pid." .. pg.rank, "w") f:write(uv.os_getpid()) f:close()
        for _ = 1, 1e7 do
          local ok, err = pg.comm:all_reduce(t)
          if not ok then io.stderr:write(err, "\n") os.exit(1) end
        end
      ]])
      local code, secs, err = h.launch_and(dir, 2, dir .. "/loop.lua", 'sleep 1; kill -9 "$(cat "$D/pid.1")"')
      assert.are.equal(128 + 9, code, err)
      assert.is_true(secs <= 30, string.format("the launcher took %s s", tostring(secs)))
      assert.truthy(err:find("rank 1 exited on signal 9 (SIGKILL)", 1, true), err)
      for _, pid in ipairs(h.pids_in(dir, 2)) do
        assert.is_false(h.running(pid), "rank process " .. pid .. " left running")
      end
      h.rmdir(dir)
    end)

    for _, extra in ipairs { { "--tp", "2" }, { "--pp", "2" } } do
      it("launch -n 2 generate " .. table.concat(extra, " ") .. " on GPUs prints the golden text", function()
        local args = { "launch", "-n", "2", "generate", "--model", h.stories, "--max-tokens", "200",
          "--temperature", "0", "--device", "cuda", "--dtype", "f32" }
        for _, a in ipairs(extra) do args[#args + 1] = a end
        local out, err, code = h.run(args)
        assert.are.equal(0, code, err)
        assert.are.equal(h.read(h.stories .. "/expected_greedy_200.txt") .. "\n", out)
      end)
    end
    for _, case in ipairs { { 4, 2, "-" }, { 6, 3, "lookahead" } } do
      local N, m, extra = case[1], case[2], case[3]
      it(string.format("pp 2 on GPUs, %d sequences in %d micro-batches (%s): one GPU's batched greedy tokens", N, m,
        extra == "-" and "sends in order" or extra), function()
        local script = h.root .. "/tests/lua/pipeline_batch.lua"
        local ref_out, rerr, rcode = h.run { script, "ref", tostring(N), "1", "12", "-", "cuda" }
        assert.are.equal(0, rcode, rerr)
        local out, err, code = h.run { "launch", "-n", "2", "--tag-output", script, "pp", tostring(N), tostring(m), "12",
          extra, "cuda" }
        assert.are.equal(0, code, err)
        local want, got = ref_out:match("tokens (%[.-%]%])"), out:match("tokens (%[.-%]%])")
        assert.truthy(want, ref_out)
        assert.are.equal(want, got, out .. err)
      end)
    end
    -- { script, what it checks, cases { checkpoint, tp, pp } }: 2 ranks on GPUs against one rank
    for _, group in ipairs {
      { "parallel_logits.lua", "logits", { { "f32", 2, 1 }, { "bf16", 1, 2 }, { "llama3", 2, 1 } } },
      { "parallel_batch.lua", "forward_batch as alone", { { "f32", 2, 1 }, { "llama3", 1, 2 } } },
    } do
      for _, case in ipairs(group[3]) do
        it(string.format("%s checkpoint, tp %d x pp %d on GPUs: %s within 1e-4", case[1], case[2], case[3], group[2]),
          function()
            local out, err, code = h.run { "launch", "-n", "2", h.root .. "/tests/lua/" .. group[1], case[1],
              tostring(case[2]), tostring(case[3]), "cuda", "f32" }
            assert.are.equal(0, code, err)
            local diff = tonumber(out:match("max_abs_diff (%S+)"))
            assert.is_true(diff ~= nil and diff < 1e-4, out .. err)
          end)
      end
    end
  end)

  it("names a device that does not exist", function()
    local ok, err = moonshard.load(h.stories, { device = "cuda:" .. gpu_count() })
    assert.is_nil(ok)
    assert.truthy(tostring(err):find("does not exist", 1, true), err)
    assert.truthy(tostring(err):find(string.format("this machine has %d GPU", gpu_count()), 1, true), err)
  end)

  describe("a model bigger than the GPU", function()
    local dummy = require "moonshard.loaders.dummy"
    local stage = require "moonshard.stage"
    local big = h.root .. "/tools/bench/shapes/llama-1t.json"
    local function free_bytes()
      -- earlier specs' tensors go first, so that only this spec's allocations count
      collectgarbage()
      collectgarbage()
      local f, t = ffi.new("uint64_t[1]"), ffi.new("uint64_t[1]")
      moonshard.core.check(moonshard.C.msh_device_mem_info(moonshard.C.MSH_CUDA, 0, f, t))
      return tonumber(f[0])
    end

    it("is refused before anything is placed, with what would fit", function()
      local desc = assert(dummy.load(big))
      local before = free_bytes()
      local ok, err = pcall(stage.resident, desc.weights, "cuda", { dtype = "bf16",
        plan = { desc = desc, kv_dtype = "bf16", max_seq = 4096 } })
      assert.is_false(ok)
      for _, needle in ipairs { "1.01T-parameter model", "GiB of weights (bf16)", "on cuda, which has",
                                "it would fit with --tp " } do
        assert.truthy(tostring(err):find(needle, 1, true), err)
      end
      assert.is_true(math.abs(free_bytes() - before) < 4 * 2 ^ 20, "device memory changed")
    end)

    it("frees what was placed when an allocation fails half way (check skipped)", function()
      local desc = assert(dummy.load(big))
      -- a first failure sets up what the device keeps across placements (staging, scratch)
      assert.is_false(pcall(stage.resident, desc.weights, "cuda", { dtype = "bf16", plan = false }))
      local before = free_bytes()
      local ok, err = pcall(stage.resident, desc.weights, "cuda", { dtype = "bf16", plan = false })
      assert.is_false(ok)
      assert.truthy(tostring(err):find("cannot allocate", 1, true), err)
      local after = free_bytes()
      assert.is_true(math.abs(after - before) < 4 * 2 ^ 20,
        string.format("free before %.1f MiB, after %.1f MiB", before / 2 ^ 20, after / 2 ^ 20))
    end)

    it("makes moonshard bench fail with the message, exit status 1 and no crash", function()
      local out, err, code = h.run { "bench", "--dummy", big, "--device", "cuda", "--no-ceilings", "--gen-len", "2",
        "--prompt-len", "2", "--loops", "1" }
      assert.are.equal(1, code, err)
      assert.are.equal("", out)
      assert.truthy(err:find("needs", 1, true) and err:find("it would fit with", 1, true), err)
    end)
  end)
end)
