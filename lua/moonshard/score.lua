-- moonshard.score: log-probabilities of given tokens, the primitive of evaluation
-- (lm-evaluation-harness's loglikelihood requests) and of perplexity.
--
--   local r = model:score(ids, first)      -- tokens ids[first + 1 ..] (positions first .. #ids - 1)
--   r.logprobs[i], r.greedy[i]             -- log p(token | tokens before it), whether it was the argmax
--   r.sum, r.is_greedy                     -- their sum; whether every one was the argmax
--   local rs = model:score_batch { { ids = a, first = 5 }, { ids = b, first = 9 }, ... }
--
-- The head (final norm, output projection, log-softmax) runs only over the rows asked for, not
-- (tokens x vocab) for the whole sequence. A batch runs its sequences side by side in KV slots
-- (up to the model's opts.batch), shorter ones padded at their end (causal attention: padding
-- after a token changes nothing before it). Requests whose tokens before the last context token
-- are the same (the choices of one multiple-choice question) compute that shared prefix once
-- and copy its KV cache rows to the other slots.
--
-- One arithmetic whatever the cut or batch: the CPU matmul changes method with the number of
-- rows (below 32 rows a register-blocked kernel, from 32 on sgemm; for GGUF block-quantized
-- weights below 64 rows 8-bit activations with integer dots, from 64 on dequantized weights and
-- sgemm). Every pass here therefore runs at least MIN_ROWS = 64 rows: short passes are padded
-- at the end (or, near the end of the context, start earlier and recompute rows already in the
-- cache), and the head runs over blocks of exactly MIN_ROWS rows. A row's scores then do not
-- depend on how its sequence was cut (prefix reused or not) or batched: score_spec checks it to
-- the bit. (Only a sequence shorter than 64 tokens in a context shorter than 64 cannot be padded.)
local ffi = require "ffi"
local ops = require "moonshard.ops"
local tensor = require "moonshard.tensor"
local core = require "moonshard.core"
local C = core.C

local M = {}
M.MIN_ROWS = 64

-- Per-runner buffers of the head: x and h (MIN_ROWS, D), logits and log-softmax (MIN_ROWS, V),
-- a host copy off the CPU, the argmax slots.
local function head_bufs(net)
  local b = net.score_bufs
  if b then return b end
  local n, D, V = M.MIN_ROWS, net.dim, net.vocab_size
  b = {
    x = assert(net.act:tensor({ n, D }, "f32")), h = assert(net.act:tensor({ n, D }, "f32")),
    logits = assert(net.act:tensor({ n, V }, "f32")), lsm = assert(net.act:tensor({ n, V }, "f32")),
    arg = ffi.new("int32_t[?]", n),
  }
  b.rows = {}
  for i = 0, n - 1 do b.rows[i] = net.act:keep(b.x:narrow(1, i, 1)) end
  net.score_bufs = b
  return b
end

local function check_req(r, i, V, max_seq)
  if type(r) ~= "table" or type(r.ids) ~= "table" then
    return nil, string.format("score: request %d has no ids", i)
  end
  local n = #r.ids
  if type(r.first) ~= "number" or r.first < 1 or r.first > n - 1 or r.first % 1 ~= 0 then
    return nil, string.format("score: request %d: first %s outside [1, %d] (the first scored position; "
      .. "position 0 has nothing before it)", i, tostring(r.first), n - 1)
  end
  if n > max_seq then
    return nil, string.format("score: request %d: %d tokens exceed the context of %d", i, n, max_seq)
  end
  for k = 1, n do
    local id = r.ids[k]
    if type(id) ~= "number" or id < 0 or id >= V or id % 1 ~= 0 then
      return nil, string.format("score: request %d: token id %s outside the vocabulary [0, %d)", i, tostring(id), V)
    end
  end
  return true
end

-- Runs the head over the collected rows (a list of { x row tensor, target id, result, index }),
-- MIN_ROWS at a time, and fills each result's logprobs / greedy at its index.
local function run_head(net, bufs, pending)
  local n, V = M.MIN_ROWS, net.vocab_size
  local i = 1
  while i <= #pending do
    local k = math.min(n, #pending - i + 1)
    for j = 0, n - 1 do
      local src = pending[i + math.min(j, k - 1)] -- padding rows repeat the last real one
      bufs.rows[j]:copy_from(src.x)
    end
    net:head_rows(bufs.logits, bufs.x, bufs.h)
    ops.log_softmax(bufs.lsm, bufs.logits)
    local lsm, logits, made = bufs.lsm, bufs.logits, false
    if net.device ~= "cpu" then lsm, logits, made = lsm:to("f32", "cpu"), logits:to("f32", "cpu"), true end
    ops.argmax(logits, bufs.arg)
    local p = ffi.cast("float*", lsm:data())
    for j = 0, k - 1 do
      local e = pending[i + j]
      e.res.logprobs[e.at] = p[j * V + e.target]
      e.res.greedy[e.at] = bufs.arg[j] == e.target
    end
    if made then lsm:free(); logits:free() end
    i = i + k
  end
end

-- A pass of B sequences (tokens[b], equal lengths, from pos[b]) through forward_hidden, keeping
-- rows: want[b] = { [row in the sequence] = entry } (entries get .x, a copy of the row).
local function pass(net, tokens, pos, want, keep)
  local ok, err = net:forward_hidden(tokens, pos, 0, function(x, B, Tc, done)
    if not want then return end
    for b = 1, B do
      local w = want[b]
      for i = 0, Tc - 1 do
        local e = w[done + i]
        if e and not e.x then
          local row = x:narrow(1, (b - 1) * Tc + i, 1)
          e.x = keep(row)
          row:free()
        end
      end
    end
  end)
  if not ok then error(err, 0) end
end

-- Pads (or shifts earlier) B sequences so that the pass has at least MIN_ROWS rows: returns the
-- tokens to run and their first positions. full[b]: every token of sequence b; from[b]: the
-- first position to compute; T: the longest run.
local function layout(net, full, from, T)
  local B = #full
  local need = math.ceil(M.MIN_ROWS / B)
  if T < need then T = need end
  local tokens, pos = {}, {}
  for b = 1, B do
    local p = from[b]
    if p + T > net.max_seq then p = math.max(0, net.max_seq - T) end -- start earlier: recompute cached rows
    local ids, seq = full[b], {}
    for i = 1, T do seq[i] = ids[p + i] or 0 end -- past the end: padding (token 0)
    tokens[b], pos[b] = seq, p
  end
  local Tr = math.min(T, net.max_seq)
  if Tr < T then
    for b = 1, B do
      for i = Tr + 1, T do tokens[b][i] = nil end
    end
  end
  return tokens, pos
end

-- M.score_batch(net, reqs) -> results | nil, message. reqs[i] = { ids = token ids, first =
-- the first scored position (1 .. #ids - 1) }; results[i] = { logprobs, greedy, sum, is_greedy }.
-- At most net.batch requests run side by side; more go in successive passes, in order.
function M.score_batch(net, reqs)
  if type(reqs) ~= "table" then return nil, "score: a list of requests expected" end
  for i, r in ipairs(reqs) do
    local ok, err = check_req(r, i, net.vocab_size, net.max_seq)
    if not ok then return nil, err end
  end
  local results = {}
  local ok, err = pcall(function()
    local i = 1
    while i <= #reqs do
      local j = math.min(#reqs, i + net.batch - 1)
      local group = {}
      for k = i, j do group[#group + 1] = reqs[k] end
      local rs = M.score_group(net, group)
      for k, r in ipairs(rs) do results[i + k - 1] = r end
      i = j + 1
    end
  end)
  if not ok then return nil, tostring(err):gsub("^[^:]*:%d+: ", "") end
  return results
end

-- The results of at most net.batch requests run side by side (M.score_batch's step).
function M.score_group(net, group)
  local B = #group
  local last = net:last_stage()
  local tmp = {} -- row copies, freed at the end
  local function keep(row)
    local t = assert(tensor.new({ 1, net.dim }, "f32", net.device))
    t:copy_from(row)
    tmp[#tmp + 1] = t
    return t
  end
  -- shared prefixes: requests with the same tokens before their last context token
  local prefix_of, prefixes = {}, {}
  for b, r in ipairs(group) do
    local P = r.first - 1
    if P >= 1 then
      local key = table.concat(r.ids, ",", 1, P)
      local pf = prefixes[key]
      if not pf then
        pf = { P = P, ids = r.ids, slots = {} }
        prefixes[key] = pf
        prefixes[#prefixes + 1] = pf
      end
      pf.slots[#pf.slots + 1] = b - 1
      prefix_of[b] = pf
    end
  end
  -- the prefixes that serve more than one request: computed once, in their first slot, then
  -- copied (a prefix of one request is just computed with it)
  local shared = {}
  for _, pf in ipairs(prefixes) do
    if #pf.slots > 1 then shared[#shared + 1] = pf end
  end
  if #shared > 0 then
    -- one pass over the first slots 0 .. B - 1 (slots without a shared prefix get padding: their
    -- real pass below overwrites it)
    local full, from, T = {}, {}, 0
    for b = 1, B do
      local pf = prefix_of[b]
      if pf and #pf.slots > 1 and pf.slots[1] == b - 1 then
        full[b], from[b] = pf.ids, 0
        if pf.P > T then T = pf.P end
      else
        full[b], from[b] = {}, 0
      end
    end
    -- tokens past the prefix are not the prefix's: cut them to padding
    local cut = {}
    for b = 1, B do
      local pf = prefix_of[b]
      if pf and #pf.slots > 1 and pf.slots[1] == b - 1 then
        local s = {}
        for k = 1, pf.P do s[k] = pf.ids[k] end
        cut[b] = s
      else
        cut[b] = {}
      end
    end
    local tokens, pos = layout(net, cut, from, T)
    pass(net, tokens, pos, nil, keep)
    for _, pf in ipairs(shared) do
      for k = 2, #pf.slots do
        local cok, cerr = net:copy_kv(pf.slots[1], pf.slots[k], 0, pf.P)
        if not cok then error(cerr, 0) end
      end
    end
  end
  -- the scored pass: each request from the end of its shared prefix (or from 0)
  local full, from, want, T = {}, {}, {}, 0
  local pending, results = {}, {}
  for b, r in ipairs(group) do
    local pf = prefix_of[b]
    local start = (pf and #pf.slots > 1) and pf.P or 0
    full[b], from[b] = r.ids, start
    local len = #r.ids - 1 - start -- the last token is scored, never fed
    if len > T then T = len end
    local res = { logprobs = {}, greedy = {} }
    results[b] = res
    local w = {}
    for p = r.first - 1, #r.ids - 2 do -- the row at position p predicts token p + 1
      local e = { target = r.ids[p + 2], res = res, at = p - r.first + 2 }
      pending[#pending + 1] = e
      w[p] = e
    end
    want[b] = w
  end
  local tokens, pos = layout(net, full, from, T)
  -- want[] is keyed by position; forward_hidden reports rows from each sequence's pos[b]
  local byrow = {}
  for b = 1, B do
    local w, p0 = {}, pos[b]
    for p, e in pairs(want[b]) do w[p - p0] = e end
    byrow[b] = w
  end
  pass(net, tokens, pos, last and byrow or nil, keep)
  -- the head, on the last stage; the results travel to the other stages
  local n = #pending
  local host = assert(tensor.new({ math.max(n, 1), 2 }, "f32", "cpu"))
  local hp = ffi.cast("float*", host:data())
  if last then
    run_head(net, head_bufs(net), pending)
    for k, e in ipairs(pending) do
      hp[(k - 1) * 2] = e.res.logprobs[e.at]
      hp[(k - 1) * 2 + 1] = e.res.greedy[e.at] and 1 or 0
    end
  end
  if net.pp_comm then
    local dev = net.device
    local t = dev ~= "cpu" and host:to("f32", dev) or host
    local s = C.msh_comm_broadcast(net.pp_comm, t, net.pp_size - 1)
    if s ~= 0 then error((core.errmsg(s)), 0) end
    if t ~= host then host:copy_from(t); t:free() end
    for k, e in ipairs(pending) do
      e.res.logprobs[e.at] = hp[(k - 1) * 2]
      e.res.greedy[e.at] = hp[(k - 1) * 2 + 1] == 1
    end
  end
  host:free()
  for _, t in ipairs(tmp) do t:free() end
  for _, res in ipairs(results) do
    local s, g = 0, true
    for k = 1, #res.logprobs do
      s = s + res.logprobs[k]
      g = g and res.greedy[k]
    end
    res.sum, res.is_greedy = s, g
  end
  return results
end

-- M.score(net, ids, first) -> { logprobs, greedy, sum, is_greedy } | nil, message
function M.score(net, ids, first)
  local rs, err = M.score_batch(net, { { ids = ids, first = first } })
  if not rs then return nil, err end
  return rs[1]
end

return M
