-- moonshard.engine: the serving loop over a loaded model. Requests join and leave at every
-- step; each step is vLLM v1's schedule() -> execute() -> update():
--   schedule  moonshard.scheduler picks the step's tokens (running decodes, prompt chunks) under
--             a token budget, assigns KV slots and blocks, plans prefix-cache copies
--   execute   the runner computes them in one runner:step (sequences of their own lengths and
--             positions; echo requests' prompts through runner:forward_slot for every
--             position's logits), after copying cached K/V rows (runner:copy_kv)
--   update    each request whose chunk reached its last token samples its next one (its own
--             temperature, top-k, top-p and seed; greedy at temperature 0), checks stop ids, stop
--             strings, max_tokens and the context, and streams the token to its callback
--
--   local engine = require("moonshard.engine").new(model, { max_batch = 4 })
--   local req = engine:submit { prompt_ids = ids, max_tokens = 16, temperature = 0,
--     on_token = function(req, id, text, logprob) io.write(text) end }
--   engine:run()                       -- or engine:attach(uv) to step on the libuv loop
--
-- The KV cache is the runner's: one row of max_seq positions per slot (model loaded with
-- { batch = N }: N slots). The scheduler's blocks are an accounting of those rows (see
-- moonshard.scheduler): a finished sequence's slot keeps its full blocks cached until they are
-- evicted (LRU) or the slot is reused, and a prefix hit in another slot copies the rows. A model
-- an engine drives must not run other passes meanwhile (model:forward and generate use slot 0).
-- A model loaded with { batch = N, kv_blocks = NB, block_size = BS } has a paged cache: the
-- scheduler's blocks are the pool's (prefix hits share them, nothing is copied) and every step
-- of any mix of prompt chunks and decodes is one runner pass.
local scheduler = require "moonshard.scheduler"
local sampler_mod = require "moonshard.sampler"
local tensor = require "moonshard.tensor"
local ffi = require "ffi"
local ops = require "moonshard.ops"
local uv = require "luv"

local M = {}
local Engine = {}
Engine.__index = Engine

local function is_int(x) return type(x) == "number" and x == x and x % 1 == 0 end

-- M.new(model, opts) -> engine | nil, message
--   model: from moonshard.load(path, { batch = N, ... }) (N KV slots)
--   opts.max_batch            sequences running at once (default and at most the model's slots)
--   opts.max_tokens_per_step  the token budget of a step (default 512)
--   opts.block_size           tokens per KV block (default 16)
--   opts.num_blocks           KV blocks (default: all the slots' rows; fewer preempts sooner)
--   opts.prefix_caching       reuse cached full blocks of earlier prompts (default true)
--   opts.chunked_prefill      split long prompts across steps (default true)
--   opts.policy               "fcfs" (default), "spf", a table with compare(a, b), or a FILE.lua
--   opts.seed                 the seed of requests that give none is this plus the request id
--                             (default: the time)
function M.new(model, opts)
  opts = opts or {}
  local net = model and model.net
  if not net or not net.step then error("engine.new: a model from moonshard.load expected", 2) end
  local max_batch = opts.max_batch or net.batch
  if not is_int(max_batch) or max_batch < 1 then
    return nil, string.format("max_batch must be a positive integer (got %s)", tostring(max_batch))
  end
  if max_batch > net.batch then
    return nil, string.format("max_batch %d exceeds the model's %d KV slots (load it with { batch = %d })",
      max_batch, net.batch, max_batch)
  end
  local policy, perr = scheduler.policy(opts.policy)
  if not policy then return nil, perr end
  local paged, block_size, num_blocks, budget = net.paged, opts.block_size, opts.num_blocks, opts.max_tokens_per_step
  if paged then -- the blocks are the runner's pool
    if block_size and block_size ~= paged.block_size then
      return nil, string.format("block_size %s differs from the model's KV blocks of %d positions",
        tostring(block_size), paged.block_size)
    end
    if num_blocks and (not is_int(num_blocks) or num_blocks > paged.num_blocks) then
      return nil, string.format("num_blocks %s exceeds the model's pool of %d KV blocks", tostring(num_blocks),
        paged.num_blocks)
    end
    block_size, num_blocks = paged.block_size, num_blocks or paged.num_blocks
  end
  -- a step's rows fit the runner's buffers (batch x chunk)
  budget = math.min(budget or 512, net.batch * net.chunk)
  local ok, sched = pcall(scheduler.new, {
    slots = max_batch, max_seq = net.max_seq, max_tokens_per_step = budget,
    block_size = block_size, num_blocks = num_blocks, prefix_caching = opts.prefix_caching,
    chunked_prefill = opts.chunked_prefill, policy = policy, paged = paged and true or nil,
  })
  if not ok then return nil, (tostring(sched):gsub("^[^:]*:%d+: ", "")) end
  local V = net.vocab_size
  local self = setmetatable({
    model = model, net = net, tok = model.tokenizer, sched = sched, max_batch = max_batch, V = V,
    -- a sequence ends at the context or when the whole block pool could not hold it
    max_len = math.min(net.max_seq, sched.num_blocks * sched.block_size),
    next_id = 0, seed = opts.seed or os.time(),
    default_stop = {}, counts = { prompt_tokens = 0, generated_tokens = 0, kv_copies = 0, kv_copied_positions = 0,
      finished = {} },
  }, Engine)
  local stop = model.desc and model.desc.stop or (self.tok and { self.tok.eos }) or {}
  for _, id in ipairs(stop) do self.default_stop[id] = true end
  -- the sampler reads host memory: each step's logits come into one host buffer, read by rows
  self.host = assert(tensor.new({ max_batch, V }, "f32", "cpu"))
  self.host_views, self.rows = {}, {}
  for i = 1, max_batch do self.rows[i] = self.host:narrow(1, i - 1, 1) end
  self.ids = ffi.new("int32_t[?]", max_batch) -- greedy ids picked where the logits are
  return self
end

-- ------------------------------------------------------------------------------ requests

local function check_ids(ids, V, what)
  if type(ids) ~= "table" then return nil, what .. " must be a list of token ids" end
  for i = 1, #ids do
    local id = ids[i]
    if not is_int(id) or id < 0 or id >= V then
      return nil, string.format("%s: token id %s at index %d outside the vocabulary [0, %d)", what, tostring(id), i, V)
    end
  end
  return true
end

-- engine:submit(r) -> request | nil, message
--   r.prompt_ids   token ids (or r.prompt, a string the model's tokenizer encodes)
--   r.max_tokens   tokens to generate at most (default 16; 0 with echo: score the prompt only)
--   r.temperature (1), r.top_p (1), r.top_k (0), r.seed (engine seed + id): sampling; greedy at 0
--   r.stop_ids     token ids that end the answer (besides the model's end tokens, unless
--                  r.ignore_eos); the stop token is not part of the output
--   r.stop         strings that end the answer (a string or a list); the text stops before it
--   r.logprobs     nil, or k >= 0: the chosen token's log-probability and the k most likely
--                  tokens' at each step (req.token_logprobs[i], req.top_logprobs[i])
--   r.echo         score the prompt: req.prompt_logprobs[i] is prompt token i's log-probability
--                  given the tokens before it (entry 1 is false: nothing before it), with
--                  req.prompt_top_logprobs[i] when r.logprobs > 0; such a prompt is computed
--                  whole (no prefix cache)
--   r.on_token(req, id, text, logprob)  each generated token: its id, the text it completes
--                  ("" while a UTF-8 character or a possible stop string is incomplete), its
--                  log-probability when r.logprobs is set; at the end, text held back comes
--                  with id nil
--   r.on_finish(req, reason)  once: "stop", "length", "cancelled" or "error" (req.error)
--   Callbacks run inside engine:step; they may submit and cancel (any request) but not step. An
--   error raised in on_token ends that request with "error" (req.error says why).
-- The request table: .id, .state ("waiting", "running", "finished"), .prompt_ids, .output_ids,
-- .text (the generated text so far), .prompt_logprobs, .token_logprobs, .top_logprobs,
-- .finish_reason, .error, .preemptions, and any field of r.
function Engine:submit(r)
  if type(r) ~= "table" then return nil, "a request is a table" end
  local V, tok = self.V, self.tok
  local ids = r.prompt_ids
  if ids == nil and type(r.prompt) == "string" then
    if not tok then return nil, "prompt: the model has no tokenizer (give prompt_ids)" end
    ids = tok:encode(r.prompt, tok.add_bos ~= false)
    if #ids == 0 then ids = { tok.bos or tok.eos } end
  end
  if ids == nil then return nil, "prompt_ids: missing" end
  local ok, err = check_ids(ids, V, "prompt_ids")
  if not ok then return nil, err end
  if #ids == 0 then return nil, "prompt_ids: empty" end
  local max_tokens = r.max_tokens == nil and 16 or r.max_tokens
  if not is_int(max_tokens) or max_tokens < 0 then
    return nil, string.format("max_tokens must be an integer >= 0 (got %s)", tostring(max_tokens))
  end
  local room = self.max_len - (max_tokens > 0 and 1 or 0)
  if #ids > room then
    return nil, string.format("the prompt is %d tokens long, more than the context of %d tokens leaves room for%s",
      #ids, self.max_len, max_tokens > 0 and " (with one generated token)" or "")
  end
  if r.logprobs ~= nil and (not is_int(r.logprobs) or r.logprobs < 0 or r.logprobs > V) then
    return nil, string.format("logprobs must be an integer in 0..%d (got %s)", V, tostring(r.logprobs))
  end
  local stop_ids = {}
  if not r.ignore_eos then for id in pairs(self.default_stop) do stop_ids[id] = true end end
  if r.stop_ids ~= nil then
    ok, err = check_ids(r.stop_ids, V, "stop_ids")
    if not ok then return nil, err end
    for _, id in ipairs(r.stop_ids) do stop_ids[id] = true end
  end
  local stop = r.stop
  if type(stop) == "string" then stop = { stop } end
  if stop ~= nil then
    if type(stop) ~= "table" then return nil, "stop must be a string or a list of strings" end
    for i, s in ipairs(stop) do
      if type(s) ~= "string" or s == "" then return nil, string.format("stop[%d] must be a non-empty string", i) end
    end
    if #stop > 0 and not tok then return nil, "stop: the model has no tokenizer to decode text with" end
    if #stop == 0 then stop = nil end
  end
  for _, k in ipairs { "on_token", "on_finish" } do
    if r[k] ~= nil and type(r[k]) ~= "function" then return nil, k .. " must be a function" end
  end
  self.next_id = self.next_id + 1
  local id = self.next_id
  local sok, sampler = pcall(sampler_mod.new, {
    temperature = r.temperature == nil and 1 or r.temperature, top_p = r.top_p, top_k = r.top_k,
    seed = r.seed == nil and ((self.seed + id) % 2 ^ 53) or r.seed,
  })
  if not sok then return nil, (tostring(sampler):gsub("^[^:]*:%d+: ", ""):gsub("^sampler: ", "")) end

  local req = {}
  for k, v in pairs(r) do req[k] = v end
  local tokens = {}
  for i = 1, #ids do tokens[i] = ids[i] end
  req.id, req.prompt_ids, req.tokens, req.output_ids = id, ids, tokens, {}
  req.max_tokens, req.stop, req.stop_set, req.sampler = max_tokens, stop, stop_ids, sampler
  req.text, req.pending = "", ""
  req.decoder = tok and tok:decoder(ids[#ids])
  req.skip_prefix_cache = r.echo and true or nil
  if r.echo then
    req.prompt_logprobs = { false }
    if r.logprobs and r.logprobs > 0 then req.prompt_top_logprobs = { false } end
  end
  if r.logprobs then req.token_logprobs, req.top_logprobs = {}, {} end
  self.sched:add(req)
  self.counts.prompt_tokens = self.counts.prompt_tokens + #ids
  self:wake()
  return req
end

-- Calls a request's callback; an error in it is returned, not raised (the engine goes on).
local function call(req, f, ...)
  if not f then return true end
  local ok, err = pcall(f, req, ...)
  return ok, err
end

-- Ends a request (once): its slot and blocks are freed, text held back is delivered, then
-- on_finish.
function Engine:finish(req, reason, err)
  if req.finish_reason then return end
  self.sched:finish(req)
  req.finish_reason, req.error = reason, err
  if reason ~= "cancelled" and not req.stopped_by_string then
    local rest = req.pending .. (req.decoder and req.decoder:flush() or "")
    req.pending = ""
    if rest ~= "" then
      req.text = req.text .. rest
      call(req, req.on_token, nil, rest, nil)
    end
  end
  local f = self.counts.finished
  f[reason] = (f[reason] or 0) + 1
  local ok, cerr = call(req, req.on_finish, reason)
  if not ok then
    io.stderr:write(string.format("engine: request %d: on_finish failed: %s\n", req.id, tostring(cerr)))
  end
end

-- engine:cancel(req): ends a waiting or running request now (a client that went away): its
-- slot and blocks are free when this returns; on_finish gets "cancelled".
function Engine:cancel(req)
  if type(req) ~= "table" or not req.id then error("engine:cancel: a request from submit expected", 2) end
  self:finish(req, "cancelled")
end

-- ------------------------------------------------------------------------- log-probabilities

-- log(sum(exp(row))) of V floats
local function logsumexp(p, V)
  local mx = -math.huge
  for i = 0, V - 1 do
    local x = p[i]
    if x > mx then mx = x end
  end
  local s = 0
  for i = 0, V - 1 do s = s + math.exp(p[i] - mx) end
  return mx + math.log(s)
end

-- the k largest of V floats as { { id, logprob } ... }, most likely first (lowest id on ties)
local function top_k(p, V, k, lse)
  local ids, vals, n = {}, {}, 0
  if k <= 0 then return {} end
  for i = 0, V - 1 do
    local x = p[i]
    if n < k or x > vals[n] then
      local j
      if n < k then n = n + 1; j = n else j = k end
      while j > 1 and vals[j - 1] < x do
        ids[j], vals[j] = ids[j - 1], vals[j - 1]
        j = j - 1
      end
      ids[j], vals[j] = i, x
    end
  end
  local out = {}
  for j = 1, n do out[j] = { id = ids[j], logprob = vals[j] - lse } end
  return out
end
M.logsumexp, M.top_k = logsumexp, top_k

-- Prompt scores of an echo request from the logits (T, V) (host) of prompt positions pos ..
-- pos + T - 1: row t predicts the token at pos + t + 1 (0-based).
local function score_prompt(req, all, pos, T, V)
  local p = ffi.cast("const float*", all:data())
  local k = req.logprobs or 0
  local n = #req.prompt_ids
  for t = 0, T - 1 do
    local i = pos + t + 2 -- the 1-based index of the predicted prompt token
    if i > n then break end
    local row = p + t * V
    local lse = logsumexp(row, V)
    req.prompt_logprobs[i] = row[req.prompt_ids[i]] - lse
    if k > 0 then req.prompt_top_logprobs[i] = top_k(row, V, k, lse) end
  end
end

-- ------------------------------------------------------------------------------ the step

-- Stop strings: the text of a new token, held back while it may begin a stop string; true when
-- a stop string appeared (the text ends before it).
local function stop_text(req, piece)
  local buf = req.pending .. piece
  local stop = req.stop
  if not stop then
    req.pending = ""
    return buf, false
  end
  local at
  for _, s in ipairs(stop) do
    local i = buf:find(s, 1, true)
    if i and (not at or i < at) then at = i end
  end
  if at then
    req.pending = ""
    return buf:sub(1, at - 1), true
  end
  local hold = 0
  for _, s in ipairs(stop) do
    for L = math.min(#s - 1, #buf), hold + 1, -1 do
      if buf:sub(-L) == s:sub(1, L) then hold = L break end
    end
  end
  req.pending = buf:sub(#buf - hold + 1)
  return buf:sub(1, #buf - hold), false
end

-- Whether a step's rows can be picked where the logits are: every entry that samples is greedy
-- (temperature 0) and wants no log-probabilities ($MOONSHARD_HOST_SAMPLING=1 keeps the sampler's
-- path over host rows).
local host_sampling = os.getenv("MOONSHARD_HOST_SAMPLING") == "1"
local function greedy_only(batch)
  if host_sampling then return false end
  for _, e in ipairs(batch) do
    local req = e.seq
    if e.sample and (req.sampler.temperature > 0 or req.logprobs) then return false end
  end
  return true
end

-- Whether the first logit of row r of logits (on any device) is finite.
local function finite_first(logits, r)
  local one = logits:narrow(1, r, 1):narrow(2, 0, 1)
  local v = one:to("f32", "cpu")
  one:free()
  local x = ffi.cast("const float*", v:data())[0]
  v:free()
  return x == x and x ~= math.huge and x ~= -math.huge
end

-- A token sampled for req: output, stream, end conditions.
function Engine:accept(req, id, row)
  local lp
  if req.logprobs then
    local p = ffi.cast("const float*", row:data())
    local lse = logsumexp(p, self.V)
    lp = p[id] - lse
    local i = #req.output_ids + 1
    req.token_logprobs[i], req.top_logprobs[i] = lp, top_k(p, self.V, req.logprobs, lse)
  end
  self.counts.generated_tokens = self.counts.generated_tokens + 1
  if req.stop_set[id] then
    if req.logprobs then -- the stop token is not part of the output
      local i = #req.output_ids + 1
      req.token_logprobs[i], req.top_logprobs[i] = nil, nil
    end
    return self:finish(req, "stop")
  end
  req.output_ids[#req.output_ids + 1] = id
  local text, stopped = "", false
  if req.decoder then text, stopped = stop_text(req, req.decoder:push(id)) end
  req.text = req.text .. text
  local ok, cerr = call(req, req.on_token, id, text, lp)
  if not ok then return self:finish(req, "error", "on_token: " .. tostring(cerr)) end
  if req.finish_reason then return end -- cancelled from its callback
  if stopped then
    req.stopped_by_string = true
    return self:finish(req, "stop")
  end
  if #req.output_ids >= req.max_tokens or #req.tokens + 1 > self.max_len then
    return self:finish(req, "length")
  end
  self.sched:append(req, id)
end

local function fail_all(self, entries, err)
  for _, e in ipairs(entries) do
    if e.seq.state ~= "finished" then self:finish(e.seq, "error", err) end
  end
end

-- engine:step() -> n: one schedule / execute / update; n = requests still waiting or running.
function Engine:step()
  if self.stepping then error("engine:step called from inside a step (a request's callback)", 2) end
  self.stepping = true
  local ok, n = pcall(self.step_once, self)
  self.stepping = false
  if not ok then error(n, 0) end
  return n
end

function Engine:step_once()
  local sched, net, V = self.sched, self.net, self.V
  if sched:has_work() == 0 then return 0 end
  local t0 = uv.hrtime()
  local plan = sched:schedule()
  local entries = plan.entries
  if #entries == 0 then
    -- nothing running and the first waiting request cannot be admitted: it never will be
    -- (submit refuses what the pool cannot hold, so this is a guard, not a path)
    if #sched.running == 0 and #sched.waiting > 0 then
      self:finish(sched.waiting[1], "error", "the request cannot be scheduled: the KV blocks cannot hold it")
    end
    return sched:has_work()
  end

  for _, c in ipairs(plan.copies) do
    local ok, err = net:copy_kv(c.src, c.dst, c.first_pos, c.n_pos)
    if not ok then fail_all(self, entries, err) return sched:has_work() end
    self.counts.kv_copies = self.counts.kv_copies + 1
    self.counts.kv_copied_positions = self.counts.kv_copied_positions + c.n_pos
  end
  -- echo prompts whose logprobs are still wanted run alone with every position's logits; the
  -- rest in one step
  local batch, where, scored = {}, {}, nil
  for i, e in ipairs(entries) do
    local req = e.seq
    if req.echo and not req.prompt_scored and e.pos < req.prompt_len then
      scored = scored or {}
      scored[#scored + 1] = i
    else
      batch[#batch + 1] = e
      where[i] = #batch
    end
  end
  local rows = self.rows
  local sample_row = {} -- entry index -> host row to sample from
  local picked -- the rows' greedy ids were picked where the logits are (self.ids; -1: not finite)
  if #batch > 0 then
    local logits, err = net:step(batch)
    if not logits then fail_all(self, entries, err) return sched:has_work() end
    local n = #batch
    if greedy_only(batch) then
      -- every row sampled greedily, no log-probabilities asked: the argmax where the logits are
      -- (on a GPU only the ids cross the link; a (batch, vocab) f32 copy and a scan otherwise)
      ops.argmax(logits, self.ids)
      -- NaN never wins the device's argmax, so a row of NaN logits (NaN weights) answers 0; its
      -- first logit tells (the host path checks every logit of a row)
      for r = 0, n - 1 do
        if self.ids[r] == 0 and not finite_first(logits, r) then self.ids[r] = -1 end
      end
      picked = true
    else
      local hv = self.host_views[n]
      if not hv then
        hv = self.host:narrow(1, 0, n)
        self.host_views[n] = hv
      end
      hv:copy_from(logits)
      for i in pairs(where) do sample_row[i] = rows[where[i]] end
    end
  end
  local extra -- host tensors of echo rows to free after sampling
  if scored then
    for _, i in ipairs(scored) do
      local e, req = entries[i], entries[i].seq
      local all, err
      if e.blocks then
        all, err = net:forward_blocks(e.blocks, e.tokens, e.pos, { all_logits = true })
      else
        all, err = net:forward_slot(e.slot, e.tokens, e.pos, { all_logits = true })
      end
      if not all then
        for j = #(extra or {}), 1, -1 do extra[j]:free() end -- the rows scored before this one
        fail_all(self, entries, err)
        return sched:has_work()
      end
      local host = all
      if all:device() ~= "cpu" then host = all:to("f32", "cpu"); all:free() end
      local T = #e.tokens
      score_prompt(req, host, e.pos, T, V)
      if e.pos + T >= req.prompt_len then
        req.prompt_scored = true
        req.skip_prefix_cache = nil -- recomputed after a preemption, it may reuse cached blocks
      end
      extra = extra or {}
      extra[#extra + 1] = host
      if e.sample then
        local last = host:narrow(1, T - 1, 1)
        extra[#extra + 1] = last
        sample_row[i] = last
      end
    end
  end

  sched:update(plan)
  local decode_tokens, context = 0, 0
  for i, e in ipairs(entries) do
    local req = e.seq
    if #e.tokens == 1 then decode_tokens = decode_tokens + 1 end
    context = context + e.pos + #e.tokens
    if e.sample and req.state == "running" then
      if req.max_tokens == 0 then
        self:finish(req, "length")
      else
        local row = sample_row[i]
        if picked and where[i] then
          local id = self.ids[where[i] - 1]
          if id < 0 then
            self:finish(req, "error", string.format("the logits at position %d are not finite: the weights or the "
              .. "computation produced NaN or infinity, so no token can be sampled", e.pos + #e.tokens - 1))
          else
            self:accept(req, id)
          end
        else
          local ok, err = sampler_mod.check_logits(row, e.pos + #e.tokens - 1)
          if not ok then
            self:finish(req, "error", err)
          else
            self:accept(req, req.sampler:sample(row), row)
          end
        end
      end
    end
  end
  if extra then
    for j = #extra, 1, -1 do extra[j]:free() end
  end
  if self.on_step then
    local seconds = (uv.hrtime() - t0) / 1e9
    local ok, err = pcall(self.on_step, { batch = #entries, tokens = plan.num_tokens, seconds = seconds,
      decode_tokens = decode_tokens, prefill_tokens = plan.num_tokens - decode_tokens, context = context,
      preempted = #plan.preempted, running = #sched.running, waiting = #sched.waiting })
    if not ok then io.stderr:write("engine: on_step failed: " .. tostring(err) .. "\n") end
  end
  return sched:has_work()
end

-- engine:run(): steps until no request waits or runs.
function Engine:run()
  while self:step() > 0 do end
end

-- ------------------------------------------------------------------------- the libuv loop

-- engine:attach(uv?): steps on the luv loop (an idle handle, so I/O is still polled between
-- steps) while requests wait or run; the handle stops when the engine is idle and starts again
-- at the next submit. The handle keeps the loop alive only while it runs.
function Engine:attach(loop)
  loop = loop or uv
  if self.idle then return end
  self.idle = loop.new_idle()
  self.idle_on = false
  self:wake()
end

function Engine:wake()
  local idle = self.idle
  if not idle or self.idle_on or self.sched:has_work() == 0 then return end
  self.idle_on = true
  idle:start(function()
    local ok, n = pcall(self.step, self)
    if not ok then
      io.stderr:write("engine: step failed: " .. tostring(n) .. "\n")
      for _, list in ipairs { self.sched.running, self.sched.waiting } do
        for j = #list, 1, -1 do self:finish(list[j], "error", tostring(n)) end
      end
      n = 0
    end
    if n == 0 and self.idle_on then
      self.idle_on = false
      idle:stop()
    end
  end)
end

-- engine:detach(): stops stepping on the loop and closes the handle (requests stay queued).
function Engine:detach()
  local idle = self.idle
  if not idle then return end
  self.idle, self.idle_on = nil, false
  idle:stop()
  if not idle:is_closing() then idle:close() end
end

-- engine:stats() -> { waiting, running, kv_blocks_used, kv_blocks_free, kv_blocks_cached (free
-- but still holding a cached prefix), kv_blocks_total, prefix_queries, prefix_hits (prompt
-- tokens looked up / found cached), prompt_tokens (submitted), generated_tokens (sampled, stop
-- tokens included), steps, preemptions, kv_copies, kv_copied_positions (prefix hits copied
-- between slots), finished = { [reason] = n }, max_batch, block_size }
function Engine:stats()
  local s = self.sched:stats()
  local c = self.counts
  s.prompt_tokens, s.generated_tokens = c.prompt_tokens, c.generated_tokens
  s.kv_copies, s.kv_copied_positions = c.kv_copies, c.kv_copied_positions
  local f = {}
  for k, v in pairs(self.counts.finished) do f[k] = v end
  s.finished = f
  s.max_batch, s.block_size = self.max_batch, self.sched.block_size
  return s
end

-- engine:close(): cancels every request, detaches from the loop and frees the host buffers (the
-- model stays the caller's).
function Engine:close()
  self:detach()
  for _, list in ipairs { self.sched.running, self.sched.waiting } do
    for j = #list, 1, -1 do self:finish(list[j], "cancelled") end
  end
  for _, v in pairs(self.host_views) do v:free() end
  for _, r in ipairs(self.rows) do r:free() end
  self.host_views, self.rows = {}, {}
  if self.host then self.host:free(); self.host = nil end
end

return M
