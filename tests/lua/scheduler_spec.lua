-- The scheduler without a model: the token budget shared by decodes and prefill chunks, chunked
-- prefill, preemption of the newest sequence when blocks run out (and its recomputation), the
-- block accounting back to zero, prefix hits (the same slot, or a copy from another), LRU
-- eviction of cached blocks, and replaceable policies.
local h = require "helpers"
local scheduler = require "moonshard.scheduler"

local function range(a, b)
  local t = {}
  for i = a, b do t[#t + 1] = i end
  return t
end

-- Drives a scheduler to the end: each step's sampled token is a function of the sequence's
-- tokens (what a model would do: the same tokens give the same next token), each sequence
-- generates seq.max_tokens. Returns the finished sequences in completion order and the plans.
local function drive(s, opts)
  opts = opts or {}
  local done, plans = {}, {}
  for _ = 1, opts.max_steps or 1000 do
    if s:has_work() == 0 then break end
    local plan = s:schedule()
    plans[#plans + 1] = plan
    assert(s:check())
    if opts.on_plan then opts.on_plan(plan) end
    s:update(plan)
    for _, e in ipairs(plan.entries) do
      local seq = e.seq
      if e.sample and seq.state == "running" then
        local toks = seq.tokens
        local id = (toks[#toks] * 7 + #toks) % 97
        seq.out = seq.out or {}
        seq.out[#seq.out + 1] = id
        if #seq.out >= seq.max_tokens then
          s:finish(seq)
          done[#done + 1] = seq
        else
          s:append(seq, id)
        end
      end
    end
    assert(s:check())
  end
  assert.are.equal(0, s:has_work(), "the scheduler did not finish its work")
  return done, plans
end

describe("scheduler", function()
  it("shares the token budget: running decodes first, then prompt chunks", function()
    local s = scheduler.new { slots = 4, max_seq = 256, max_tokens_per_step = 20, block_size = 4 }
    local a = s:add { tokens = range(1, 6), max_tokens = 10 }
    local b = s:add { tokens = range(1, 9), max_tokens = 10 }
    local p1 = s:schedule()
    assert.are.equal(2, #p1.entries)
    assert.are.equal(15, p1.num_tokens)
    assert.is_true(p1.entries[1].sample and p1.entries[2].sample)
    s:update(p1)
    s:append(a, 50); s:append(b, 51)
    local c = s:add { tokens = range(101, 140), max_tokens = 1 }
    local p2 = s:schedule()
    -- two decodes of one token, then 18 of the 40-token prompt
    assert.are.equal(3, #p2.entries)
    assert.are.same({ 1, 1, 18 }, { #p2.entries[1].tokens, #p2.entries[2].tokens, #p2.entries[3].tokens })
    assert.are.same({ 6, 9, 0 }, { p2.entries[1].pos, p2.entries[2].pos, p2.entries[3].pos })
    assert.are.equal(c, p2.entries[3].seq)
    assert.is_false(p2.entries[3].sample)
    assert.are.equal(20, p2.num_tokens)
    assert(s:check())
  end)

  it("serves decodes before prompt chunks, whatever the policy ranks first", function()
    local first = { compare = function(a, b) return (a.priority or 0) > (b.priority or 0) end }
    local s = scheduler.new { slots = 2, max_seq = 64, max_tokens_per_step = 4, block_size = 4, policy = first }
    local b = s:add { tokens = { 1, 2 } }
    local p = s:schedule(); s:update(p); s:append(b, 3)
    local a = s:add { tokens = range(10, 29), priority = 1 } -- ranked first, 20 tokens
    p = s:schedule(); s:update(p); s:append(b, 4)
    assert.are.same({ b, a }, { p.entries[1].seq, p.entries[2].seq })
    assert.are.same({ 1, 3 }, { #p.entries[1].tokens, #p.entries[2].tokens })
    p = s:schedule() -- a still prefilling: b's decode first again
    assert.are.same({ b, a }, { p.entries[1].seq, p.entries[2].seq })
    assert.are.same({ 1, 3 }, { #p.entries[1].tokens, #p.entries[2].tokens })
  end)

  it("withdraws a scheduled decode when it is preempted for a sequence ranked before it", function()
    local first = { compare = function(a, b) return (a.priority or 0) > (b.priority or 0) end }
    local s = scheduler.new { slots = 2, max_seq = 64, max_tokens_per_step = 4, block_size = 2, num_blocks = 6,
      policy = first, prefix_caching = false }
    local b = s:add { tokens = { 1, 2 } }
    local p = s:schedule(); s:update(p); s:append(b, 3)
    local a = s:add { tokens = range(10, 19), priority = 1 }
    local preempted
    for _ = 1, 4 do
      p = s:schedule()
      assert(s:check())
      if #p.preempted > 0 then preempted = p break end
      s:update(p)
      for _, e in ipairs(p.entries) do if e.sample then s:append(e.seq, 5) end end
    end
    assert.truthy(preempted, "no preemption")
    assert.are.same({ b }, preempted.preempted)
    assert.are.equal(1, #preempted.entries)
    assert.are.equal(a, preempted.entries[1].seq)
    assert.are.equal("waiting", b.state)
    assert.are.same({}, b.block_table)
    assert.is_true(preempted.num_tokens == #preempted.entries[1].tokens)
  end)

  it("splits a long prompt into chunks across steps, sampling after the last", function()
    local s = scheduler.new { slots = 1, max_seq = 128, max_tokens_per_step = 16, block_size = 4 }
    s:add { tokens = range(1, 50), max_tokens = 2 }
    local _, plans = drive(s)
    local shape = {}
    for _, p in ipairs(plans) do
      local e = p.entries[1]
      shape[#shape + 1] = string.format("%d+%d%s", e.pos, #e.tokens, e.sample and "s" or "")
    end
    assert.are.same({ "0+16", "16+16", "32+16", "48+2s", "50+1s" }, shape)
  end)

  it("runs a prompt whole without chunked prefill, alone when it exceeds the budget", function()
    local s = scheduler.new { slots = 2, max_seq = 128, max_tokens_per_step = 16, block_size = 4,
      chunked_prefill = false }
    s:add { tokens = range(1, 5), max_tokens = 4 }
    s:add { tokens = range(1, 30), max_tokens = 1 }
    local _, plans = drive(s)
    for _, p in ipairs(plans) do
      for _, e in ipairs(p.entries) do
        if e.pos == 0 then assert.are.equal(e.seq.prompt_len, #e.tokens) end
      end
    end
  end)

  it("admits sequences while slots last and frees every block at the end", function()
    local s = scheduler.new { slots = 3, max_seq = 64, max_tokens_per_step = 64, block_size = 4 }
    for i = 1, 7 do s:add { tokens = range(i, i + 2 * i), max_tokens = 3 + i } end
    local done, plans = drive(s)
    assert.are.equal(7, #done)
    for _, p in ipairs(plans) do
      local slots = {}
      for _, e in ipairs(p.entries) do
        assert.is_nil(slots[e.slot], "a slot twice in one step")
        slots[e.slot] = true
        assert.is_true(e.slot >= 0 and e.slot < 3)
      end
    end
    local st = s:stats()
    assert.are.equal(0, st.kv_blocks_used)
    assert.are.equal(st.kv_blocks_total, st.kv_blocks_free)
    assert.are.equal(0, st.running)
    assert.are.equal(0, st.waiting)
  end)

  it("preempts the newest running sequence when blocks run out, and recomputes it", function()
    -- 6 blocks of 4 tokens: two sequences of 8-token prompts generating 10 tokens each need 5
    -- blocks apiece at the end
    local s = scheduler.new { slots = 2, max_seq = 64, max_tokens_per_step = 64, block_size = 4, num_blocks = 6,
      prefix_caching = false }
    local a = s:add { tokens = range(1, 8), max_tokens = 10 }
    local b = s:add { tokens = range(11, 18), max_tokens = 10 }
    local first_preempted
    local done = drive(s, { on_plan = function(p)
      if #p.preempted > 0 and not first_preempted then first_preempted = p.preempted[1] end
    end })
    assert.are.equal(b, first_preempted)
    assert.is_true(b.preemptions >= 1)
    assert.are.equal(0, a.preemptions)
    assert.are.same({ a, b }, done)
    -- the recomputed sequence generated what it would have alone
    local ref = scheduler.new { slots = 1, max_seq = 64, max_tokens_per_step = 64, block_size = 4 }
    local b2 = ref:add { tokens = range(11, 18), max_tokens = 10 }
    drive(ref)
    assert.are.same(b2.out, b.out)
    assert.is_true(s:stats().preemptions >= 1)
    assert.are.equal(0, s:stats().kv_blocks_used)
  end)

  it("cancels waiting and running sequences, freeing their blocks and slots at once", function()
    local s = scheduler.new { slots = 1, max_seq = 64, max_tokens_per_step = 64, block_size = 4 }
    local a = s:add { tokens = range(1, 10) }
    local b = s:add { tokens = range(1, 10) }
    local p = s:schedule()
    s:update(p)
    assert.are.equal(3, s:stats().kv_blocks_used)
    assert.are.equal("running", a.state)
    s:finish(b) -- waiting
    assert.are.equal(0, s:stats().waiting)
    s:finish(a) -- running
    s:finish(a) -- twice: nothing
    assert.are.equal("finished", a.state)
    local st = s:stats()
    assert.are.equal(0, st.kv_blocks_used)
    assert.are.equal(0, st.running)
    assert.is_nil(s.slots[0].seq)
    assert(s:check())
  end)

  it("hits cached full blocks of a shared prefix, in the same slot or copied from another", function()
    local s = scheduler.new { slots = 2, max_seq = 128, max_tokens_per_step = 128, block_size = 4 }
    local a = s:add { tokens = range(1, 14), max_tokens = 2 } -- 3 full blocks + 2
    drive(s)
    assert.are.equal(0, s:stats().prefix_hits)
    -- the same 12-token prefix then other tokens: 3 blocks hit in the slot that holds them
    local b = s:add { tokens = (function() local t = range(1, 12); t[13] = 99; return t end)(), max_tokens = 2 }
    local p = s:schedule()
    assert.are.equal(0, #p.copies)
    assert.are.equal(0, p.entries[1].slot)
    assert.are.equal(12, p.entries[1].pos)
    assert.are.same({ 99 }, p.entries[1].tokens)
    assert.are.equal(12, s:stats().prefix_hits)
    assert.are.equal(14 + 13, s:stats().prefix_queries)
    s:update(p)
    -- while b runs in slot 0, c shares its first two blocks: copied into slot 1
    local c = s:add { tokens = { 1, 2, 3, 4, 5, 6, 7, 8, 50, 51 }, max_tokens = 1 }
    p = s:schedule()
    assert.are.equal(1, #p.copies)
    assert.are.same({ src = 0, dst = 1, first_pos = 0, n_pos = 8 }, p.copies[1])
    local e
    for _, x in ipairs(p.entries) do if x.seq == c then e = x end end
    assert.are.equal(8, e.pos)
    assert.are.equal(20, s:stats().prefix_hits)
    s:update(p)
    assert(s:check())
    -- a whole prompt cached still computes its last token (its logits are needed)
    s:finish(b); s:finish(c)
    local d = s:add { tokens = range(1, 12), max_tokens = 1 }
    p = s:schedule()
    assert.are.equal(8, p.entries[1].pos)
    assert.are.equal(4, #p.entries[1].tokens)
    s:update(p)
    s:finish(d)
    assert.are.equal(0, s:stats().kv_blocks_used)
    assert(s:check())
  end)

  it("skips the cache for sequences that ask to compute every token", function()
    local s = scheduler.new { slots = 1, max_seq = 64, max_tokens_per_step = 64, block_size = 4 }
    s:add { tokens = range(1, 9), max_tokens = 1 }
    drive(s)
    local b = s:add { tokens = range(1, 9), max_tokens = 1, skip_prefix_cache = true }
    local p = s:schedule()
    assert.are.equal(0, p.entries[1].pos)
    assert.are.equal(b, p.entries[1].seq)
  end)

  it("evicts the least recently used cached blocks first, and a chain's tail before its head", function()
    -- 4 blocks of 2 tokens; one slot
    local s = scheduler.new { slots = 2, max_seq = 16, max_tokens_per_step = 16, block_size = 2, num_blocks = 4 }
    s:add { tokens = { 1, 2, 3, 4, 5 }, max_tokens = 1 } -- blocks [1 2] [3 4] + 1 partial
    drive(s)
    assert.are.equal(2, s:stats().kv_blocks_cached)
    -- a 5-token prompt of other tokens needs 3 blocks: 2 free, 1 evicted (the tail [3 4])
    s:add { tokens = { 9, 9, 9, 9, 9 }, max_tokens = 1 }
    drive(s)
    -- [1 2] is still cached, [3 4] is not
    local c = s:add { tokens = { 1, 2, 3, 4, 7 }, max_tokens = 1 }
    local p = s:schedule()
    assert.are.equal(2, p.entries[1].pos)
    assert.are.equal(c, p.entries[1].seq)
    s:update(p)
    s:finish(c)
    assert(s:check())
  end)

  it("gives identical generations with prefix caching on and off, and hits on a repeated prefix", function()
    local function run(caching)
      local s = scheduler.new { slots = 3, max_seq = 128, max_tokens_per_step = 24, block_size = 4,
        prefix_caching = caching, num_blocks = 40 }
      local seqs = {}
      local sys = range(30, 50)
      for i = 1, 8 do
        local t = { unpack(sys) }
        for k = 1, i do t[#t + 1] = 60 + k end
        seqs[i] = s:add { tokens = t, max_tokens = 5 + i % 3 }
      end
      drive(s)
      local outs = {}
      for i, q in ipairs(seqs) do outs[i] = q.out end
      return outs, s:stats()
    end
    local on, st_on = run(true)
    local off, st_off = run(false)
    assert.are.same(off, on)
    assert.is_true(st_on.prefix_hits > 0)
    assert.are.equal(0, st_off.prefix_hits)
    assert.are.equal(0, st_on.kv_blocks_used)
  end)

  it("orders admission by a replaceable policy: FCFS, shortest prompt first, a file", function()
    local function order(policy)
      local s = scheduler.new { slots = 1, max_seq = 128, max_tokens_per_step = 128, block_size = 4, policy = policy }
      s:add { id = "long", tokens = range(1, 30), max_tokens = 2 }
      s:add { id = "mid", tokens = range(1, 12), max_tokens = 2 }
      s:add { id = "short", tokens = range(1, 3), max_tokens = 2 }
      local done = drive(s)
      local ids = {}
      for i, q in ipairs(done) do ids[i] = q.id end
      return ids
    end
    assert.are.same({ "long", "mid", "short" }, order(nil))
    assert.are.same({ "long", "mid", "short" }, order("fcfs"))
    assert.are.same({ "short", "mid", "long" }, order("spf"))
    assert.are.same({ "short", "mid", "long" }, order(h.root .. "/examples/policy_shortest_first.lua"))
    assert.are.same({ "short", "long", "mid" }, order { compare = function(a, b)
      return (a.id == "short" and 0 or a.arrival) < (b.id == "short" and 0 or b.arrival)
    end })
    -- swapped on a live scheduler
    local s = scheduler.new { slots = 1, max_seq = 64, block_size = 4 }
    assert(s:set_policy("spf"))
    assert.are.equal("spf", s.policy.name)
    local ok, err = s:set_policy("nope")
    assert.is_nil(ok)
    assert.truthy(err:find("unknown scheduling policy 'nope'", 1, true), err)
    ok, err = scheduler.policy { }
    assert.is_nil(ok)
    assert.truthy(err:find("compare", 1, true), err)
    ok, err = scheduler.policy("/nonexistent/policy.lua")
    assert.is_nil(ok)
    assert.truthy(err:find("/nonexistent/policy.lua", 1, true), err)
  end)

  it("keeps its accounting through random arrivals, cancellations and a tight block budget", function()
    local rng = 12345
    local function rand(n) rng = (rng * 1103515245 + 12345) % 2147483648; return rng % n + 1 end
    local preemptions, hits = 0, 0
    for round = 1, 20 do
      local bs = 1 + rand(6)
      -- room for the longest sequence (36 tokens) and a few more
      local s = scheduler.new { slots = 1 + rand(4), max_seq = 96, max_tokens_per_step = 4 + rand(40),
        block_size = bs, num_blocks = math.ceil(40 / bs) + rand(20), prefix_caching = round % 3 ~= 0,
        policy = round % 2 == 0 and "spf" or "fcfs" }
      local all, cancelled = {}, {}
      local function step()
        local plan = s:schedule()
        assert(s:check())
        s:update(plan)
        for _, e in ipairs(plan.entries) do
          local q = e.seq
          if e.sample and q.state == "running" then
            q.n_out = (q.n_out or 0) + 1
            if q.n_out >= q.max_tokens then s:finish(q) else s:append(q, rand(90)) end
          end
        end
        assert(s:check())
      end
      for _ = 1, 200 do
        if rand(3) == 1 and #all < 25 then
          local t = {}
          local shared = rand(3) -- a few shared prefixes
          for i = 1, 4 + rand(20) do t[i] = i <= 12 and shared * 10 + i or rand(90) end
          all[#all + 1] = s:add { tokens = t, max_tokens = rand(12) }
        end
        if rand(10) == 1 and #all > 0 then
          local q = all[rand(#all)]
          if q.state ~= "finished" then s:finish(q); cancelled[q] = true end
        end
        if s:has_work() > 0 then step() end
      end
      for _ = 1, 2000 do
        if s:has_work() == 0 then break end
        step()
      end
      for _, q in ipairs(all) do
        assert.are.equal("finished", q.state)
        if not cancelled[q] then assert.are.equal(q.max_tokens, q.n_out) end
      end
      assert.are.equal(0, s:stats().kv_blocks_used)
      preemptions, hits = preemptions + s:stats().preemptions, hits + s:stats().prefix_hits
    end
    assert.is_true(preemptions > 0 and hits > 0, "the rounds preempted and hit the cache")
  end)

  it("chains block hashes over the whole prefix", function()
    local a = { tokens = { 1, 2, 3, 4, 5, 6, 7, 8 }, block_hashes = {} }
    local b = { tokens = { 9, 2, 3, 4, 5, 6, 7, 8 }, block_hashes = {} }
    local c = { tokens = { 1, 2, 3, 4, 5, 6, 7, 8 }, block_hashes = {} }
    assert.are_not.equal(scheduler.block_hash(a, 2, 4), scheduler.block_hash(b, 2, 4)) -- same block, other parent
    assert.are.equal(scheduler.block_hash(a, 2, 4), scheduler.block_hash(c, 2, 4))
    assert.are.equal(16, #scheduler.block_hash(a, 1, 4))
  end)
end)
