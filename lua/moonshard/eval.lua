-- moonshard.eval: lm-evaluation-harness-compatible evaluation over the scoring API.
--
-- A task is a Lua file returning a table (lua/moonshard/tasks/<name>.lua, or any folder given
-- as opts.tasks_dir / --tasks-dir; adding a task is adding a file):
--   name, version, harness = "the lm-eval task it mirrors"
--   data = "arc_easy.jsonl" (beside the other eval data, ../shared/data/eval by default) and
--   format = "jsonl" (one JSON record a line) or "text" (docs = function(text) -> list of docs)
--   output_type = "multiple_choice" | "loglikelihood" | "loglikelihood_rolling" | "generate_until"
--   doc_to_text(doc) -> string, doc_to_target(doc) -> index (multiple choice) or string,
--   doc_to_choice(doc) -> strings; multiple_input = true: the choices are contexts and the
--   target is the one continuation scored after each (winogrande's partial scoring)
--   target_delimiter (" "), fewshot_delimiter ("\n\n"), num_fewshot (default 0), fewshot_split
--   (a data file; default: the evaluated file without the doc itself)
--   metrics = { "acc", "acc_norm", ... }, generation = { until = {...}, max_gen_toks = 256 },
--   filters = { name = function(text) -> answer } (generate_until), process(doc, text) ...
--
-- Requests are the harness's: loglikelihood (context, continuation) tokenized as it does (the
-- context's trailing whitespace moves to the continuation; the continuation's tokens are those
-- of encode(context .. continuation) after the first #encode(context)), an empty context
-- replaced by the prefix token (BOS, else EOS), contexts truncated on the left to the model's
-- length; loglikelihood_rolling in disjoint windows of max_length tokens; generate_until greedy
-- up to a stop string. Multiple-choice requests of one document run side by side so that their
-- context is computed once (moonshard.score); documents go longest first.
local cjson = require "cjson"

local M = {}

local host_root = function()
  local ok, h = pcall(require, "moonshard.host")
  return ok and h.root or "."
end

M.TASKS_DIR = host_root() .. "/lua/moonshard/tasks"
M.DATA_DIR = host_root() .. "/../shared/data/eval"

-- ---------------------------------------------------------------------------------- tasks

local function exists(path)
  local f = io.open(path, "rb")
  if f then f:close() return true end
  return false
end

-- M.list_tasks(dirs) -> sorted names of the task files in the folders
function M.list_tasks(dirs)
  local names, seen = {}, {}
  local uv = require "luv"
  for _, d in ipairs(dirs) do
    local h = uv.fs_scandir(d)
    while h do
      local n = uv.fs_scandir_next(h)
      if not n then break end
      local name = n:match("^([%w_%-]+)%.lua$")
      if name and not seen[name] then seen[name] = true; names[#names + 1] = name end
    end
  end
  table.sort(names)
  return names
end

-- M.load_task(name, opts) -> task | nil, message (opts.tasks_dir: a folder searched first)
function M.load_task(name, opts)
  opts = opts or {}
  local dirs = {}
  if opts.tasks_dir then dirs[#dirs + 1] = opts.tasks_dir end
  dirs[#dirs + 1] = M.TASKS_DIR
  if type(name) ~= "string" or not name:match("^[%w_%-]+$") then
    return nil, string.format("unknown task '%s'", tostring(name))
  end
  for _, d in ipairs(dirs) do
    local path = d .. "/" .. name .. ".lua"
    if exists(path) then
      local chunk, err = loadfile(path)
      if not chunk then return nil, string.format("task '%s': %s", name, err) end
      local ok, t = pcall(chunk)
      if not ok then return nil, string.format("task '%s' (%s): %s", name, path, tostring(t)) end
      if type(t) ~= "table" then return nil, string.format("task '%s' (%s) returns no table", name, path) end
      t.name = t.name or name
      t.path = path
      t.target_delimiter = t.target_delimiter or " "
      t.fewshot_delimiter = t.fewshot_delimiter or "\n\n"
      return t
    end
  end
  return nil, string.format("unknown task '%s' (known: %s)", name, table.concat(M.list_tasks(dirs), ", "))
end

-- M.read_jsonl(path) -> records | nil, message ("file:line: ..." for a malformed line)
function M.read_jsonl(path)
  local f, err = io.open(path, "rb")
  if not f then return nil, string.format("cannot read the data file %s: %s", path, tostring(err)) end
  local docs, n = {}, 0
  for line in f:lines() do
    n = n + 1
    if line:match("%S") then
      local ok, rec = pcall(cjson.decode, line)
      if not ok or type(rec) ~= "table" then
        f:close()
        return nil, string.format("%s:%d: not a JSON object (%s)", path, n,
          ok and "a " .. type(rec) or tostring(rec):gsub("^.-: ", ""))
      end
      rec._line = n
      docs[#docs + 1] = rec
    end
  end
  f:close()
  return docs
end

-- M.docs(task, opts) -> docs | nil, message (opts.data_dir, opts.data: { [task] = path })
function M.docs(task, opts)
  opts = opts or {}
  local path = (opts.data and opts.data[task.name]) or ((opts.data_dir or M.DATA_DIR) .. "/" .. task.data)
  local docs, err
  if (task.format or "jsonl") == "jsonl" then
    docs, err = M.read_jsonl(path)
  else
    local f, ferr = io.open(path, "rb")
    if not f then return nil, string.format("cannot read the data file %s: %s", path, tostring(ferr)) end
    local text = f:read("*a")
    f:close()
    docs = task.docs(text)
  end
  if not docs then return nil, err end
  if task.check then
    for i, d in ipairs(docs) do
      local ok, cerr = task.check(d)
      if not ok then return nil, string.format("%s:%d: %s", path, d._line or i, cerr) end
    end
  end
  return docs, nil, path
end

-- ------------------------------------------------------------------------------- prompts

-- A deterministic generator (a 31-bit LCG): the few-shot examples for a seed.
local function rng(seed)
  local s = (seed or 1234) % 2147483647
  if s == 0 then s = 1 end
  return function(n) -- 1 .. n
    s = (s * 48271) % 2147483647
    return s % n + 1
  end
end

-- The text of a few-shot example: its context, delimiter and gold target.
local function example_text(task, ex)
  local target = task.doc_to_target(ex)
  if task.output_type == "multiple_choice" and not task.multiple_input then
    return task.doc_to_text(ex) .. task.target_delimiter .. task.doc_to_choice(ex)[target + 1]
  end
  return task.doc_to_text(ex) .. task.target_delimiter .. target
end

-- M.fewshot_context(task, docs, i, k, seed) -> the k examples before document i's prompt (the
-- harness's format: examples joined by fewshot_delimiter, then the delimiter again); examples
-- drawn without replacement from the few-shot docs, never document i itself.
function M.fewshot_context(task, pool, i, k, seed)
  if k <= 0 then return "" end
  local draw = rng((seed or 1234) + i * 7919)
  local picked, used, parts = 0, { [i] = pool.same and true or nil }, {}
  local tries = 0
  while picked < k and tries < 100 * k do
    tries = tries + 1
    local j = draw(#pool.docs)
    if not used[j] then
      used[j] = true
      picked = picked + 1
      parts[#parts + 1] = example_text(task, pool.docs[j])
    end
  end
  return table.concat(parts, task.fewshot_delimiter) .. task.fewshot_delimiter
end

-- ------------------------------------------------------------------------------ requests

-- The harness's split of (context, continuation) into tokens (HFLM._encode_pair).
function M.encode_pair(tok, context, continuation, add_bos)
  local n = #context - #(context:gsub("%s+$", ""))
  if n > 0 then
    continuation = context:sub(-n) .. continuation
    context = context:sub(1, -n - 1)
  end
  local whole = tok:encode(context .. continuation, false)
  local ctx = context == "" and {} or tok:encode(context, false)
  local cont = {}
  for k = #ctx + 1, #whole do cont[#cont + 1] = whole[k] end
  if #cont == 0 then -- a context whose last token merges with the whole continuation
    cont = tok:encode(continuation, false)
  end
  if #ctx == 0 or add_bos then table.insert(ctx, 1, tok.bos or tok.eos) end
  return ctx, cont
end

-- A scoring request { ids, first } for (context tokens, continuation tokens): at most
-- max_length + 1 tokens, the context cut on the left.
local function request(ctx, cont, max_length)
  local ids = {}
  for _, t in ipairs(ctx) do ids[#ids + 1] = t end
  for _, t in ipairs(cont) do ids[#ids + 1] = t end
  local over = #ids - (max_length + 1)
  if over > 0 then
    local cut = {}
    for k = over + 1, #ids do cut[#cut + 1] = ids[k] end
    ids = cut
  end
  return { ids = ids, first = math.max(1, #ids - #cont) }
end

-- The harness's rolling windows (get_rolling_token_windows + make_disjoint_window, context_len
-- 1): requests that score every token once, each with up to max_length tokens before it.
function M.rolling_requests(tokens, prefix, max_length)
  local reqs, n = {}, #tokens
  if n == 0 then return reqs end
  local first = { prefix }
  for k = 1, math.min(max_length, n) do first[#first + 1] = tokens[k] end
  reqs[1] = { ids = first, first = 1 }
  local predicted = math.min(max_length, n)
  while predicted < n do
    local len = math.min(n - predicted, max_length)
    local wend = predicted + len
    local ids = {}
    for k = math.max(1, wend - max_length), wend do ids[#ids + 1] = tokens[k] end
    reqs[#reqs + 1] = { ids = ids, first = #ids - len }
    predicted = wend
  end
  return reqs
end

-- ------------------------------------------------------------------------------- metrics

local function utf8_len(s)
  local _, n = s:gsub("[^\128-\191]", "")
  return n
end

local function mean(xs)
  local s = 0
  for _, x in ipairs(xs) do s = s + x end
  return #xs > 0 and s / #xs or 0
end

-- the sample standard deviation over sqrt(n) (the harness's mean_stderr)
local function mean_stderr(xs)
  local n = #xs
  if n < 2 then return 0 end
  local m, s = mean(xs), 0
  for _, x in ipairs(xs) do s = s + (x - m) ^ 2 end
  return math.sqrt(s / (n - 1)) / math.sqrt(n)
end
M.mean, M.mean_stderr = mean, mean_stderr

local function argmax(xs)
  local best, bi = -math.huge, 1
  for i, x in ipairs(xs) do
    if x > best then best, bi = x, i end
  end
  return bi
end

-- The gsm8k answer normalization of exact_match (ignore_case, regexes_to_ignore: ",", "$",
-- everything up to "#### ", a final ".").
function M.normalize_answer(s)
  s = s:gsub("^.*#### ", ""):gsub(",", ""):gsub("%$", ""):gsub("%.$", "")
  return s:lower():match("^%s*(.-)%s*$")
end

-- ------------------------------------------------------------------------------- running

local function now() return require("luv").hrtime() / 1e9 end

-- A progress line on stderr: done/total, tokens/s, ETA (rank 0 only; throttled).
local function progress(label, total, quiet)
  local t0, last, tokens = now(), 0, 0
  return function(done, add_tokens, final)
    tokens = tokens + (add_tokens or 0)
    if quiet then return end
    local t = now()
    if not final and t - last < 0.5 then return end
    last = t
    local el = t - t0
    local rate = el > 0 and tokens / el or 0
    local eta = done > 0 and el / done * (total - done) or 0
    local w = 24
    local fill = total > 0 and math.floor(w * done / total) or w
    io.stderr:write(string.format("\r%-16s [%s%s] %d/%d  %.0f tok/s  ETA %s%s", label, string.rep("#", fill),
      string.rep(".", w - fill), done, total, rate, string.format("%d:%02d", math.floor(eta / 60), math.floor(eta % 60)),
      final and "\n" or ""))
    io.stderr:flush()
  end
end

-- Scores requests in batches of batch_size, documents longest first (a document's requests stay
-- together), results back in the requests' order. groups: lists of request indices.
local function score_all(lm, reqs, groups, batch_size, tick)
  table.sort(groups, function(a, b)
    if a.len ~= b.len then return a.len > b.len end
    return a[1] < b[1]
  end)
  local out = {}
  local batch, idx = {}, {}
  local function flush()
    if #batch == 0 then return end
    local rs = assert(lm.score_batch(batch))
    local ntok = 0
    for k, r in ipairs(rs) do
      out[idx[k]] = r
      ntok = ntok + #batch[k].ids
    end
    tick(#batch, ntok)
    batch, idx = {}, {}
  end
  for _, g in ipairs(groups) do
    if #batch > 0 and #batch + #g > batch_size then flush() end
    for _, i in ipairs(g) do
      batch[#batch + 1] = reqs[i]
      idx[#idx + 1] = i
      if #batch >= batch_size then flush() end
    end
  end
  flush()
  return out
end

-- M.run_task(lm, task, docs, opts) -> { metrics = { [name] = { value, stderr } }, n, samples }
--   lm: { tokenizer, max_length, score_batch(reqs) -> results, generate(ids, until, max_new) ->
--   text } (M.adapter(model) makes one from a moonshard model; tests pass a fake one)
--   opts.num_fewshot, opts.seed, opts.batch_size, opts.gen_batch, opts.quiet, opts.fewshot_docs,
--   opts.on_progress(done, total): after each batch (requests scored; documents of generate_until)
function M.run_task(lm, task, docs, opts)
  opts = opts or {}
  local k = opts.num_fewshot or task.num_fewshot or 0
  if task.output_type == "loglikelihood_rolling" then k = 0 end -- no few-shot context for perplexity
  local pool = { docs = opts.fewshot_docs or docs, same = opts.fewshot_docs == nil }
  local tok, max_len = lm.tokenizer, lm.max_length
  local ot = task.output_type
  local reqs, groups, per_doc = {}, {}, {}
  local ctx_of = {}
  for i, doc in ipairs(docs) do
    local fs = M.fewshot_context(task, pool, opts.doc_index and opts.doc_index[i] or i, k, opts.seed)
    if ot == "multiple_choice" then
      local choices, target = task.doc_to_choice(doc), task.doc_to_target(doc)
      local g, pairs_ = { len = 0 }, {}
      for c, choice in ipairs(choices) do
        local context, cont
        if task.multiple_input then
          context, cont = fs .. choice, task.target_delimiter .. target
        else
          context, cont = fs .. task.doc_to_text(doc), task.target_delimiter .. choice
        end
        local ce, te = M.encode_pair(tok, context, cont, opts.add_bos)
        local r = request(ce, te, max_len)
        reqs[#reqs + 1] = r
        g[#g + 1] = #reqs
        g.len = math.max(g.len, #r.ids)
        pairs_[c] = { context = context, continuation = cont }
      end
      groups[#groups + 1] = g
      per_doc[i] = { first = g[1], n = #choices, gold = task.multiple_input and doc.gold or target, choices = choices,
        requests = pairs_ }
    elseif ot == "loglikelihood" then
      local context, cont = fs .. task.doc_to_text(doc), task.target_delimiter .. task.doc_to_target(doc)
      local ce, te = M.encode_pair(tok, context, cont, opts.add_bos)
      local r = request(ce, te, max_len)
      reqs[#reqs + 1] = r
      groups[#groups + 1] = { #reqs, len = #r.ids }
      per_doc[i] = { first = #reqs, n = 1, requests = { { context = context, continuation = cont } } }
    elseif ot == "loglikelihood_rolling" then
      local text = task.doc_to_target(doc)
      local ids = tok:encode(text, false)
      local rr = M.rolling_requests(ids, tok.bos or tok.eos, max_len)
      local f = #reqs + 1
      for _, r in ipairs(rr) do
        reqs[#reqs + 1] = r
        groups[#groups + 1] = { #reqs, len = #r.ids }
      end
      per_doc[i] = { first = f, n = #rr }
    elseif ot == "generate_until" then
      ctx_of[i] = fs .. task.doc_to_text(doc)
      per_doc[i] = {}
    else
      error(string.format("task '%s': unknown output_type '%s'", task.name, tostring(ot)), 0)
    end
  end
  local total = ot == "generate_until" and #docs or #reqs
  local tick_p = progress(task.name, total, opts.quiet)
  local done = 0
  local function tick(n, ntok)
    done = done + n
    tick_p(done, ntok)
    if opts.on_progress then opts.on_progress(done, total) end
  end
  local res = score_all(lm, reqs, groups, opts.batch_size or 1, tick)
  -- per-document metrics
  local metrics, samples = {}, {}
  local function add(name, v)
    metrics[name] = metrics[name] or {}
    table.insert(metrics[name], v)
  end
  for i, doc in ipairs(docs) do
    local d = per_doc[i]
    local sample = { doc_id = i - 1 }
    if ot == "multiple_choice" then
      local lls, greedy, normed = {}, {}, {}
      for c = 1, d.n do
        local r = res[d.first + c - 1]
        lls[c], greedy[c] = r.sum, r.is_greedy
        normed[c] = r.sum / math.max(1, utf8_len(d.choices[c]))
      end
      local pick, pick_n = argmax(lls), argmax(normed)
      add("acc", pick - 1 == d.gold and 1 or 0)
      if not task.multiple_input then add("acc_norm", pick_n - 1 == d.gold and 1 or 0) end
      sample.target, sample.pick, sample.pick_norm, sample.loglikelihoods = d.gold, pick - 1, pick_n - 1, lls
      sample.requests = {}
      for c = 1, d.n do
        local r = reqs[d.first + c - 1]
        sample.requests[c] = { ids = r.ids, first = r.first }
      end
    elseif ot == "loglikelihood" then
      local r = res[d.first]
      add("perplexity", r.sum)
      add("acc", r.is_greedy and 1 or 0)
      sample.loglikelihood, sample.is_greedy = r.sum, r.is_greedy
    elseif ot == "loglikelihood_rolling" then
      local ll = 0
      for k2 = 0, d.n - 1 do ll = ll + res[d.first + k2].sum end
      local words, bytes = task.count(doc)
      add("ll", ll)
      add("words", words)
      add("bytes", bytes)
      sample.loglikelihood = ll
    end
    samples[i] = sample
  end
  if ot == "generate_until" then
    local gen = task.generation or {}
    local stops, max_new = gen["until"] or {}, gen.max_gen_toks or 256
    -- gen_batch documents side by side where the adapter can (lm.generate_many), else one by one
    -- (the default: a document's text then depends on nothing but itself)
    local per = lm.generate_many and math.max(1, opts.gen_batch or 1) or 1
    for i0 = 1, #docs, per do
      local i1 = math.min(#docs, i0 + per - 1)
      local outs = {}
      if per > 1 then
        local ctxs = {}
        for i = i0, i1 do ctxs[#ctxs + 1] = ctx_of[i] end
        outs = lm.generate_many(ctxs, stops, max_new, opts)
      else
        local text, ntok = lm.generate(ctx_of[i0], stops, max_new, opts)
        outs[1] = { text = text, ntok = ntok }
      end
      local ntoks = 0
      for i = i0, i1 do
        local o = outs[i - i0 + 1]
        local text, doc = o.text, docs[i]
        local target = task.doc_to_target(doc)
        local sample = { doc_id = i - 1, generated = text }
        for _, f in ipairs(task.filters) do
          local ans = f.fn(text)
          local ok = ans and M.normalize_answer(ans) == M.normalize_answer(target) and 1 or 0
          add("exact_match," .. f.name, ok)
          sample[f.name] = ans
        end
        samples[i] = sample
        ntoks = ntoks + (o.ntok or 0)
      end
      tick(i1 - i0 + 1, ntoks)
    end
  end
  tick_p(done, 0, true)
  -- aggregate
  local out = {}
  local wanted = {}
  for _, m in ipairs(task.metrics or {}) do wanted[m] = true end
  for name in pairs(metrics) do
    local base = name:match("^[^,]+")
    if task.metrics and not wanted[base] and ot ~= "loglikelihood_rolling" then metrics[name] = nil end
  end
  if ot == "loglikelihood_rolling" then
    local ll, words, bytes = 0, 0, 0
    for k2 = 1, #metrics.ll do
      ll, words, bytes = ll + metrics.ll[k2], words + metrics.words[k2], bytes + metrics.bytes[k2]
    end
    out["word_perplexity,none"] = { value = math.exp(-ll / words) }
    out["byte_perplexity,none"] = { value = math.exp(-ll / bytes) }
    out["bits_per_byte,none"] = { value = -ll / bytes / math.log(2) }
  else
    for name, xs in pairs(metrics) do
      local key = name:find(",") and name or name .. ",none"
      if name == "perplexity" then
        local nll = {}
        for k2, x in ipairs(xs) do nll[k2] = -x end
        local m = mean(nll)
        out[key] = { value = math.exp(m), stderr = math.exp(m) * mean_stderr(nll) } -- the delta method
      else
        out[key] = { value = mean(xs), stderr = mean_stderr(xs) }
      end
    end
  end
  return { metrics = out, n = #docs, samples = samples, requests = reqs, num_fewshot = k }
end

-- ---------------------------------------------------------------------- the model adapter

-- M.generation_ids(tok, context, max_new, max_len, o) -> ids: a generate_until context as token
-- ids (BOS first with o.add_bos, or alone for an empty context), its oldest tokens cut so that
-- max_new more fit in max_len positions (one at least is kept)
function M.generation_ids(tok, context, max_new, max_len, o)
  local ids = tok:encode(context, false)
  if o and o.add_bos or #ids == 0 then table.insert(ids, 1, tok.bos or tok.eos) end
  local keep = math.max(1, max_len - max_new)
  if #ids > keep then
    local cut = {}
    for k = #ids - keep + 1, #ids do cut[#cut + 1] = ids[k] end
    ids = cut
  end
  return ids
end

-- M.adapter(model, opts) -> lm: the scoring and greedy generation of a moonshard model.
--   opts.max_length: tokens of context at most (default min(2048, the model's context - 1))
function M.adapter(model, opts)
  opts = opts or {}
  local net = model.net
  local max_length = math.min(opts.max_length or 2048, net.max_seq - 1)
  local tok = model.tokenizer
  local lm = { tokenizer = tok, max_length = max_length }
  function lm.score_batch(reqs) return model:score_batch(reqs) end
  -- greedy decoding of up to max_new tokens after the context, cut at the first stop string
  function lm.generate(context, stops, max_new, o)
    local ids = M.generation_ids(tok, context, max_new, net.max_seq, o)
    net:reset()
    local logits = assert(net:forward(ids, 0))
    -- decoded as the engine streams it: after the context's last token (its leading space kept)
    local dec, text, n = tok:decoder(ids[#ids]), "", 0
    local eos = {}
    for _, id in ipairs(model.desc.stop or { tok.eos }) do eos[id] = true end
    while n < max_new do
      local id = model:argmax(logits)
      if eos[id] then break end
      n = n + 1
      text = text .. dec:push(id)
      local cut
      for _, s in ipairs(stops) do
        local at = s ~= "" and text:find(s, 1, true)
        if at and (not cut or at < cut) then cut = at end
      end
      if cut then return text:sub(1, cut - 1), #ids + n end
      if #ids + n >= net.max_seq then break end
      logits = assert(net:forward(id))
    end
    return text .. dec:flush(), #ids + n
  end
  -- one process: the documents of a batch generate side by side through the serving engine
  -- (greedy, the task's stop strings; a request's tokens are those it would get alone)
  if not model.dist then
    function lm.generate_many(contexts, stops, max_new, o)
      local st = {}
      for _, s in ipairs(stops or {}) do if s ~= "" then st[#st + 1] = s end end
      local engine = assert(require("moonshard.engine").new(model, { max_batch = math.min(#contexts, net.batch) }))
      local out = {}
      local ok, err = pcall(function()
        for i, c in ipairs(contexts) do
          local ids = M.generation_ids(tok, c, max_new, net.max_seq, o)
          local room = math.min(max_new, net.max_seq - #ids)
          assert(engine:submit { prompt_ids = ids, max_tokens = room, temperature = 0, stop = #st > 0 and st or nil,
            on_finish = function(q, reason)
              out[i] = { text = q.text, ntok = #ids + #q.output_ids,
                failed = (reason == "error" or reason == "cancelled") and (q.error or reason) or nil }
            end })
        end
        engine:run()
      end)
      engine:close()
      if not ok then error(err, 0) end
      for i = 1, #contexts do
        if not out[i] or out[i].failed then
          error(string.format("generation of document %d failed: %s", i, out[i] and tostring(out[i].failed) or "no result"), 0)
        end
      end
      return out
    end
  end
  return lm
end

-- ------------------------------------------------------------------------------- output

local HIGHER = { acc = true, acc_norm = true, exact_match = true, perplexity = false, word_perplexity = false,
  byte_perplexity = false, bits_per_byte = false }

-- M.results_json(runs, meta) -> the harness's results table (results, versions, n-shot,
-- n-samples, configs, higher_is_better, config, git_hash, date)
function M.results_json(runs, meta)
  local out = { results = {}, versions = {}, ["n-shot"] = {}, ["n-samples"] = {}, configs = {}, higher_is_better = {},
    group_subtasks = {} }
  for _, run in ipairs(runs) do
    local t, name = run.task, run.task.name
    local r = { alias = name }
    local hib = {}
    for key, m in pairs(run.metrics) do
      local metric, filter = key:match("^([^,]+),(.*)$")
      r[key] = m.value
      r[metric .. "_stderr," .. filter] = m.stderr or "N/A"
      hib[metric] = HIGHER[metric]
    end
    out.results[name] = r
    out.versions[name] = t.version
    out["n-shot"][name] = run.num_fewshot
    out["n-samples"][name] = { original = run.original, effective = run.n }
    out.higher_is_better[name] = hib
    out.group_subtasks[name] = setmetatable({}, cjson.empty_array_mt)
    out.configs[name] = {
      task = name, harness_task = t.harness, dataset_path = run.data_path, output_type = t.output_type,
      num_fewshot = run.num_fewshot, target_delimiter = t.target_delimiter, fewshot_delimiter = t.fewshot_delimiter,
      metric_list = t.metrics, generation_kwargs = t.generation, metadata = { version = t.version },
    }
  end
  for k, v in pairs(meta or {}) do out[k] = v end
  return out
end

-- M.markdown(results) -> the harness's table (make_table)
function M.markdown(res)
  local lines = { "|    Tasks     |Version|     Filter     |n-shot|    Metric     |   |  Value  |   |Stderr|",
    "|--------------|------:|----------------|-----:|---------------|---|--------:|---|-----:|" }
  local names = {}
  for name in pairs(res.results) do names[#names + 1] = name end
  table.sort(names)
  for _, name in ipairs(names) do
    local r = res.results[name]
    local keys = {}
    for key in pairs(r) do
      if key ~= "alias" and not key:find("_stderr,", 1, true) then keys[#keys + 1] = key end
    end
    table.sort(keys)
    local first = true
    for _, key in ipairs(keys) do
      local metric, filter = key:match("^([^,]+),(.*)$")
      local se = r[metric .. "_stderr," .. filter]
      local hib = (res.higher_is_better[name] or {})[metric]
      lines[#lines + 1] = string.format("|%-14s|%7s|%-16s|%6s|%-15s|%s|%9.4f|±  |%6s|",
        first and name or "", first and tostring(res.versions[name]) or "", filter,
        first and tostring(res["n-shot"][name]) or "", metric, hib == true and "↑  " or hib == false and "↓  " or "   ",
        r[key], type(se) == "number" and string.format("%.4f", se) or tostring(se))
      first = false
    end
  end
  return table.concat(lines, "\n") .. "\n"
end

-- M.encode_json(t) -> indented JSON text
function M.encode_json(t)
  return cjson.encode(t)
end

return M
