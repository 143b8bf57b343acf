-- Benchmark serving: replay N requests of given prompt/output lengths (random token ids, every
-- request generating its full length) all at once or at a Poisson request rate, against the engine
-- in this process (--model, or --dummy CONFIG: random weights of a config.json's shape) or a
-- running `moonshard serve` (--url); prints one JSON object. In process on a GPU it measures the
-- device's copy bandwidth and matrix rate first (moonshard.ceilings) and sums each step's floor
-- (weights and the entries' KV read once, or its matrix flops, whichever is longer): the report's
-- floor_output_tok_s and efficiency (floor time / measured time).
--
-- The chunked-prefill effect: --long-prompts N sends N prompts of --long-len tokens once every
-- other request is decoding (--long-at seconds after the last of them streamed its first token,
-- --long-interval apart). The report's `long` part has their TTFT and the inter-token latency of
-- the other requests' tokens that came while a long prompt waited for its first token
-- (decode_itl_ms); `steps` (--model) has the largest step's token count, alone and among steps
-- that also carried a decode. Run it twice, with and without --no-chunked-prefill: with chunking a
-- long prompt is split into chunks of at most --max-tokens-per-step tokens (minus the step's
-- decodes); without, a step must hold the whole prompt beside a full batch of decodes, so the
-- budget grows to the longest prompt plus --max-batch (vLLM's max_num_batched_tokens >=
-- max_model_len) and the running decodes wait for that step.
local args = require "moonshard.args"
local V = require "moonshard.validate"

local opts = args.parse(arg, {
  usage = "moonshard bench-serve (--model PATH | --dummy CONFIG | --url http://127.0.0.1:8000) [options]",
  summary = "Reports output and total tokens/s, TTFT and inter-token latency p50/p90/p99 (ms) as JSON on stdout.",
  { "model", "string", "run the engine in this process on this model", input = "model" },
  { "dummy", "string", "run the engine in this process on a model of this config.json with random weights", input = "config" },
  { "url", "string", "a running moonshard serve (streams /v1/completions)" },
  { "api-key", "string", "sent as 'Authorization: Bearer KEY' with --url" },
  { "num-requests", "int", "requests to replay", default = 64, min = 1, max = 1000000 },
  { "input-len", "int", "prompt tokens of a request", default = 32, min = 1 },
  { "output-len", "int", "tokens each request generates", default = 32, min = 1 },
  { "range-ratio", "number", "lengths drawn uniformly within +-ratio of the given ones (0: fixed)", default = 0, min = 0, max = 1 },
  { "request-rate", "number", "requests per second, Poisson arrivals (0: all at once)", default = 0, min = 0 },
  { "seed", "int", "seed of the lengths, ids and arrivals", default = 0, min = 0 },
  { "long-prompts", "int", "long prompts sent while the other requests decode (the chunked-prefill effect)", default = 0, min = 0 },
  { "long-len", "int", "prompt tokens of a long prompt", default = 1024, min = 1 },
  { "long-output-len", "int", "tokens a long prompt generates", default = 4, min = 1 },
  { "long-at", "number", "seconds after every other request streamed its first token that the first long prompt arrives", default = 0, min = 0 },
  { "long-interval", "number", "seconds between long prompts (0: all at once)", default = 0, min = 0 },
  { "no-chunked-prefill", "flag", "(--model, --dummy) prompts computed whole: the step budget grows to the longest prompt plus --max-batch" },
  { "max-batch", "int", "sequences at once (--model, --dummy)", default = 16, min = 1 },
  { "max-tokens-per-step", "int", "a step's token budget (--model, --dummy)", default = 512, min = 1 },
  { "no-prefix-caching", "flag", "(--model, --dummy) no reuse of cached prefix blocks" },
  { "slot-cache", "flag", "(--model, --dummy) one contiguous KV row per slot instead of the paged block pool" },
  { "policy", "string", "scheduling policy (--model, --dummy): fcfs, spf or a Lua file", default = "fcfs" },
  { "device", "string", "cpu or cuda[:N] (--model, --dummy)", default = "cpu", check = V.device },
  { "dtype", "string", "weights' dtype (--model, --dummy)", enum = V.DTYPES },
  { "max-seq", "int", "context length (--model, --dummy; default: the model's)", min = 1 },
  { "kv-blocks", "int", "blocks of the paged KV pool (--model, --dummy; default: max-batch x max-seq / 16)", min = 1 },
  { "no-ceilings", "flag", "(--model, --dummy on a GPU) skip measuring the device's ceilings and the floor they give" },
  { "vocab", "int", "token ids are drawn below this (--url; default: the server's vocab_size)", min = 1 },
})

local function fail(msg)
  io.stderr:write("moonshard bench-serve: ", msg, "\n")
  os.exit(1)
end
local n_targets = (opts.model and 1 or 0) + (opts.dummy and 1 or 0) + (opts.url and 1 or 0)
if n_targets ~= 1 then fail("give --model, --dummy or --url (one of them)") end
local in_process = opts.model or opts.dummy
if opts.url and opts.no_chunked_prefill then
  fail("--no-chunked-prefill applies to the engine in this process (--model), not to a server")
end

local uv = require "luv"
local cjson = require "cjson"
local http = require "moonshard.http"

-- a private generator (xorshift32) so runs repeat with --seed
local bit = require "bit"
local state = opts.seed % 2147483646 + 1
local function rnd() -- uniform in [0, 1)
  state = bit.bxor(state, bit.lshift(state, 13))
  state = bit.bxor(state, bit.rshift(state, 17))
  state = bit.bxor(state, bit.lshift(state, 5))
  return (state % 2147483647 + 2147483647) % 2147483647 / 2147483647
end
local function length(n)
  if opts.range_ratio == 0 then return n end
  local lo, hi = math.max(1, math.floor(n * (1 - opts.range_ratio))), math.floor(n * (1 + opts.range_ratio))
  return lo + math.floor(rnd() * (hi - lo + 1))
end

local function percentiles(xs)
  table.sort(xs)
  local function p(q)
    if #xs == 0 then return cjson.null end
    local i = math.max(1, math.min(#xs, math.ceil(q * #xs)))
    return xs[i] * 1e3
  end
  local s = 0
  for _, x in ipairs(xs) do s = s + x end
  return { p50 = p(0.5), p90 = p(0.9), p99 = p(0.99), max = p(1), mean = #xs > 0 and s / #xs * 1e3 or cjson.null,
    n = #xs }
end

-- the target: submit(r, on_token(t), on_done(err)) for one request
local submit, vocab, finish_target
local steps -- (--model) the engine's steps: count, largest token counts
local floor -- (--model on a GPU) the ceilings measured now and the model's bytes and flops
local budget = opts.max_tokens_per_step
if in_process then
  local moonshard = require "moonshard"
  -- the longest prompt; without chunked prefill a step holds it whole beside a full batch of
  -- decodes. The runner's step rows are sized for the larger of that step and the budget, so
  -- runs with and without chunking load the same model.
  local longest = math.floor(opts.input_len * (1 + opts.range_ratio))
  if opts.long_prompts > 0 then longest = math.max(longest, opts.long_len) end
  if opts.no_chunked_prefill then budget = math.max(budget, longest + opts.max_batch) end
  local step_tokens = math.max(budget, longest + opts.max_batch)
  local gpu = opts.device ~= "cpu"
  local ceil = require "moonshard.ceilings"
  if gpu and not opts.no_ceilings then -- before the model holds the device's memory
    local bw, rate = ceil.device(opts.device)
    if not bw then fail(rate) end
    floor = { bw = bw, rate = rate, s = 0 }
  end
  local lopts = { device = opts.device, dtype = opts.dtype, max_seq = opts.max_seq, batch = opts.max_batch,
    kv_blocks = not opts.slot_cache and (opts.kv_blocks or true) or nil, step_tokens = step_tokens }
  local model, err
  if opts.dummy then
    local desc, derr = require("moonshard.loaders.dummy").load(opts.dummy)
    if not desc then fail(derr) end
    model, err = moonshard.build(desc, lopts, { path = opts.dummy })
  else
    model, err = moonshard.load(opts.model, lopts)
  end
  if not model then fail(err) end
  if floor then
    -- a step's floor: its weights read once, every entry's keys and values read once, against
    -- its matrix flops (the head over one row an entry), whichever takes longer
    floor.weight_bytes, floor.params, floor.head_params = ceil.weights(model.net)
    floor.kv_bytes_per_position = ceil.kv_bytes_per_position(model.net)
  end
  if opts.long_prompts > 0 and opts.long_len + opts.long_output_len > model.net.max_seq then
    fail(string.format("--long-len %d with --long-output-len %d exceeds the context of %d tokens (--max-seq)",
      opts.long_len, opts.long_output_len, model.net.max_seq))
  end
  if opts.long_prompts > 0 and opts.request_rate == 0 and opts.max_batch < opts.num_requests + opts.long_prompts then
    -- all at once: the other requests hold the batch's slots, so the long prompts would wait for
    -- them to end instead of running beside their decodes
    io.stderr:write(string.format("moonshard bench-serve: warning: --max-batch %d holds the %d requests but not the %d long "
      .. "prompt%s beside them: they wait for the decodes to end (--max-batch %d measures chunked prefill)\n",
      opts.max_batch, opts.num_requests, opts.long_prompts, opts.long_prompts == 1 and "" or "s",
      opts.num_requests + opts.long_prompts))
  end
  local engine
  engine, err = require("moonshard.engine").new(model, { max_batch = opts.max_batch,
    max_tokens_per_step = budget, prefix_caching = not opts.no_prefix_caching, policy = opts.policy,
    chunked_prefill = not opts.no_chunked_prefill })
  if not engine then fail(err) end
  budget = engine.sched.budget
  steps = { count = 0, max_tokens = 0, max_tokens_with_decodes = 0, max_ms_with_decodes = 0, prefill_tokens = 0 }
  engine.on_step = function(info)
    steps.count = steps.count + 1
    if floor then
      local flops = 2 * (floor.params - floor.head_params) * info.tokens + 2 * floor.head_params * info.batch
      floor.s = floor.s + math.max((floor.weight_bytes + floor.kv_bytes_per_position * info.context) / floor.bw,
        flops / floor.rate)
    end
    steps.prefill_tokens = steps.prefill_tokens + info.prefill_tokens
    if info.tokens > steps.max_tokens then steps.max_tokens = info.tokens end
    if info.decode_tokens > 0 then
      if info.tokens > steps.max_tokens_with_decodes then steps.max_tokens_with_decodes = info.tokens end
      if info.seconds * 1e3 > steps.max_ms_with_decodes then steps.max_ms_with_decodes = info.seconds * 1e3 end
    end
  end
  engine:attach(uv)
  vocab = model.net.vocab_size
  submit = function(r, on_token, on_done)
    local req, serr = engine:submit { prompt_ids = r.ids, max_tokens = r.out, temperature = 0, ignore_eos = true,
      on_token = function(_, id) if id then on_token(uv.hrtime()) end end,
      on_finish = function(q, reason) on_done(reason == "error" and tostring(q.error) or nil) end }
    if not req then on_done(serr) end
  end
  finish_target = function() engine:detach() model:close() end
else
  local headers = { ["Content-Type"] = "application/json" }
  if opts.api_key then headers.Authorization = "Bearer " .. opts.api_key end
  local ok, perr = http.parse_url(opts.url)
  if not ok then fail(perr) end
  local base = opts.url:gsub("/+$", "")
  vocab = opts.vocab
  local model_name
  do -- the model's name (and vocabulary) from /v1/models
    local body, derr = {}, false
    http.request(base .. "/v1/models", { method = "GET", headers = headers }, {
      on_head = function(status) if status ~= 200 then derr = "GET /v1/models answered " .. status end end,
      on_data = function(b) body[#body + 1] = b end, on_done = function(e) derr = derr or e or true end })
    while derr == false do uv.run("once") end
    if derr ~= true then fail(tostring(derr)) end
    local dok, m = pcall(cjson.decode, table.concat(body))
    if not dok or type(m) ~= "table" or not m.data or not m.data[1] then fail("GET /v1/models: not a model list") end
    model_name = m.data[1].id
    vocab = vocab or tonumber(m.data[1].vocab_size)
    if not vocab then fail("the server does not say its vocab_size; give --vocab") end
  end
  submit = function(r, on_token, on_done)
    local buf, failed = "", nil
    http.request(base .. "/v1/completions", { method = "POST", headers = headers, body = cjson.encode {
      model = model_name, prompt = r.ids, max_tokens = r.out, temperature = 0, ignore_eos = true, stream = true } }, {
      on_head = function(status) if status ~= 200 then failed = "HTTP " .. status end end,
      on_data = function(b)
        local now = uv.hrtime()
        buf = buf .. b
        while true do
          local ev, rest = buf:match("^(.-)\n\n(.*)$")
          if not ev then break end
          buf = rest
          local d = ev:match("^data: (.*)$")
          if d and d ~= "[DONE]" then
            local dok, c = pcall(cjson.decode, d)
            if dok and c.choices and c.choices[1] and c.choices[1].text ~= "" then on_token(now) end
            if dok and c.error then failed = tostring(c.error.message) end
          end
        end
      end,
      on_done = function(e) on_done(failed or e) end,
    })
  end
  finish_target = function() end
end

-- the requests: lengths, ids, arrival times
local reqs = {}
local t_arrive = 0
for i = 1, opts.num_requests do
  local n_in, n_out = length(opts.input_len), length(opts.output_len)
  local ids = {}
  for k = 1, n_in do ids[k] = math.floor(rnd() * vocab) end
  if opts.request_rate > 0 and i > 1 then t_arrive = t_arrive - math.log(1 - rnd()) / opts.request_rate end
  reqs[i] = { ids = ids, out = n_out, at = t_arrive, times = {} }
end
-- the long prompts: sent once every request above has streamed its first token
local longs = {}
for i = 1, opts.long_prompts do
  local ids = {}
  for k = 1, opts.long_len do ids[k] = math.floor(rnd() * vocab) end
  longs[i] = { ids = ids, out = opts.long_output_len, at = opts.long_at + (i - 1) * opts.long_interval, times = {},
    long = true }
end

local t0 = uv.hrtime()
local pending, failures = #reqs + #longs, {}
local waiting_first = #reqs -- requests yet to stream their first token
local start
local function send_longs()
  for _, r in ipairs(longs) do
    if r.at <= 0 then start(r) else
      local t = uv.new_timer()
      t:start(math.floor(r.at * 1000), 0, function() t:close() start(r) end)
    end
  end
end
start = function(r)
  r.t_start = uv.hrtime()
  submit(r, function(t)
    r.times[#r.times + 1] = t
    if #r.times == 1 and not r.long then
      waiting_first = waiting_first - 1
      if waiting_first == 0 and #longs > 0 then -- from the loop, not inside the engine's step
        local t1 = uv.new_timer()
        t1:start(0, 0, function() t1:close() send_longs() end)
      end
    end
  end, function(err)
    r.t_end = uv.hrtime()
    if err then failures[#failures + 1] = err end
    r.err = err
    pending = pending - 1
    if not r.long and #r.times == 0 then -- ended without a token: the long prompts need not wait for it
      waiting_first = waiting_first - 1
      if waiting_first == 0 and #longs > 0 then send_longs() end
    end
  end)
end
for _, r in ipairs(reqs) do
  if r.at <= 0 then start(r) else
    local t = uv.new_timer()
    t:start(math.floor(r.at * 1000), 0, function() t:close() start(r) end)
  end
end
while pending > 0 do uv.run("once") end
local t1 = uv.hrtime()
finish_target()

local ttft, itl, out_tokens, in_tokens = {}, {}, 0, 0
for _, r in ipairs(reqs) do
  if not r.err then
    in_tokens = in_tokens + #r.ids
    out_tokens = out_tokens + #r.times
    if r.times[1] then ttft[#ttft + 1] = (r.times[1] - r.t_start) / 1e9 end
    for i = 2, #r.times do itl[#itl + 1] = (r.times[i] - r.times[i - 1]) / 1e9 end
  end
end
for _, r in ipairs(longs) do
  if not r.err then
    in_tokens = in_tokens + #r.ids
    out_tokens = out_tokens + #r.times
  end
end
local dur = (t1 - t0) / 1e9
local long = cjson.null
if #longs > 0 then
  -- the other requests' inter-token gaps that ended while a long prompt waited for its first token
  local ttft_long, during = {}, {}
  local windows = {}
  for _, r in ipairs(longs) do
    if r.times[1] then
      ttft_long[#ttft_long + 1] = (r.times[1] - r.t_start) / 1e9
      windows[#windows + 1] = { r.t_start, r.times[1] }
    end
  end
  for _, r in ipairs(reqs) do
    for i = 2, #r.times do
      local t = r.times[i]
      for _, w in ipairs(windows) do
        if t >= w[1] and t <= w[2] then during[#during + 1] = (t - r.times[i - 1]) / 1e9 break end
      end
    end
  end
  long = { prompts = #longs, len = opts.long_len, output_len = opts.long_output_len, at = opts.long_at,
    interval = opts.long_interval, ttft_ms = percentiles(ttft_long), decode_itl_ms = percentiles(during) }
end
local result = {
  target = opts.url or opts.model or opts.dummy, requests = #reqs + #longs, completed = #reqs + #longs - #failures,
  failed = #failures,
  first_error = failures[1] or cjson.null, input_len = opts.input_len, output_len = opts.output_len,
  range_ratio = opts.range_ratio, request_rate = opts.request_rate > 0 and opts.request_rate or "inf",
  duration_s = dur, prompt_tokens = in_tokens, output_tokens = out_tokens,
  output_tok_s = out_tokens / dur, total_tok_s = (in_tokens + out_tokens) / dur,
  ttft_ms = percentiles(ttft), itl_ms = percentiles(itl), long = long,
  -- the engine in this process: its chunking, its step budget and its steps
  chunked_prefill = cjson.null, max_tokens_per_step = cjson.null, steps = steps or cjson.null,
}
if in_process then
  result.chunked_prefill, result.max_tokens_per_step = not opts.no_chunked_prefill, budget
  result.device, result.max_batch = opts.device, opts.max_batch
end
if floor then
  -- the steps' floors summed (moonshard.ceilings): the output tokens/s no step could beat
  result.ceiling_copy_GBps, result.ceiling_matmul_TFLOPs = floor.bw / 1e9, floor.rate / 1e12
  result.weight_bytes, result.floor_s = floor.weight_bytes, floor.s
  result.floor_output_tok_s = out_tokens / floor.s
  result.efficiency = floor.s / dur
end
io.stdout:write(cjson.encode(result), "\n")
if #failures > 0 then os.exit(1) end
