-- moonshard.scheduler: which sequences compute which tokens in the next step (continuous
-- batching with chunked prefill), the KV block manager (block tables, prefix caching) and the
-- KV slots sequences run in. Pure Lua over plain tables: it runs and is tested without a model.
--
-- The engine loop is vLLM v1's: plan = sched:schedule() -> the runner executes the plan ->
-- sched:update(plan), then sched:append(seq, id) for each sampled token and sched:finish(seq)
-- for each sequence that ended.
--
--   local scheduler = require "moonshard.scheduler"
--   local s = scheduler.new { slots = 4, max_seq = 256, max_tokens_per_step = 512, block_size = 16 }
--   local seq = s:add { tokens = { 1, 5, 9 } }     -- the prompt; the table is the sequence
--   local plan = s:schedule()
--   -- plan.copies: { src, dst, first_pos, n_pos } KV rows to copy before the step (prefix hits)
--   -- plan.entries: { seq, slot, pos, tokens, sample } in the runner's step form; sample: this
--   --   chunk ends at the sequence's last known token, so its logits give the next one
--   s:update(plan); s:append(seq, next_id) ... s:finish(seq)
--
-- Each step, under a budget of max_tokens_per_step tokens: running decodes first (one token
-- each), then running prompts still being prefilled (the rest of the budget or their remaining
-- tokens), each in policy order, then waiting ones in policy order while a slot, blocks and
-- budget remain (so a decode never waits behind a long prompt's chunk). A
-- long prompt is split into chunks across steps (SplitFuse); its chunks share steps with the
-- running decodes. When a running sequence needs a block and none is free, the running sequence
-- the policy ranks last (FCFS: the newest) is preempted: its blocks are freed and it goes back
-- to waiting, to be recomputed (prompt and what it generated) when it is admitted again.
--
-- Blocks: block_size tokens of one sequence's KV; a sequence holds ceil(computed / block_size)
-- of them in its block table. With prefix caching, every full computed block is registered
-- under a hash chained block by block over the token prefix (block j's hash covers tokens 1 ..
-- j * block_size); a new sequence reuses the longest run of cached blocks that matches its
-- tokens (at least its last token is computed: its logits are needed). Freed registered blocks
-- stay cached, ordered least recently used first, and are evicted only when a block is needed
-- and no never-used one is left.
--
-- Slots and the physical KV: the runner's cache is one row of max_seq positions per slot, not a
-- pool of pages, so block j of the sequence in slot s lives at positions [(j-1)*bs, j*bs) of
-- slot s. The scheduler keeps, per slot, the run of registered blocks whose K/V rows are valid
-- there (`holds`, a prefix: block j's rows depend on every token before it). A finished
-- sequence's slot keeps its rows until the slot is reused or the blocks are evicted, so a
-- cached block lives wherever some slot holds it (homes). A prefix hit reuses a free slot that
-- already holds the matching run when there is one, else plans a copy of the rows from a slot
-- holding it into the new slot (runner:copy_kv).
--
-- Paged (opts.paged, a runner loaded with kv_blocks): the blocks are physical, block b is
-- block b - 1 of the runner's pool, and entries carry e.blocks, the sequence's table in the
-- runner's 0-based ids. A prefix hit shares the cached blocks by reference count (no rows move,
-- plan.copies stays empty); slots only count the sequences running at once. A block another
-- sequence already registered under the same prefix is not swapped in after the fact: each
-- sequence reads the rows it computed itself.
local bit = require "bit"

local M = {}

-- ----------------------------------------------------------------------------- policies
-- A policy is a table: compare(a, b) -> true when sequence a goes before b (admission order of
-- waiting sequences and priority of running ones: the running sequence ranked last is the one
-- preempted). A sequence offers: id, arrival (a counter), prompt_len, tokens (#tokens: prompt
-- plus generated), num_computed, max_tokens (when the engine sets it), preemptions, and any
-- field its submitter put on it (e.g. priority).

M.policies = {
  fcfs = {
    name = "fcfs",
    compare = function(a, b) return a.arrival < b.arrival end,
  },
  spf = {
    name = "spf", -- shortest prompt first; equal lengths in arrival order
    compare = function(a, b)
      if a.prompt_len ~= b.prompt_len then return a.prompt_len < b.prompt_len end
      return a.arrival < b.arrival
    end,
  },
}

-- M.policy(p) -> policy table | nil, message. p: nil ("fcfs"), a built-in name ("fcfs",
-- "spf"), a table with compare, or the path of a Lua file returning one.
function M.policy(p)
  if p == nil then return M.policies.fcfs end
  if type(p) == "string" then
    if M.policies[p] then return M.policies[p] end
    if not p:find("%.lua$") and not p:find("/", 1, true) then
      return nil, string.format("unknown scheduling policy '%s' (fcfs, spf, or a FILE.lua)", p)
    end
    local chunk, err = loadfile(p)
    if not chunk then return nil, string.format("policy '%s': %s", p, err) end
    local ok, res = pcall(chunk)
    if not ok then return nil, string.format("policy '%s': %s", p, tostring(res)) end
    local pol, perr = M.policy(type(res) == "table" and res or nil)
    if type(res) ~= "table" or not pol then
      return nil, string.format("policy '%s' must return a table with compare(a, b)%s", p,
        perr and (": " .. perr) or "")
    end
    return pol
  end
  if type(p) ~= "table" or type(p.compare) ~= "function" then
    return nil, "a scheduling policy is a table with compare(a, b) -> true when a goes first"
  end
  return p
end

-- ------------------------------------------------------------------------ block hashes
-- Two 32-bit FNV-1a-style lanes over the parent's hash and the block's token ids (a 64-bit key;
-- a hit also compares the block's tokens and parent, so a collision cannot alias two prefixes).
local bxor, tobit, tohex = bit.bxor, bit.tobit, bit.tohex

local function mul32(a, b) -- (a * b) mod 2^32 as a signed 32-bit number, exact in doubles
  local hi, lo = math.floor(b / 65536), b % 65536
  return tobit(tobit(a * hi) * 65536 + a * lo)
end

local P1, P2 = 16777619, 0x5bd1e995
local SEED1, SEED2 = tobit(0x811c9dc5), tobit(0x3c6ef372)

-- The hash of block j (1-based) of seq's tokens, chained from block j - 1's (memoized).
local function block_hash(seq, j, bs)
  local hs = seq.block_hashes
  local h = hs[j]
  if h then return h end
  local h1, h2
  if j == 1 then
    h1, h2 = SEED1, SEED2
  else
    local parent = block_hash(seq, j - 1, bs)
    h1, h2 = tonumber(parent:sub(1, 8), 16), tonumber(parent:sub(9, 16), 16)
    h1, h2 = tobit(h1), tobit(h2)
  end
  local toks = seq.tokens
  for i = (j - 1) * bs + 1, j * bs do
    local t = toks[i]
    h1 = mul32(bxor(h1, t), P1)
    h2 = mul32(bxor(h2, t), P2)
  end
  h = tohex(h1) .. tohex(h2)
  hs[j] = h
  return h
end
M.block_hash = block_hash

-- ---------------------------------------------------------------------------- scheduler
local Scheduler = {}
Scheduler.__index = Scheduler

-- M.new(opts) -> scheduler
--   slots                 KV slots (sequences running at once), required
--   max_seq               positions per slot (the context), required
--   max_tokens_per_step   the token budget of a step (default 512)
--   block_size            tokens per KV block (default 16)
--   num_blocks            blocks in the pool (default: slots * ceil(max_seq / block_size), all
--                         the cache holds; fewer makes a smaller budget that preempts sooner)
--   prefix_caching        reuse cached full blocks (default true)
--   chunked_prefill       split prompts across steps (default true; false: a prompt waits for
--                         a step with room for all of it, or runs alone)
--   policy                see M.policy (default "fcfs")
--   paged                 the blocks are a paged cache's (see above; default false)
function M.new(opts)
  assert(type(opts) == "table", "scheduler.new: options table expected")
  local slots, max_seq = opts.slots, opts.max_seq
  assert(type(slots) == "number" and slots >= 1 and slots % 1 == 0, "scheduler: slots must be a positive integer")
  assert(type(max_seq) == "number" and max_seq >= 1 and max_seq % 1 == 0, "scheduler: max_seq must be a positive integer")
  local bs = opts.block_size or 16
  assert(type(bs) == "number" and bs >= 1 and bs % 1 == 0, "scheduler: block_size must be a positive integer")
  local budget = opts.max_tokens_per_step or 512
  assert(type(budget) == "number" and budget >= 1 and budget % 1 == 0,
    "scheduler: max_tokens_per_step must be a positive integer")
  local nb = opts.num_blocks or slots * math.ceil(max_seq / bs)
  assert(type(nb) == "number" and nb >= 1 and nb % 1 == 0, "scheduler: num_blocks must be a positive integer")
  local policy, perr = M.policy(opts.policy)
  if not policy then error(perr, 2) end
  local self = setmetatable({
    n_slots = slots, max_seq = max_seq, block_size = bs, budget = budget, num_blocks = nb,
    prefix_caching = opts.prefix_caching ~= false, chunked_prefill = opts.chunked_prefill ~= false,
    policy = policy, paged = opts.paged == true,
    waiting = {}, running = {}, arrivals = 0, tick = 0,
    -- blocks (ids 1 .. nb): references, registered hash, its tokens and parent's hash, index in
    -- its chain, slots holding its rows
    ref = {}, hash = {}, btokens = {}, bparent = {}, bindex = {}, homes = {},
    by_hash = {},
    free = {}, -- never used or unregistered blocks (a stack)
    lru_prev = {}, lru_next = {}, lru_head = nil, lru_tail = nil, n_cached = 0, -- freed registered blocks
    n_used = 0,
    slots = {},
    counters = { prefix_queries = 0, prefix_hits = 0, preemptions = 0, steps = 0, scheduled_tokens = 0 },
  }, Scheduler)
  for b = nb, 1, -1 do self.free[#self.free + 1] = b; self.ref[b] = 0 end
  for s = 0, slots - 1 do self.slots[s] = { seq = nil, holds = {}, last_used = 0 } end
  return self
end

-- sched:set_policy(p) -> true | nil, message: replaces the policy (M.policy's forms) at once.
function Scheduler:set_policy(p)
  local pol, err = M.policy(p)
  if not pol then return nil, err end
  self.policy = pol
  return true
end

-- ------------------------------------------------------------------ the cached blocks' LRU

local function lru_remove(self, b)
  local p, n = self.lru_prev[b], self.lru_next[b]
  if p then self.lru_next[p] = n else self.lru_head = n end
  if n then self.lru_prev[n] = p else self.lru_tail = p end
  self.lru_prev[b], self.lru_next[b] = nil, nil
  self.n_cached = self.n_cached - 1
end

local function lru_push(self, b) -- most recently used at the tail
  local t = self.lru_tail
  self.lru_prev[b], self.lru_next[b] = t, nil
  if t then self.lru_next[t] = b else self.lru_head = b end
  self.lru_tail = b
  self.n_cached = self.n_cached + 1
end

local evict

-- Drops slot s's rows from block index k + 1 on (they are about to be overwritten, or their
-- chain lost a block); a cached block left with no home and no reference is evicted.
local function truncate(self, s, k)
  local holds = self.slots[s].holds
  for j = #holds, k + 1, -1 do
    local b = holds[j]
    holds[j] = nil
    local homes = self.homes[b]
    if homes then
      homes[s] = nil
      if self.ref[b] == 0 and next(homes) == nil then evict(self, b) end
    end
  end
end

-- Forgets registered block b (ref 0, cached): out of the hash table and the LRU, its rows
-- dropped from every slot holding them, back to the free stack.
function evict(self, b)
  if self.lru_prev[b] or self.lru_next[b] or self.lru_head == b then lru_remove(self, b) end
  local h = self.hash[b]
  if h and self.by_hash[h] == b then self.by_hash[h] = nil end
  self.hash[b], self.btokens[b], self.bparent[b] = nil, nil, nil
  local homes, j = self.homes[b], self.bindex[b]
  self.homes[b], self.bindex[b] = nil, nil
  if homes then
    for s in pairs(homes) do truncate(self, s, j - 1) end
  end
  self.free[#self.free + 1] = b
end

-- Blocks a new allocation can take: the free ones and the cached unreferenced ones.
function Scheduler:available_blocks()
  return #self.free + self.n_cached
end

local function take_block(self)
  local b = table.remove(self.free)
  if not b then
    b = self.lru_head
    if not b then return nil end
    evict(self, b) -- pushes b on the free stack
    b = table.remove(self.free)
  end
  self.ref[b] = 1
  self.n_used = self.n_used + 1
  return b
end

local function ref_block(self, b) -- one more sequence uses cached block b
  if self.ref[b] == 0 then
    lru_remove(self, b)
    self.n_used = self.n_used + 1
  end
  self.ref[b] = self.ref[b] + 1
end

local function unref_block(self, b)
  local r = self.ref[b] - 1
  self.ref[b] = r
  if r > 0 then return end
  self.n_used = self.n_used - 1
  if self.hash[b] and (self.paged or (self.homes[b] and next(self.homes[b]))) then
    lru_push(self, b)
  else
    if self.hash[b] then evict(self, b) else self.free[#self.free + 1] = b end
  end
end

-- ------------------------------------------------------------------------------- sequences

-- sched:add(seq) -> seq: a new waiting sequence. seq.tokens: its prompt (token ids, at least
-- one); optional seq.id, seq.skip_prefix_cache (compute every token: e.g. when each prompt
-- position's logits are wanted). The scheduler sets arrival, prompt_len, num_computed,
-- block_table, block_hashes, slot, state ("waiting", "running", "finished"), preemptions.
function Scheduler:add(seq)
  assert(type(seq) == "table" and type(seq.tokens) == "table" and #seq.tokens >= 1,
    "scheduler:add: a sequence needs tokens")
  self.arrivals = self.arrivals + 1
  seq.arrival = self.arrivals
  seq.id = seq.id or self.arrivals
  seq.prompt_len = seq.prompt_len or #seq.tokens
  seq.num_computed, seq.block_table, seq.block_hashes = 0, {}, {}
  seq.registered = 0 -- leading blocks registered in the prefix cache (or deduplicated into it)
  seq.preemptions = seq.preemptions or 0
  seq.slot, seq.state = nil, "waiting"
  self.waiting[#self.waiting + 1] = seq
  return seq
end

-- sched:append(seq, id): a token sampled for seq (computed in a later step).
function Scheduler:append(seq, id)
  seq.tokens[#seq.tokens + 1] = id
end

local function remove_from(list, x)
  for i = 1, #list do
    if list[i] == x then table.remove(list, i) return true end
  end
  return false
end

-- Frees seq's blocks (last first, so a chain's tail is evicted before its head) and its slot
-- (whose registered rows stay cached).
local function release(self, seq)
  local bt = seq.block_table
  for j = #bt, 1, -1 do unref_block(self, bt[j]) end
  seq.block_table = {}
  if seq.slot then
    local sl = self.slots[seq.slot]
    self.tick = self.tick + 1
    sl.seq, sl.last_used = nil, self.tick
    truncate(self, seq.slot, seq.registered) -- rows past the registered run are not cached
    seq.slot = nil
  end
end

-- sched:finish(seq): the sequence ended (done, cancelled): it leaves the waiting or running
-- list, its blocks and slot are freed at once. Finishing twice does nothing.
function Scheduler:finish(seq)
  if seq.state == "finished" then return end
  if seq.state == "waiting" then
    remove_from(self.waiting, seq)
  else
    remove_from(self.running, seq)
    release(self, seq)
  end
  seq.state = "finished"
end

local function preempt(self, seq)
  remove_from(self.running, seq)
  release(self, seq)
  seq.num_computed, seq.registered, seq.state = 0, 0, "waiting"
  seq.preemptions = seq.preemptions + 1
  self.counters.preemptions = self.counters.preemptions + 1
  self.waiting[#self.waiting + 1] = seq
end

-- Blocks seq needs to hold n computed tokens, beyond those it holds.
local function blocks_needed(self, seq, n)
  local need = math.ceil(n / self.block_size) - #seq.block_table
  return need > 0 and need or 0
end

local function grow(self, seq, n)
  local bt = seq.block_table
  for _ = 1, blocks_needed(self, seq, n) do bt[#bt + 1] = assert(take_block(self)) end
end

-- The cached blocks matching seq's leading full blocks (at least one token left to compute).
local function lookup(self, seq)
  local bs, toks = self.block_size, seq.tokens
  local hits = {}
  if not self.prefix_caching or seq.skip_prefix_cache then return hits end
  local n_full = math.floor((#toks - 1) / bs)
  for j = 1, n_full do
    local h = block_hash(seq, j, bs)
    local b = self.by_hash[h]
    if not b or self.bparent[b] ~= (j > 1 and seq.block_hashes[j - 1] or false) then break end
    local bt, same = self.btokens[b], true
    local base = (j - 1) * bs
    for i = 1, bs do
      if bt[i] ~= toks[base + i] then same = false break end
    end
    if not same then break end
    hits[j] = b
  end
  return hits
end

-- The free slot for a sequence whose first k blocks are the cached hits: the one holding the
-- longest run of them, else an empty one, else the least recently used; lowest index on ties
-- (which keeps running sequences in adjacent slots, so decodes batch into few passes).
local function choose_slot(self, hits)
  local best, best_m, best_key
  for s = 0, self.n_slots - 1 do
    local sl = self.slots[s]
    if not sl.seq then
      local m = 0
      while hits[m + 1] and sl.holds[m + 1] == hits[m + 1] do m = m + 1 end
      -- key: more matching blocks, then fewer cached rows to lose, then least recently used
      local lose = #sl.holds - m
      local better
      if not best then better = true
      elseif m ~= best_m then better = m > best_m
      elseif (lose == 0) ~= (best_key.lose == 0) then better = lose == 0
      elseif lose > 0 then better = sl.last_used < best_key.last_used
      else better = false end
      if better then best, best_m, best_key = s, m, { lose = lose, last_used = sl.last_used } end
    end
  end
  return best, best_m
end

-- Registers seq's newly computed full blocks in the prefix cache (or swaps them for the cached
-- block of the same prefix) and records that its slot holds their rows.
local function register(self, seq)
  if not self.prefix_caching then return end
  local bs, bt = self.block_size, seq.block_table
  local full = math.floor(seq.num_computed / bs)
  local holds = self.slots[seq.slot].holds
  while seq.registered < full and not seq.no_register do
    local j = seq.registered + 1
    local h = block_hash(seq, j, bs)
    local parent = j > 1 and seq.block_hashes[j - 1] or false
    local b = bt[j]
    local cached = self.by_hash[h]
    if self.paged then
      if not cached then -- (else the prefix is cached in another block: ours stays unregistered)
        local toks, base = {}, (j - 1) * bs
        for i = 1, bs do toks[i] = seq.tokens[base + i] end
        self.hash[b], self.btokens[b], self.bparent[b], self.bindex[b] = h, toks, parent, j
        self.by_hash[h] = b
      end
      seq.registered = j
    elseif cached and cached ~= b then
      local same = self.bparent[cached] == parent
      local ct, base = self.btokens[cached], (j - 1) * bs
      for i = 1, bs do if not same then break end same = ct[i] == seq.tokens[base + i] end
      if not same then seq.no_register = true break end -- a hash collision: stop caching this one
      ref_block(self, cached) -- the same prefix is cached: use that block, free ours
      bt[j] = cached
      unref_block(self, b)
      b = cached
    elseif not cached then
      local toks, base = {}, (j - 1) * bs
      for i = 1, bs do toks[i] = seq.tokens[base + i] end
      self.hash[b], self.btokens[b], self.bparent[b], self.bindex[b] = h, toks, parent, j
      self.homes[b] = self.homes[b] or {}
      self.by_hash[h] = b
    end
    if not self.paged then
      if #holds ~= j - 1 then seq.no_register = true break end -- (the slot lost its run: keep it consistent)
      holds[j] = b
      self.homes[b][seq.slot] = true
      seq.registered = j
    end
  end
end

-- seq's block table in the runner's ids (0-based), a table kept per sequence (paged).
local function pool_blocks(seq)
  local t, bt = seq.pool_blocks, seq.block_table
  if not t then t = {}; seq.pool_blocks = t end
  for j = 1, #bt do t[j] = bt[j] - 1 end
  for j = #t, #bt + 1, -1 do t[j] = nil end
  return t
end

local function sorted(list, policy)
  local cmp = policy.compare
  table.sort(list, function(a, b)
    if a == b then return false end
    return cmp(a, b)
  end)
  return list
end

-- The tokens of seq from index first + 1 (1-based), n of them: a table reused per sequence for
-- decodes, a new one for chunks.
local function slice(seq, first, n)
  if n == 1 then
    local t = seq.decode_buf
    if not t then t = {}; seq.decode_buf = t end
    t[1] = seq.tokens[first + 1]
    return t
  end
  return { unpack(seq.tokens, first + 1, first + n) }
end

-- sched:schedule() -> plan { entries = { { seq, slot, pos, tokens, sample } }, copies =
-- { { src, dst, first_pos, n_pos } }, preempted = { seq ... }, num_tokens }.
function Scheduler:schedule()
  local c = self.counters
  c.steps = c.steps + 1
  local budget = self.budget
  local plan = { entries = {}, copies = {}, preempted = {}, num_tokens = 0 }
  local entries = plan.entries

  -- running sequences first: decodes, then prompts still in prefill, each in policy order; when
  -- blocks run out the running sequence ranked last is preempted (its entry, if it had one this
  -- step, withdrawn), and when that is the one asking, the step's running part ends
  local running = sorted(self.running, self.policy)
  local entry_of = {}
  local function schedule_running(seq)
    local n = math.min(#seq.tokens - seq.num_computed, budget)
    if n <= 0 then return true end
    local target = seq.num_computed + n
    while blocks_needed(self, seq, target) > self:available_blocks() do
      local victim = running[#running]
      preempt(self, victim)
      plan.preempted[#plan.preempted + 1] = victim
      local e = entry_of[victim]
      if e then
        budget = budget + #entries[e].tokens
        entries[e], entry_of[victim] = false, nil
      end
      if victim == seq then return false end
    end
    grow(self, seq, target)
    entries[#entries + 1] = {
      seq = seq, slot = seq.slot, pos = seq.num_computed, tokens = slice(seq, seq.num_computed, n),
      sample = target == #seq.tokens, blocks = self.paged and pool_blocks(seq) or nil,
    }
    entry_of[seq] = #entries
    budget = budget - n
    return true
  end
  local decodes, prefills = {}, {}
  for _, seq in ipairs(running) do
    local list = #seq.tokens - seq.num_computed == 1 and decodes or prefills
    list[#list + 1] = seq
  end
  local go = true
  for _, list in ipairs { decodes, prefills } do
    for _, seq in ipairs(list) do
      if budget <= 0 or not go then break end
      if seq.state == "running" then go = schedule_running(seq) end
    end
  end
  if #plan.preempted > 0 then
    local kept = {}
    for _, e in ipairs(entries) do if e then kept[#kept + 1] = e end end
    entries = kept
    plan.entries = kept
  end

  -- then waiting ones (none in a step that preempted: the blocks are short)
  if #plan.preempted == 0 and #self.waiting > 0 then
    local waiting = sorted(self.waiting, self.policy)
    local admitted = {}
    for _, seq in ipairs(waiting) do
      if budget <= 0 or #self.running >= self.n_slots then break end
      local hits = lookup(self, seq)
      local k = #hits
      local computed = k * self.block_size
      local rest = #seq.tokens - computed
      local n = math.min(rest, budget)
      if n < rest and not self.chunked_prefill and budget < self.budget then break end
      if not self.chunked_prefill then n = rest end
      local in_lru = 0
      for j = 1, k do if self.ref[hits[j]] == 0 then in_lru = in_lru + 1 end end
      local need = math.ceil((computed + n) / self.block_size) - k
      if need > self:available_blocks() - in_lru then break end -- no preemption for newcomers
      -- admit: take the hits, a slot (copying the hits' rows into it when it lacks them), blocks
      for j = 1, k do ref_block(self, hits[j]) end
      local s, m
      if self.paged then -- any free slot: the hits are shared where they are
        s, m = 0, k
        while self.slots[s].seq do s = s + 1 end
      else
        s, m = choose_slot(self, hits)
        truncate(self, s, m)
      end
      if m < k then
        local src
        for slot in pairs(self.homes[hits[k]]) do
          if slot ~= s and (not src or slot < src) then src = slot end
        end
        plan.copies[#plan.copies + 1] = { src = src, dst = s, first_pos = m * self.block_size,
          n_pos = (k - m) * self.block_size }
        local holds = self.slots[s].holds
        for j = m + 1, k do
          holds[j] = hits[j]
          self.homes[hits[j]][s] = true
        end
      end
      self.slots[s].seq = seq
      seq.slot, seq.state = s, "running"
      seq.num_computed, seq.registered = computed, k
      for j = 1, k do seq.block_table[j] = hits[j] end
      grow(self, seq, computed + n)
      if self.prefix_caching and not seq.skip_prefix_cache then
        c.prefix_queries = c.prefix_queries + #seq.tokens
        c.prefix_hits = c.prefix_hits + computed
      end
      self.running[#self.running + 1] = seq
      admitted[seq] = true
      entries[#entries + 1] = {
        seq = seq, slot = s, pos = computed, tokens = slice(seq, computed, n), sample = computed + n == #seq.tokens,
        blocks = self.paged and pool_blocks(seq) or nil,
      }
      budget = budget - n
    end
    if next(admitted) then
      local left = {}
      for _, seq in ipairs(self.waiting) do if not admitted[seq] then left[#left + 1] = seq end end
      self.waiting = left
    end
  end
  plan.num_tokens = self.budget - budget
  c.scheduled_tokens = c.scheduled_tokens + plan.num_tokens
  return plan
end

-- sched:update(plan): the plan ran: each entry's tokens are in its slot's cache (their full
-- blocks registered for prefix caching). Entries of sequences finished since are skipped.
function Scheduler:update(plan)
  for _, e in ipairs(plan.entries) do
    local seq = e.seq
    if seq.state == "running" and seq.slot == e.slot then
      seq.num_computed = e.pos + #e.tokens
      register(self, seq)
    end
  end
end

-- sched:has_work() -> waiting + running sequences
function Scheduler:has_work()
  return #self.waiting + #self.running
end

-- sched:stats() -> counts (a new table)
function Scheduler:stats()
  local c = self.counters
  return {
    waiting = #self.waiting, running = #self.running,
    kv_blocks_used = self.n_used, kv_blocks_free = self.num_blocks - self.n_used,
    kv_blocks_cached = self.n_cached, kv_blocks_total = self.num_blocks,
    prefix_queries = c.prefix_queries, prefix_hits = c.prefix_hits,
    preemptions = c.preemptions, steps = c.steps, scheduled_tokens = c.scheduled_tokens,
  }
end

-- sched:check() -> true | nil, message: the block accounting's invariants (for tests): every
-- block is exactly one of used, cached or free; references equal the block tables' entries;
-- each slot's rows are a run of registered blocks that list the slot as a home.
function Scheduler:check()
  local refs = {}
  for _, list in ipairs { self.running } do
    for _, seq in ipairs(list) do
      for _, b in ipairs(seq.block_table) do refs[b] = (refs[b] or 0) + 1 end
    end
  end
  local n_free, in_free = #self.free, {}
  for _, b in ipairs(self.free) do
    if in_free[b] then return nil, "block " .. b .. " twice in the free stack" end
    in_free[b] = true
  end
  local n_lru, b = 0, self.lru_head
  while b do n_lru = n_lru + 1; b = self.lru_next[b] end
  if n_lru ~= self.n_cached then return nil, string.format("LRU holds %d, counted %d", n_lru, self.n_cached) end
  local used = 0
  for blk = 1, self.num_blocks do
    local r = self.ref[blk]
    if (refs[blk] or 0) ~= r then
      return nil, string.format("block %d: %d references, %d in block tables", blk, r, refs[blk] or 0)
    end
    if r > 0 then used = used + 1 end
    if r > 0 and in_free[blk] then return nil, "block " .. blk .. " used and free" end
  end
  if used ~= self.n_used then return nil, string.format("%d blocks used, counted %d", used, self.n_used) end
  if used + n_lru + n_free ~= self.num_blocks then
    return nil, string.format("%d used + %d cached + %d free ~= %d blocks", used, n_lru, n_free, self.num_blocks)
  end
  for s = 0, self.n_slots - 1 do
    for j, blk in ipairs(self.slots[s].holds) do
      if not (self.homes[blk] and self.homes[blk][s]) then
        return nil, string.format("slot %d holds block %d (index %d) not homed there", s, blk, j)
      end
      if self.bindex[blk] ~= j then return nil, string.format("slot %d: block %d at index %d", s, blk, j) end
    end
  end
  return true
end

-- ----------------------------------------------------------------- changing the policy live
-- sched:use(p) -> policy | nil, message: set_policy that keeps the policy it replaces, so that
-- sched:undo() can restore it (p: "fcfs", "spf", a table with compare, or a FILE.lua). Both take
-- effect at the next schedule(); a REPL on the rank (moonshard.live) calls them between steps.
function Scheduler:use(p)
  local prev = self.policy
  local ok, err = self:set_policy(p)
  if not ok then return nil, err end
  self.policy_undo = self.policy_undo or {}
  self.policy_undo[#self.policy_undo + 1] = prev
  return self.policy
end

-- sched:undo() -> the policy restored | nil, message when no change is left to undo.
function Scheduler:undo()
  local undo = self.policy_undo
  if not undo or #undo == 0 then return nil, "no policy change to undo" end
  self.policy = table.remove(undo)
  return self.policy
end

return M
