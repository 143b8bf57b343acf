-- The serving engine on the CPU: concurrent greedy requests give what each prompt gives alone
-- (moonshard.generate), whatever the batching, chunking, preemption, prefix caching or policy;
-- cancellation frees a request's slot and blocks; echo scores every prompt position as the
-- runner's all-logits pass does; and the runner methods the engine adds (copy_kv, forward_slot).
local h = require "helpers"
local moonshard = require "moonshard"
local engine_mod = require "moonshard.engine"
local uv = require "luv"

local PROMPTS = {
  "Once upon a time",
  "Lily saw a cat",
  "Tom had a big red ball and he liked to play with it in the park every day. One day",
  "The sun",
  "",
  "One day, a little girl named Sue went to the store with her mom. They wanted to buy",
  "Bob",
  "The dog ran",
}
-- a long shared beginning (several 16-token blocks), then different endings
local SYSTEM = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park "
  .. "with her friends and her dog. "
local SHARED = { SYSTEM .. "One day", SYSTEM .. "Lily saw a bird", SYSTEM .. "The sun was", SYSTEM }

local N_GEN = 24

local model, ref -- stories260K with 4 KV slots; one with 1 for the references
local want = {} -- [prompt] = { text, reason } from moonshard.generate at temperature 0

local function alone(prompt, max_tokens)
  max_tokens = max_tokens or N_GEN
  local key = prompt .. "\0" .. max_tokens
  if not want[key] then
    local parts = {}
    local st = assert(ref:generate({ prompt = prompt, max_tokens = max_tokens, temperature = 0 },
      function(s) parts[#parts + 1] = s end))
    want[key] = { text = table.concat(parts), reason = st.finish_reason == "context" and "length" or st.finish_reason }
  end
  return want[key]
end

-- Submits every prompt (greedy), runs the engine to the end; checks each answer against the
-- prompt run alone and that no block stays used. Returns the engine and requests.
local function serve(prompts, opts, req_opts)
  local e = assert(engine_mod.new(model, opts))
  local reqs = {}
  for i, p in ipairs(prompts) do
    local r = { prompt = p, max_tokens = N_GEN, temperature = 0 }
    for k, v in pairs(req_opts or {}) do r[k] = v end
    reqs[i] = assert(e:submit(r))
  end
  e:run()
  for i, p in ipairs(prompts) do
    local w = alone(p)
    assert.are.equal(w.text, reqs[i].text, "prompt " .. i)
    assert.are.equal(w.reason, reqs[i].finish_reason, "prompt " .. i)
  end
  local st = e:stats()
  assert.are.equal(0, st.kv_blocks_used)
  assert.are.equal(0, st.running)
  assert.are.equal(0, st.waiting)
  assert(e.sched:check())
  return e, reqs
end

describe("engine", function()
  setup(function()
    model = assert(moonshard.load(h.stories, { batch = 4 }))
    ref = assert(moonshard.load(h.stories))
  end)
  teardown(function()
    model:close()
    ref:close()
  end)

  it("gives each of many concurrent greedy requests what its prompt gives alone", function()
    local e, reqs = serve(PROMPTS, { max_tokens_per_step = 64 })
    local st = e:stats()
    assert.are.equal(#PROMPTS, st.finished.length + (st.finished.stop or 0))
    local n = 0
    for _, r in ipairs(reqs) do n = n + #r.output_ids end
    assert.are.equal(n, st.generated_tokens - (st.finished.stop or 0))
    e:close()
  end)

  it("takes requests that join while others run", function()
    local e = assert(engine_mod.new(model, { max_tokens_per_step = 32 }))
    local reqs, texts = {}, {}
    for i, p in ipairs(PROMPTS) do
      texts[i] = {}
      reqs[i] = assert(e:submit { prompt = p, max_tokens = N_GEN, temperature = 0,
        on_token = function(_, _, text) texts[i][#texts[i] + 1] = text end })
      for _ = 1, 3 do e:step() end -- three steps between arrivals
    end
    e:run()
    for i, p in ipairs(PROMPTS) do
      assert.are.equal(alone(p).text, reqs[i].text, "prompt " .. i)
      assert.are.equal(reqs[i].text, table.concat(texts[i]), "streamed text of prompt " .. i)
    end
    assert.are.equal(0, e:stats().kv_blocks_used)
    e:close()
  end)

  it("splits prompts into chunks under a small token budget with the same answers", function()
    local e = serve(PROMPTS, { max_tokens_per_step = 5 })
    assert.is_true(e:stats().steps > N_GEN * 2)
    e:close()
  end)

  it("preempts under a small block budget and still completes every request the same", function()
    -- 16 blocks of 4 tokens (64 tokens, room for the longest sequence): fewer than four sequences
    -- of 20-50 tokens need
    local e = serve(PROMPTS, { block_size = 4, num_blocks = 16, max_tokens_per_step = 64, prefix_caching = false })
    assert.is_true(e:stats().preemptions > 0, "no preemption happened")
    e:close()
    -- and with prefix caching: the recomputed sequences find their own blocks
    e = serve(PROMPTS, { block_size = 4, num_blocks = 16, max_tokens_per_step = 64 })
    assert.is_true(e:stats().preemptions > 0)
    e:close()
  end)

  it("gives identical greedy answers with prefix caching on and off, hitting a repeated prefix", function()
    local on = assert(engine_mod.new(model, { max_tokens_per_step = 64 }))
    local off = assert(engine_mod.new(model, { max_tokens_per_step = 64, prefix_caching = false }))
    for _, e in ipairs { on, off } do
      local first = assert(e:submit { prompt = SHARED[1], max_tokens = N_GEN, temperature = 0 })
      e:run()
      assert.are.equal(alone(SHARED[1]).text, first.text)
      -- the same beginning again, several at once (one slot holds the blocks, others copy them)
      local reqs = {}
      for i, p in ipairs(SHARED) do reqs[i] = assert(e:submit { prompt = p, max_tokens = N_GEN, temperature = 0 }) end
      e:run()
      for i, p in ipairs(SHARED) do assert.are.equal(alone(p).text, reqs[i].text, "prompt " .. i) end
      assert.are.equal(0, e:stats().kv_blocks_used)
      assert(e.sched:check())
    end
    local st_on, st_off = on:stats(), off:stats()
    assert.is_true(st_on.prefix_hits >= 16 * #SHARED, "hits: " .. st_on.prefix_hits)
    assert.is_true(st_on.prefix_queries > st_on.prefix_hits)
    assert.are.equal(0, st_off.prefix_hits)
    assert.is_true(st_on.kv_blocks_cached > 0) -- finished sequences' blocks stay cached
    assert.is_true(st_on.kv_copies > 0) -- hits in a slot other than the one holding the rows
    assert.are.equal(0, st_off.kv_copies)
    on:close()
    off:close()
  end)

  it("keeps every answer under chunking, preemption, prefix copies and cancellations at once", function()
    local e = assert(engine_mod.new(model, { max_tokens_per_step = 7, block_size = 4, num_blocks = 24 }))
    local prompts, reqs = {}, {}
    for i = 1, 12 do prompts[i] = i % 2 == 0 and SHARED[i / 2 % #SHARED + 1] or PROMPTS[i % #PROMPTS + 1] end
    local cancelled = {}
    for i, p in ipairs(prompts) do
      reqs[i] = assert(e:submit { prompt = p, max_tokens = N_GEN, temperature = 0,
        on_token = function(req)
          if i % 5 == 0 and #req.output_ids == 2 then e:cancel(req); cancelled[i] = true end
        end })
      e:step()
      assert(e.sched:check())
    end
    while e:step() > 0 do assert(e.sched:check()) end
    for i, p in ipairs(prompts) do
      if cancelled[i] then
        assert.are.equal("cancelled", reqs[i].finish_reason)
      else
        assert.are.equal(alone(p).text, reqs[i].text, "prompt " .. i)
      end
    end
    local st = e:stats()
    assert.is_true(st.preemptions > 0 and st.prefix_hits > 0, "preemptions and prefix hits both happened")
    assert.is_true(st.kv_copies > 0, "a prefix hit copied rows between slots")
    assert.is_true(next(cancelled) ~= nil)
    assert.are.equal(0, st.kv_blocks_used)
    e:close()
  end)

  it("cancels a request mid-stream, freeing its slot and blocks at once", function()
    local e = assert(engine_mod.new(model, { max_tokens_per_step = 64 }))
    local victim, seen, finished = nil, 0, nil
    local others = {}
    for i = 1, 3 do others[i] = assert(e:submit { prompt = PROMPTS[i], max_tokens = N_GEN, temperature = 0 }) end
    victim = assert(e:submit { prompt = PROMPTS[6], max_tokens = 100, temperature = 0,
      on_token = function() seen = seen + 1 end,
      on_finish = function(_, reason) finished = reason end })
    while seen < 3 do e:step() end
    assert.are.equal("running", victim.state)
    local used = e:stats().kv_blocks_used
    local slot = victim.slot
    e:cancel(victim)
    assert.are.equal("finished", victim.state)
    assert.are.equal("cancelled", victim.finish_reason)
    assert.are.equal("cancelled", finished)
    assert.are.equal(3, #victim.output_ids)
    assert.is_nil(e.sched.slots[slot].seq)
    assert.is_true(e:stats().kv_blocks_used < used)
    e:cancel(victim) -- twice: nothing
    e:run()
    for i = 1, 3 do assert.are.equal(alone(PROMPTS[i]).text, others[i].text) end
    assert.are.equal(3, seen)
    assert.are.equal(0, e:stats().kv_blocks_used)
    -- a waiting request cancelled before it ran
    local w = assert(e:submit { prompt = "Bob", max_tokens = 4 })
    e:cancel(w)
    assert.are.equal(0, e:step())
    e:close()
  end)

  it("changes completion order with a replaced policy (shortest prompt first vs FCFS)", function()
    local prompts = { PROMPTS[6], PROMPTS[3], PROMPTS[7] } -- long, long, short
    local function order(policy)
      local e = assert(engine_mod.new(model, { max_batch = 1, policy = policy }))
      local done = {}
      for i, p in ipairs(prompts) do
        assert(e:submit { prompt = p, max_tokens = 4, temperature = 0,
          on_finish = function() done[#done + 1] = i end })
      end
      e:run()
      e:close()
      return done
    end
    assert.are.same({ 1, 2, 3 }, order("fcfs"))
    assert.are.same({ 3, 2, 1 }, order("spf"))
    assert.are.same({ 3, 2, 1 }, order(h.root .. "/examples/policy_shortest_first.lua"))
  end)

  it("scores the prompt (echo) as log_softmax of the runner's all-position logits", function()
    local e = assert(engine_mod.new(model, { max_tokens_per_step = 7 })) -- the prompt in chunks
    local prompt = PROMPTS[3]
    local r = assert(e:submit { prompt = prompt, max_tokens = 0, echo = true, logprobs = 2 })
    local g = assert(e:submit { prompt = prompt, max_tokens = N_GEN, echo = true, temperature = 0 })
    e:run()
    assert.are.equal("length", r.finish_reason)
    assert.are.same({}, r.output_ids)
    assert.are.equal(alone(prompt).text, g.text) -- echo does not change the answer
    local ids = r.prompt_ids
    ref:reset()
    local all = assert(ref:forward(ids, 0, { all_logits = true }))
    local V = all:size(2)
    local vals = all:values()
    all:free()
    assert.are.equal(#ids, #r.prompt_logprobs)
    assert.is_false(r.prompt_logprobs[1])
    for i = 2, #ids do
      local row = { unpack(vals, (i - 2) * V + 1, (i - 1) * V) }
      local mx = -math.huge
      for _, x in ipairs(row) do mx = math.max(mx, x) end
      local s = 0
      for _, x in ipairs(row) do s = s + math.exp(x - mx) end
      local lp = row[ids[i] + 1] - mx - math.log(s)
      assert.is_true(math.abs(lp - r.prompt_logprobs[i]) < 1e-4, string.format("position %d: %g vs %g", i, lp,
        r.prompt_logprobs[i]))
      assert.is_true(math.abs(lp - g.prompt_logprobs[i]) < 1e-4)
      -- the top-2 alternatives: the largest logits, most likely first
      local top = r.prompt_top_logprobs[i]
      assert.are.equal(2, #top)
      local best = 1
      for j = 2, V do if row[j] > row[best] then best = j end end
      assert.are.equal(best - 1, top[1].id)
      assert.is_true(top[1].logprob >= top[2].logprob)
    end
    e:close()
  end)

  it("returns each generated token's log-probability and its top alternatives", function()
    local e = assert(engine_mod.new(model))
    local lps = {}
    local r = assert(e:submit { prompt = PROMPTS[1], max_tokens = 8, temperature = 0, logprobs = 3,
      on_token = function(_, id, _, lp) if id then lps[#lps + 1] = lp end end })
    e:run()
    assert.are.equal(8, #r.token_logprobs)
    for i, id in ipairs(r.output_ids) do
      local top = r.top_logprobs[i]
      assert.are.equal(3, #top)
      assert.are.equal(id, top[1].id) -- greedy: the chosen token is the most likely
      assert.are.equal(top[1].logprob, r.token_logprobs[i])
      assert.are.equal(lps[i], r.token_logprobs[i])
      assert.is_true(r.token_logprobs[i] <= 0)
    end
    e:close()
  end)

  it("stops at a stop string (the text ends before it) and at stop token ids", function()
    local w = alone(PROMPTS[1])
    local stop = w.text:sub(20, 24)
    local at = w.text:find(stop, 1, true)
    local e = assert(engine_mod.new(model))
    local streamed = {}
    local r = assert(e:submit { prompt = PROMPTS[1], max_tokens = N_GEN, temperature = 0, stop = { "zzzz", stop },
      on_token = function(_, _, text) streamed[#streamed + 1] = text end })
    -- the first token greedy picks, as a stop id: nothing is generated
    local first = assert(e:submit { prompt = PROMPTS[1], max_tokens = 1, temperature = 0 })
    e:run()
    local s = assert(e:submit { prompt = PROMPTS[1], max_tokens = N_GEN, temperature = 0, stop_ids = { first.output_ids[1] } })
    e:run()
    assert.are.equal("stop", r.finish_reason)
    assert.are.equal(w.text:sub(1, at - 1), r.text)
    assert.are.equal(r.text, table.concat(streamed))
    assert.are.equal("stop", s.finish_reason)
    assert.are.same({}, s.output_ids)
    e:close()
  end)

  it("samples with each request's own seed, reproducibly", function()
    local e = assert(engine_mod.new(model))
    local a = assert(e:submit { prompt = PROMPTS[2], max_tokens = 16, temperature = 1, top_p = 0.9, seed = 7 })
    local b = assert(e:submit { prompt = PROMPTS[2], max_tokens = 16, temperature = 1, top_p = 0.9, seed = 7 })
    local c = assert(e:submit { prompt = PROMPTS[2], max_tokens = 16, temperature = 1, top_k = 5, seed = 8 })
    e:run()
    assert.are.same(a.output_ids, b.output_ids)
    local parts = {}
    assert(ref:generate({ prompt = PROMPTS[2], max_tokens = 16, temperature = 1, top_p = 0.9, seed = 7 },
      function(x) parts[#parts + 1] = x end))
    assert.are.equal(table.concat(parts), a.text)
    assert.is_true(#c.output_ids > 0)
    e:close()
  end)

  it("refuses bad requests with a message naming the field", function()
    local e = assert(engine_mod.new(model))
    local function bad(r, text)
      local ok, err = e:submit(r)
      assert.is_nil(ok)
      assert.truthy(err:find(text, 1, true), err)
    end
    local long = {}
    for i = 1, 512 do long[i] = 5 end
    bad({ prompt_ids = long }, "the prompt is 512 tokens long")
    bad({ prompt_ids = {} }, "prompt_ids: empty")
    bad({ prompt_ids = { 1, 99999 } }, "token id 99999 at index 2 outside the vocabulary")
    bad({ prompt_ids = { 1 }, max_tokens = -1 }, "max_tokens")
    bad({ prompt_ids = { 1 }, temperature = -1 }, "temperature")
    bad({ prompt_ids = { 1 }, top_p = 2 }, "top_p")
    bad({ prompt_ids = { 1 }, logprobs = -1 }, "logprobs")
    bad({ prompt_ids = { 1 }, stop = { "" } }, "stop[1]")
    bad({ prompt_ids = { 1 }, on_token = 5 }, "on_token")
    bad({}, "prompt_ids: missing")
    assert.are.equal(0, e:stats().waiting)
    local ok, err = engine_mod.new(model, { max_batch = 9 })
    assert.is_nil(ok)
    assert.truthy(err:find("max_batch 9 exceeds the model's 4 KV slots", 1, true), err)
    ok, err = engine_mod.new(model, { policy = "nope" })
    assert.is_nil(ok)
    assert.truthy(err:find("unknown scheduling policy", 1, true), err)
    e:close()
  end)

  it("ends a request whose callback fails, and goes on with the others", function()
    local e = assert(engine_mod.new(model))
    local bad = assert(e:submit { prompt = PROMPTS[1], max_tokens = 8, temperature = 0,
      on_token = function() error("client gone") end })
    local good = assert(e:submit { prompt = PROMPTS[2], max_tokens = 8, temperature = 0,
      on_token = function() assert.has_error(function() e:step() end) end })
    e:run()
    assert.are.equal("error", bad.finish_reason)
    assert.truthy(bad.error:find("client gone", 1, true), bad.error)
    assert.are.equal(alone(PROMPTS[2], 8).text, good.text)
    assert.are.equal(0, e:stats().kv_blocks_used)
    e:close()
  end)

  it("steps on the libuv loop while work exists and idles otherwise", function()
    local e = assert(engine_mod.new(model))
    local steps = 0
    e.on_step = function(info)
      steps = steps + 1
      assert.is_true(info.batch >= 1 and info.tokens >= 1 and info.seconds >= 0)
    end
    e:attach(uv)
    local r = assert(e:submit { prompt = PROMPTS[1], max_tokens = 8, temperature = 0 })
    uv.run()
    assert.are.equal("finished", r.state)
    assert.is_false(e.idle_on)
    -- a request submitted later starts the handle again
    local timer = uv.new_timer()
    local r2
    timer:start(5, 0, function()
      timer:close()
      r2 = assert(e:submit { prompt = PROMPTS[2], max_tokens = 8, temperature = 0 })
    end)
    uv.run()
    assert.are.equal(alone(PROMPTS[2], 8).text, r2.text)
    assert.is_true(steps >= 16)
    e:detach()
    e:close()
  end)

  it("reports throughput of an in-process batch (no timing asserted)", function()
    local e = assert(engine_mod.new(model, { max_tokens_per_step = 256 }))
    local t0 = uv.hrtime()
    for i = 1, 16 do assert(e:submit { prompt = PROMPTS[i % #PROMPTS + 1], max_tokens = 32, temperature = 0, ignore_eos = true }) end
    e:run()
    local s = (uv.hrtime() - t0) / 1e9
    local st = e:stats()
    assert.are.equal(16 * 32, st.generated_tokens)
    io.stderr:write(string.format("\n[engine] 16 requests x 32 tokens, 4 slots: %.0f output tok/s (%d steps)\n",
      st.generated_tokens / s, st.steps))
    e:close()
  end)
end)

describe("engine on a Llama-3-shaped model (GQA, token ids, no tokenizer)", function()
  it("gives concurrent greedy requests the tokens of a greedy loop over each alone", function()
    local path = h.hf .. "/llama3"
    local m = assert(moonshard.load(path, { batch = 3, chunk = 8 }))
    local r1 = assert(moonshard.load(path))
    local e = assert(engine_mod.new(m, { max_tokens_per_step = 6, block_size = 4 }))
    local prompts = { { 1, 2, 3, 4, 5, 6, 7, 8, 9 }, { 1, 2, 3, 4, 5, 6, 7, 8, 10, 11 }, { 200 },
      { 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7 }, { 1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 13 } }
    local reqs = {}
    for i, p in ipairs(prompts) do
      reqs[i] = assert(e:submit { prompt_ids = p, max_tokens = 20, temperature = 0, ignore_eos = true })
    end
    e:run()
    for i, p in ipairs(prompts) do
      r1:reset()
      local out, logits = {}, assert(r1:forward(p, 0))
      for k = 1, 20 do
        out[k] = r1:argmax(logits)
        logits = assert(r1:forward(out[k]))
      end
      assert.are.same(out, reqs[i].output_ids, "prompt " .. i)
      assert.are.equal("", reqs[i].text)
    end
    assert.is_true(e:stats().prefix_hits > 0)
    assert.are.equal(0, e:stats().kv_blocks_used)
    e:close()
    m:close()
    r1:close()
  end)
end)

describe("runner KV slots", function()
  it("copy_kv copies a prefix's rows so another slot continues as the first would", function()
    local m = assert(moonshard.load(h.hf .. "/llama3", { batch = 3, chunk = 8 }))
    local net = m.net
    local ids = { 1, 5, 9, 13, 17, 21, 25, 29, 33, 37 }
    assert(net:forward_slot(0, ids, 0))
    -- slot 2 gets positions 0..7 copied and computes only 8..9
    assert(net:copy_kv(0, 2, 0, 8))
    local a = assert(net:forward_slot(2, { ids[9], ids[10] }, 8)):values()
    local b = assert(net:step { { slot = 0, pos = 8, tokens = { ids[9], ids[10] } } }):values()
    assert.is_true(h.max_abs_diff(a, b) < 1e-5)
    -- forward_slot's every-position logits equal runner:forward's
    local all = assert(net:forward_slot(1, ids, 0, { all_logits = true }))
    local want = assert(net:forward(ids, 0, { all_logits = true }))
    assert.is_true(h.max_abs_diff(all:values(), want:values()) < 1e-5)
    all:free(); want:free()
    local ok, err = net:copy_kv(0, 3, 0, 1)
    assert.is_nil(ok)
    assert.truthy(err:find("outside [0, 3)", 1, true), err)
    ok, err = net:copy_kv(0, 1, 0, 10000)
    assert.is_nil(ok)
    assert.truthy(err:find("outside the context", 1, true), err)
    m:close()
  end)
end)

describe("engine over a paged KV cache", function()
  local pm, pref -- stories260K with a pool of KV blocks; the single-sequence reference
  local function passes(e) -- counts the runner's passes of each step
    local net, n = e.net, 0
    local run = net.run
    net.run = function(...) n = n + 1; return run(...) end
    return function() local k = n; n = 0; return k end, function() net.run = nil end
  end
  setup(function()
    pm = assert(moonshard.load(h.stories, { batch = 4, kv_blocks = 48, block_size = 16 }))
    pref = assert(moonshard.load(h.stories))
  end)
  teardown(function()
    pm:close()
    pref:close()
  end)

  local function alone_ids(prompt)
    local parts = {}
    assert(pref:generate({ prompt = prompt, max_tokens = N_GEN, temperature = 0 }, function(s) parts[#parts + 1] = s end))
    return table.concat(parts)
  end

  it("runs every step of ragged prompts, chunks and decodes as one pass, each answer as alone", function()
    local e = assert(engine_mod.new(pm, { max_tokens_per_step = 24 }))
    assert.is_true(e.sched.paged)
    local count, restore = passes(e)
    local reqs = {}
    for i, p in ipairs(PROMPTS) do reqs[i] = assert(e:submit { prompt = p, max_tokens = N_GEN, temperature = 0 }) end
    local mixed = 0
    while true do
      local before = #e.sched.running
      local left = e:step()
      assert.are.equal(1, count(), "one runner pass per step")
      assert(e.sched:check())
      if before > 1 then mixed = mixed + 1 end
      if left == 0 then break end
    end
    restore()
    assert.is_true(mixed > 0)
    for i, p in ipairs(PROMPTS) do assert.are.equal(alone_ids(p), reqs[i].text, "prompt " .. i) end
    local st = e:stats()
    assert.are.equal(0, st.kv_blocks_used)
    assert.are.equal(0, st.kv_copies)
    e:close()
  end)

  it("shares cached prefix blocks by reference (no copies), the same answers with caching on and off", function()
    local texts = {}
    for _, caching in ipairs { true, false } do
      local e = assert(engine_mod.new(pm, { max_tokens_per_step = 64, prefix_caching = caching }))
      local first = assert(e:submit { prompt = SHARED[1], max_tokens = N_GEN, temperature = 0 })
      e:run()
      local reqs = {}
      for i, p in ipairs(SHARED) do reqs[i] = assert(e:submit { prompt = p, max_tokens = N_GEN, temperature = 0 }) end
      -- while they run, the shared blocks are referenced by several tables at once
      e:step()
      if caching then
        local b1 = reqs[1].block_table[1]
        assert.are.equal(first.text, alone_ids(SHARED[1]))
        assert.is_true(e.sched.ref[b1] >= 2, "the first block is shared: " .. tostring(e.sched.ref[b1]))
        assert.are.equal(b1, reqs[2].block_table[1])
      end
      e:run()
      texts[caching] = {}
      for i, p in ipairs(SHARED) do
        texts[caching][i] = reqs[i].text
        assert.are.equal(alone_ids(p), reqs[i].text, "prompt " .. i)
      end
      local st = e:stats()
      assert.are.equal(0, st.kv_blocks_used)
      assert.are.equal(0, st.kv_copies)
      if caching then
        assert.is_true(st.prefix_hits >= 16 * #SHARED, "hits: " .. st.prefix_hits)
        assert.is_true(st.kv_blocks_cached > 0)
      else
        assert.are.equal(0, st.prefix_hits)
      end
      assert(e.sched:check())
      e:close()
    end
    assert.are.same(texts[true], texts[false])
  end)

  it("keeps every answer under chunking, preemption, LRU eviction and cancellations", function()
    -- 24 blocks of 4 positions for 4 running sequences: preemption and eviction of cached blocks
    local m4 = assert(moonshard.load(h.stories, { batch = 4, kv_blocks = 24, block_size = 4 }))
    local e = assert(engine_mod.new(m4, { max_tokens_per_step = 7 }))
    local prompts, reqs, cancelled = {}, {}, {}
    for i = 1, 12 do prompts[i] = i % 2 == 0 and SHARED[i / 2 % #SHARED + 1] or PROMPTS[i % #PROMPTS + 1] end
    for i, p in ipairs(prompts) do
      reqs[i] = assert(e:submit { prompt = p, max_tokens = N_GEN, temperature = 0,
        on_token = function(req)
          if i % 5 == 0 and #req.output_ids == 2 then e:cancel(req); cancelled[i] = true end
        end })
      e:step()
      assert(e.sched:check())
    end
    while e:step() > 0 do assert(e.sched:check()) end
    for i, p in ipairs(prompts) do
      if cancelled[i] then
        assert.are.equal("cancelled", reqs[i].finish_reason)
      else
        assert.are.equal(alone_ids(p), reqs[i].text, "prompt " .. i)
      end
    end
    local st = e:stats()
    assert.is_true(st.preemptions > 0 and st.prefix_hits > 0, "preemptions and prefix hits both happened")
    assert.are.equal(0, st.kv_copies)
    assert.are.equal(0, st.kv_blocks_used)
    e:close()
    m4:close()
  end)

  it("scores an echoed prompt through its block table as the contiguous cache does", function()
    local e = assert(engine_mod.new(pm, { max_tokens_per_step = 7 }))
    local r = assert(e:submit { prompt = PROMPTS[3], max_tokens = 0, echo = true, logprobs = 2 })
    e:run()
    pref:reset()
    local ids = r.prompt_ids
    local all = assert(pref.net:forward(ids, 0, { all_logits = true }))
    local V, vals = all:size(2), all:values()
    all:free()
    for i = 2, #ids do
      local row = { unpack(vals, (i - 2) * V + 1, (i - 1) * V) }
      local mx = -math.huge
      for _, x in ipairs(row) do mx = math.max(mx, x) end
      local s = 0
      for _, x in ipairs(row) do s = s + math.exp(x - mx) end
      local lp = row[ids[i] + 1] - mx - math.log(s)
      assert.is_true(math.abs(lp - r.prompt_logprobs[i]) < 1e-4, string.format("position %d: %g vs %g", i, lp,
        r.prompt_logprobs[i]))
    end
    assert.are.equal(0, e:stats().kv_blocks_used)
    e:close()
  end)

  it("frees the scored rows of a step whose next echo prompt fails, ending both requests with the error", function()
    local e = assert(engine_mod.new(pm, { max_tokens_per_step = 64 }))
    local net, calls, first = pm.net, 0, nil
    -- the first prompt's logits come through a wrapper that notes its free; the second fails
    net.forward_blocks = function(self, ...)
      calls = calls + 1
      if calls > 1 then return nil, "forward_blocks failed" end
      local t = assert(getmetatable(self).__index.forward_blocks(self, ...))
      first = { t = t, freed = false }
      return setmetatable({}, { __index = function(_, k)
        if k == "free" then return function() first.freed = true t:free() end end
        return function(_, ...) return t[k](t, ...) end
      end })
    end
    local ok, err = pcall(function()
      local a = assert(e:submit { prompt = PROMPTS[1], max_tokens = 0, echo = true })
      local b = assert(e:submit { prompt = PROMPTS[2], max_tokens = 0, echo = true })
      e:run()
      assert.are.equal(2, calls)
      assert.truthy(first)
      assert.is_true(first.freed)
      for _, r in ipairs { a, b } do
        assert.are.equal("error", r.finish_reason)
        assert.are.equal("forward_blocks failed", r.error)
      end
      assert.are.equal(0, e:stats().kv_blocks_used)
    end)
    net.forward_blocks = nil
    e:close()
    assert(ok, err)
  end)

  it("refuses a block size other than the pool's, and more blocks than it holds", function()
    local e, err = engine_mod.new(pm, { block_size = 8 })
    assert.is_nil(e)
    assert.truthy(err:find("differs from the model's KV blocks of 16", 1, true), err)
    e, err = engine_mod.new(pm, { num_blocks = 49 })
    assert.is_nil(e)
    assert.truthy(err:find("pool of 48 KV blocks", 1, true), err)
  end)
end)
