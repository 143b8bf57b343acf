-- moonshard.schedule: the micro-batched pipeline schedule (policy) and the stage loop that runs
-- it on each pipeline rank.
--
-- A batch of N sequences is cut into m micro-batches, each a range of KV cache slots. Prefill is
-- GPipe's fill and drain: every stage runs micro-batches 1 .. m of a prompt chunk in order, so
-- stage s starts micro-batch j as soon as stage s - 1 hands it over. Decode goes round-robin over
-- the micro-batches: the last stage samples micro-batch j's next tokens and sends them back to
-- stage 0, which runs j's next step while the other micro-batches are further down the pipe, so
-- with m >= p every stage stays busy. Activations go forward with send/recv on the pipeline
-- communicator; the model itself moves nothing (model.pp_external).
--
--   local schedule = require "moonshard.schedule"
--   local parts = schedule.micro_batches(8, 2)         -- { {slot0 = 0, size = 4}, {slot0 = 4, size = 4} }
--   local plan = schedule.plan { stages = 2, micro_batches = 2, batch = 8, prompt_len = 16,
--                                gen_len = 32, chunk = 256 }   -- the passes every stage runs
--   local tokens = schedule.run(net, { comm = pp_comm, prompts = prompts, gen_len = 32, micro_batches = 2 })
local M = {}

-- ------------------------------------------------------------------------------ policy

-- M.micro_batches(n, m) -> m ranges of slots { slot0, size } covering 0 .. n - 1 (the first n % m
-- one longer) | nil, message
function M.micro_batches(n, m)
  if type(n) ~= "number" or n < 1 or n % 1 ~= 0 then return nil, "the batch size must be a positive integer" end
  if type(m) ~= "number" or m < 1 or m % 1 ~= 0 then return nil, "micro-batches must be a positive integer" end
  if m > n then return nil, string.format("%d micro-batches for %d sequences (at most one micro-batch a sequence)", m, n) end
  local parts, slot = {}, 0
  for j = 1, m do
    local size = math.floor(n / m) + (j <= n % m and 1 or 0)
    parts[j] = { slot0 = slot, size = size }
    slot = slot + size
  end
  return parts
end

-- M.plan(spec) -> the forward passes every stage runs, in order | nil, message
--   spec: stages p, micro_batches m, batch N, prompt_len L, gen_len G (tokens to generate per
--   sequence, >= 1), chunk (most tokens a pass)
-- A pass: { phase = "prefill" | "decode", mb = j, slot0, size, pos0, T, round (decode: 1 ..
--   G - 1), sample = true when its logits give the micro-batch's next tokens, feed = true when
--   those tokens go back to stage 0 (all but the last round's) }.
function M.plan(spec)
  local parts, err = M.micro_batches(spec.batch, spec.micro_batches)
  if not parts then return nil, err end
  local L, G, chunk = spec.prompt_len, spec.gen_len, spec.chunk or spec.prompt_len
  if not (L and L >= 1) then return nil, "the prompt needs a token at least" end
  if not (G and G >= 1) then return nil, "gen_len must be at least 1" end
  local passes = {}
  local done = 0
  while done < L do -- GPipe: fill and drain, chunk by chunk
    local T = math.min(chunk, L - done)
    local final = done + T == L
    for j, part in ipairs(parts) do
      passes[#passes + 1] = { phase = "prefill", mb = j, slot0 = part.slot0, size = part.size, pos0 = done, T = T,
        sample = final, feed = final and G > 1 }
    end
    done = done + T
  end
  for r = 1, G - 1 do -- round-robin decode
    for j, part in ipairs(parts) do
      passes[#passes + 1] = { phase = "decode", mb = j, slot0 = part.slot0, size = part.size, pos0 = L + r - 1, T = 1,
        round = r, sample = true, feed = r < G - 1 }
    end
  end
  return passes
end

-- M.simulate(plan, p, cost?) -> { makespan, busy = {...}, bubble } of the plan on p stages where
-- a pass costs cost(pass) on every stage (default 1), transfers are free and stages start a
-- pass as soon as its input is there (stage 0: the micro-batch's previous tokens).
function M.simulate(plan, p, cost)
  cost = cost or function() return 1 end
  local free = {}
  for s = 1, p do free[s] = 0 end
  local ready = {} -- mb -> time its next tokens reach stage 0
  local busy = {}
  for s = 1, p do busy[s] = 0 end
  for _, pass in ipairs(plan) do
    local t = pass.phase == "decode" and (ready[pass.mb] or 0) or 0
    for s = 1, p do
      local c = cost(pass)
      local start = math.max(t, free[s])
      free[s] = start + c
      busy[s] = busy[s] + c
      t = free[s]
    end
    if pass.sample then ready[pass.mb] = t end
  end
  local makespan = 0
  for s = 1, p do makespan = math.max(makespan, free[s]) end
  local total = 0
  for s = 1, p do total = total + busy[s] end
  return { makespan = makespan, busy = busy, bubble = 1 - total / (p * makespan) }
end

-- M.bound(p, m) -> (p - 1) / (m + p - 1): the bubble of GPipe's fill and drain
function M.bound(p, m) return (p - 1) / (m + p - 1) end

-- ---------------------------------------------------------------------------- stage loop

local tensor = require "moonshard.tensor"
local ops = require "moonshard.ops"
local ffi = require "ffi"

local function check(ok, err)
  if not ok then error(err, 2) end
  return ok
end

-- M.run(net, opts) -> tokens on the last stage ({ [b] = { id, ... } } for b = 1 .. N, gen_len
-- each), true on the others. Every pipeline rank calls it with the same opts but prompts (read
-- on stage 0 only).
--   net: a runner (moonshard.runner) with opts.batch >= N, a pipeline communicator and its
--     stage's layers (net.pp_comm, net.pp_rank, net.pp_size); its KV slots 0 .. N - 1 are used
--     from position 0.
--   opts.prompts: N arrays of prompt token ids, all of one length (stage 0; the others only need
--     opts.prompt_len)
--   opts.gen_len: tokens to generate per sequence; opts.micro_batches: m
--   opts.sample(logits, B, out) -> fills the int32 array out with B next tokens from logits
--     (B, V) on the model's device (default: greedy)
--   opts.lookahead: the last stage posts its receive of the next micro-batch before sending the
--     tokens of the current one (the order rendezvous send/recv needs to stay deadlock-free when
--     stage 0 runs ahead; default: on for NCCL when m >= 2)
--   opts.on_pass(pass): called after each pass (telemetry)
function M.run(net, opts)
  local comm = net.pp_comm
  if not comm then error("schedule.run: the model has no pipeline communicator", 2) end
  local p, s = net.pp_size, net.pp_rank
  if p < 2 then error("schedule.run: a pipeline needs 2 stages at least", 2) end
  local first, last = s == 0, s == p - 1
  local prompts = opts.prompts
  local N = opts.batch or (prompts and #prompts)
  local L = opts.prompt_len or (prompts and prompts[1] and #prompts[1])
  local m, G = opts.micro_batches or 1, opts.gen_len
  if first and not prompts then error("schedule.run: stage 0 needs the prompts", 2) end
  if N > (net.batch or 1) then
    error(string.format("schedule.run: %d sequences for a model of %d KV slots (opts.batch)", N, net.batch or 1), 2)
  end
  local plan = check(M.plan { batch = N, micro_batches = m, prompt_len = L, gen_len = G, chunk = net.chunk })
  local parts = M.micro_batches(N, m)
  local dev = comm:device() -- where the communicator's tensors live
  local lookahead = opts.lookahead
  if lookahead == nil then lookahead = comm:kind() == "nccl" and m >= 2 end
  local sample = opts.sample or function(logits, _, out) ops.argmax(logits, out) end

  -- buffers, made once: token ids going back to stage 0 (per micro-batch), token tables for
  -- forward_batch (stages > 0 pass zeros: only stage 0 embeds)
  local ids_dev, ids_host, ids_ptr, toks = {}, {}, {}, {}
  for j, part in ipairs(parts) do
    ids_host[j] = assert(tensor.new({ part.size }, "i32", "cpu"))
    ids_ptr[j] = ffi.cast("int32_t*", ids_host[j]:data())
    ids_dev[j] = dev == "cpu" and ids_host[j] or assert(tensor.new({ part.size }, "i32", dev))
    toks[j] = {}
    for b = 1, part.size do toks[j][b] = { 0 } end
  end
  local zeros = {} -- [B][T] tables of zeros for stages > 0
  local function dummy(B, T)
    zeros[B] = zeros[B] or {}
    local z = zeros[B][T]
    if not z then
      z = {}
      for b = 1, B do
        z[b] = {}
        for t = 1, T do z[b][t] = 0 end
      end
      zeros[B][T] = z
    end
    return z
  end
  local out = last and {}
  if last then for b = 1, N do out[b] = {} end end
  local sampled = ffi.new("int32_t[?]", math.max(N, 1))
  -- greedy picks on a GPU stay there: the ids go back to stage 0 from the device and every
  -- round's land in hist (rounds x N), read once at the end, so the last stage never waits for
  -- its device between passes
  local hist = last and not opts.sample and dev ~= "cpu" and assert(tensor.new({ G, N }, "i32", dev))

  local function prompt_chunk(pass)
    local z = {}
    for b = 1, pass.size do
      local src, row = prompts[pass.slot0 + b], {}
      for t = 1, pass.T do row[t] = src[pass.pos0 + t] end
      z[b] = row
    end
    return z
  end

  local pending -- last stage: micro-batch whose tokens wait to go back (lookahead)
  local function flush()
    if pending then
      check(comm:send(ids_dev[pending], 0))
      pending = nil
    end
  end

  local prev = net.pp_external
  net.pp_external = true
  local ok, err = pcall(function()
    for _, pass in ipairs(plan) do
      local j, B = pass.mb, pass.size
      local x = net:batch_ctx(B, pass.T, pass.slot0).x
      local tokens
      if first then
        if pass.phase == "prefill" then
          tokens = prompt_chunk(pass)
        else
          check(comm:recv(ids_dev[j], p - 1))
          if ids_dev[j] ~= ids_host[j] then ids_host[j]:copy_from(ids_dev[j]) end
          local ptr, tj = ids_ptr[j], toks[j]
          for b = 1, B do tj[b][1] = ptr[b - 1] end
          tokens = tj
        end
      else
        check(comm:recv(x, s - 1))
        tokens = dummy(B, pass.T)
      end
      if last and lookahead then flush() end -- its receive is done: the previous tokens may go
      net.mb = j
      local logits = check(net:forward_batch(tokens, pass.pos0, pass.slot0))
      if not last then
        check(comm:send(x, s + 1))
      elseif pass.sample and hist then
        ops.argmax_into(ids_dev[j], logits)
        local round = pass.phase == "prefill" and 0 or pass.round
        local row = hist:narrow(1, round, 1)
        local flat = row:reshape { N }
        local dst = flat:narrow(1, pass.slot0, B)
        dst:copy_from(ids_dev[j])
        dst:free(); flat:free(); row:free()
        if pass.feed then
          pending = j
          if not lookahead then flush() end
        end
      elseif pass.sample then
        sample(logits, B, sampled)
        local ptr = ids_ptr[j]
        for b = 1, B do
          ptr[b - 1] = sampled[b - 1]
          local seq = out[pass.slot0 + b]
          seq[#seq + 1] = sampled[b - 1]
        end
        if pass.feed then
          if ids_dev[j] ~= ids_host[j] then ids_dev[j]:copy_from(ids_host[j]) end
          pending = j
          if not lookahead then flush() end
        end
      end
      if opts.on_pass then opts.on_pass(pass) end
    end
    flush()
    if hist then
      local host = hist:to("i32", "cpu")
      local v = host:values()
      host:free()
      for r = 0, G - 1 do
        for b = 1, N do out[b][r + 1] = v[r * N + b] end
      end
    end
  end)
  net.pp_external = prev
  net.mb = nil
  for j in ipairs(parts) do
    if ids_dev[j] ~= ids_host[j] then ids_dev[j]:free() end
    ids_host[j]:free()
  end
  if hist then hist:free() end
  if not ok then error(err, 0) end
  return out or true
end

return M
