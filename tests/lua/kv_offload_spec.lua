-- --kv-offload (moonshard.kv_offload): the KV cache in the pinned pool. On the CPU it is the same
-- code path a GPU takes (the buffers come from the guarded pool and the device views them), so the
-- golden text, tensor parallelism, the serving engine over a paged pool, the pinned limit and its
-- fallback, the memory planner's columns and the commands' flag are checked here; the GPU's
-- mapped reads are in gpu_spec and tests/gpu/test_cuda_host_map.c.
local h = require "helpers"
local cjson = require "cjson"
local moonshard = require "moonshard"
local memplan = require "moonshard.memplan"
local dummy = require "moonshard.loaders.dummy"

local golden = h.read(h.stories .. "/expected_greedy_200.txt") .. "\n"
local GEN = { "generate", "--model", h.stories, "--max-tokens", "200", "--temperature", "0" }

local function cat(...)
  local out = {}
  for _, t in ipairs { ... } do for _, x in ipairs(t) do out[#out + 1] = x end end
  return out
end

describe("--kv-offload", function()
  it("generate prints the stories260K golden text", function()
    local out, err, code = h.run(cat(GEN, { "--kv-offload" }))
    assert.are.equal(0, code, err)
    assert.are.equal(golden, out)
  end)

  it("launch -n 2 generate --tp 2 prints the golden text", function()
    local out, err, code = h.run(cat({ "launch", "-n", "2" }, GEN, { "--tp", "2", "--kv-offload" }))
    assert.are.equal(0, code, err)
    assert.are.equal(golden, out)
  end)

  it("puts every layer's cache in the pool, as many bytes as the planner's host column", function()
    for _, o in ipairs { { batch = 2 }, { batch = 3, kv_blocks = true, block_size = 8 }, { kv_blocks = 20, batch = 2 } } do
      o.kv_offload = true
      local m = assert(moonshard.load(h.stories, o))
      local host = assert(m.net.kv_host, "the cache is not in the pool")
      local need = memplan.estimate(m.desc, { device = "cpu", batch = o.batch, kv_blocks = o.kv_blocks,
        block_size = o.block_size, kv_offload = true })
      assert.are.equal(need.kv, need.host)
      assert.are.equal(need.host, host.bytes)
      assert.is_false(host.mapped) -- the CPU reads its own memory
      -- every K and V lies inside the pool's capacity, one buffer each
      local n = 0
      for l = 1, m.desc.n_layers do
        local kv = m.net.kv[l]
        n = n + (kv.K or kv.k_pool):nbytes() + (kv.V or kv.v_pool):nbytes()
      end
      assert.are.equal(host.bytes, n)
      assert.is_true(host.capacity >= host.bytes)
      m:close()
    end
  end)

  it("gives the serving engine over a paged pool in the pool the same greedy answers", function()
    local engine_mod = require "moonshard.engine"
    local prompts = { "Once upon a time", "Lily saw a cat",
      "Tom had a big red ball and he liked to play with it in the park every day. One day", "The sun", "",
      "One day, a little girl named Sue went to the store with her mom. They wanted to buy", "Bob" }
    local function serve(o)
      local m = assert(moonshard.load(h.stories, o))
      -- a small token budget (prompts in chunks) and fewer blocks than the slots (preemption)
      local e = assert(engine_mod.new(m, { max_tokens_per_step = 24, num_blocks = 12 }))
      local reqs = {}
      for i, p in ipairs(prompts) do reqs[i] = assert(e:submit { prompt = p, max_tokens = 40, temperature = 0 }) end
      e:run()
      local texts = {}
      for i, r in ipairs(reqs) do texts[i] = r.text end
      assert.are.equal(0, e:stats().kv_blocks_used)
      local in_pool = m.net.kv_host ~= nil
      e:close()
      m:close()
      return texts, in_pool
    end
    local base = { batch = 4, kv_blocks = 48, block_size = 16 }
    local want, resident_pool = serve(base)
    assert.is_false(resident_pool)
    base.kv_offload = true
    local got, in_pool = serve(base)
    assert.is_true(in_pool)
    assert.are.same(want, got)
    -- and each answer is what the prompt gives alone
    local ref = assert(moonshard.load(h.stories))
    for i, p in ipairs(prompts) do
      local parts = {}
      assert(ref:generate({ prompt = p, max_tokens = 40, temperature = 0 }, function(s) parts[#parts + 1] = s end))
      assert.are.equal(table.concat(parts), got[i], "prompt " .. i)
    end
    ref:close()
  end)

  it("refuses a cache over the pinned limit with --pin-memory, and falls back with a warning without", function()
    local env = { MSH_PIN_SHARE = "0.0000001" }
    local _, err, code = h.run(cat(GEN, { "--kv-offload", "--pin-memory" }), nil, env)
    assert.are_not.equal(0, code)
    assert.truthy(err:find("--kv-offload: the KV cache", 1, true) and err:find("pinning", 1, true)
      and err:find("refused: allowed", 1, true) and err:find("would fit", 1, true), err)
    assert.falsy(err:find("stream from disk", 1, true), err) -- (the weights' advice, not the cache's)
    local out
    out, err, code = h.run(cat(GEN, { "--kv-offload" }), nil, env)
    assert.are.equal(0, code, err)
    assert.are.equal(golden, out)
    local warning = err:match("moonshard: (%-%-kv%-offload[^\n]*)\n")
    assert.truthy(warning and warning:find("keeping it in pageable memory", 1, true), err)
  end)

  it("eval scores every choice as without it, and records it in the placement", function()
    local dir = h.tmpdir()
    local res = {}
    for i, extra in ipairs { {}, { "--kv-offload" } } do
      local _, err, code = h.run(cat({ "eval", "--model", h.stories, "--tasks", "arc_easy", "--limit", "6",
        "--log-samples", "--batch-size", "4", "--output", dir .. "/" .. i .. ".json" }, extra))
      assert.are.equal(0, code, err)
      res[i] = cjson.decode(h.read(dir .. "/" .. i .. ".json"))
    end
    h.rmdir(dir)
    assert.is_false(res[1].config.placement.kv_offload)
    assert.is_true(res[2].config.placement.kv_offload)
    local a, b = res[1].samples.arc_easy, res[2].samples.arc_easy
    assert.are.equal(6, #b)
    for i, s in ipairs(a) do assert.are.same(s.loglikelihoods, b[i].loglikelihoods) end
  end)

  it("serve completes a prompt greedily like generate", function()
    local uv = require "luv"
    local dir = h.tmpdir()
    local log = dir .. "/serve.log"
    local out = h.sh("(exec timeout -k 5 120 " .. h.q(h.exe) .. " serve --model " .. h.q(h.stories)
      .. " --port 0 --kv-offload >/dev/null 2>" .. h.q(log) .. " </dev/null) & echo $!")
    local pid = assert(tonumber(out:match("%d+")))
    local port
    for _ = 1, 300 do
      port = (h.read(log) or ""):match("listening on http://127%.0%.0%.1:(%d+)")
      if port or not h.running(pid) then break end
      uv.sleep(50)
    end
    local body = port and h.sh("curl -s --max-time 30 -H 'Content-Type: application/json' --data-binary "
      .. h.q(cjson.encode { prompt = "Once upon a time", max_tokens = 30, temperature = 0 })
      .. " http://127.0.0.1:" .. port .. "/v1/completions")
    h.sh("kill " .. pid .. " 2>/dev/null")
    for _ = 1, 100 do
      if not h.running(pid) then break end
      uv.sleep(20)
    end
    local text = h.read(log)
    h.rmdir(dir)
    assert(port, "serve did not start: " .. tostring(text))
    local r = cjson.decode(body)
    local gen = h.run { "generate", "--model", h.stories, "--prompt", "Once upon a time", "--max-tokens", "30",
      "--temperature", "0" }
    assert.are.equal((gen:gsub("\n$", "")), r.choices[1].text)
  end)

  it("reaches the cache from generate, chat, eval, serve and bench; bench reports where the cache is", function()
    -- each command's cache goes to the pool: over the limit with --pin-memory, each is refused so
    for _, cmd in ipairs { { "generate" }, { "chat", "--prompt", "hi" }, { "eval", "--tasks", "arc_easy", "--limit", "2" },
                           { "serve", "--port", "0" }, { "bench", "--gen-len", "4", "--loops", "1" } } do
      local _, err, code = h.run(cat(cmd, { "--model", h.stories, "--kv-offload", "--pin-memory" }), nil,
        { MSH_PIN_SHARE = "0.0000001" })
      assert.are.equal(1, code, cmd[1] .. ": " .. err)
      assert.truthy(err:find("^moonshard " .. cmd[1] .. ": .*%-%-kv%-offload: the KV cache: .*refused"), err)
    end
    local out, err, code = h.run { "bench", "--model", h.stories, "--gen-len", "8", "--loops", "1", "--warmup", "0",
      "--kv-offload" }
    assert.are.equal(0, code, err)
    local r = cjson.decode(out:match("(%b{})%s*$"))
    assert.is_true(r.kv_offload)
    assert.is_true(r.kv_host_bytes > 0)
    assert.are.equal(false, r.kv_pinned == nil)
    assert.is_nil(r.kv_link_gbs) -- no link on the CPU
  end)
end)

describe("memplan with the KV cache in host memory", function()
  local d8 = assert(dummy.load(h.root .. "/tools/bench/shapes/llama-3-8b.json"))
  local gpu = { device = "cuda:0", dtype = "bf16", kv_dtype = "bf16", max_seq = 8192, batch = 16 }
  local function with(extra)
    local o = {}
    for k, v in pairs(gpu) do o[k] = v end
    for k, v in pairs(extra) do o[k] = v end
    return o
  end

  it("moves the KV bytes from the device column to the host column", function()
    local base = memplan.estimate(d8, gpu)
    local off = memplan.estimate(d8, with { kv_offload = true })
    -- 16 sequences x 32 layers x (k, v) x 8 KV heads x 128 x 2 bytes x 8192 positions = 16 GiB
    assert.are.equal(16 * 32 * 2 * 8 * 128 * 2 * 8192, base.kv)
    assert.are.equal(0, base.host)
    assert.are.equal(base.kv, off.kv)
    assert.are.equal(base.kv, off.host)
    assert.are.equal(base.total - base.kv, off.total)
    assert.are.equal(off.weights + off.act + off.scratch, off.total)
  end)

  it("fits a GPU with the cache moved off it, and offers --kv-offload when only that fits", function()
    local base = memplan.estimate(d8, gpu)
    local free = base.total - base.kv / 2 -- the weights fit, half the cache does not
    local ok, msg, _, sugg = memplan.check(d8, with { free_bytes = free })
    assert.is_nil(ok)
    local s
    for _, x in ipairs(sugg) do if x.flag == "--kv-offload" then s = x end end
    assert.truthy(s, msg)
    assert.truthy(msg:find("--kv-offload", 1, true), msg)
    local need = assert(memplan.check(d8, with { free_bytes = free, kv_offload = true }))
    assert.are.equal(base.kv, need.host)
    -- too small even without the cache: the message says where the cache already is
    local _, msg2 = memplan.check(d8, with { free_bytes = base.weights / 2, kv_offload = true })
    assert.truthy(msg2:find("KV cache is in pinned host memory", 1, true), msg2)
  end)

  it("counts both columns against the one memory on the CPU", function()
    local cpu = { device = "cpu", dtype = "bf16", max_seq = 8192, batch = 4 }
    local need = memplan.estimate(d8, setmetatable({ kv_offload = true }, { __index = cpu }))
    assert.is_true(need.host > 0)
    assert.truthy(memplan.check(d8, setmetatable({ kv_offload = true, free_bytes = need.total + need.host },
      { __index = cpu })))
    local ok, msg = memplan.check(d8, setmetatable({ kv_offload = true, free_bytes = need.total + need.host - 1 },
      { __index = cpu }))
    assert.is_nil(ok)
    assert.truthy(msg:find("of KV cache in pinned memory", 1, true), msg)
  end)
end)
