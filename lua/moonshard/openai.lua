-- moonshard.openai: the OpenAI-compatible HTTP API over one engine (moonshard.engine):
--   POST /v1/completions       prompt: a string, a list of strings, token ids or lists of ids;
--                              max_tokens, temperature, top_p, top_k, seed, stop, n, stream, echo,
--                              logprobs (top-k with token strings and text offsets), usage
--   POST /v1/chat/completions  messages through the model's chat template; SSE streaming;
--                              usage in the last chunk with stream_options.include_usage
--   GET  /v1/models, /health, /metrics (Prometheus text)
--
--   local api = openai.new(engine, model, { name = "stories260K", api_key = nil, max_queue = 1024,
--                                           template = tmpl, metrics = registry })
--   http.server { handler = api.handler, on_response = api.on_response }
--
-- Request fields are checked with moonshard.validate; a bad one answers 400 with OpenAI's error
-- object naming the field (param). A client that disconnects cancels its requests in the engine.
-- A request that would take the engine past max_batch + max_queue sequences answers 429 with
-- Retry-After. Stop strings are matched here on the decoded text (held back while they could
-- still begin one), so the text returned never holds them.
local cjson = require "cjson"
local uv = require "luv"
local V = require "moonshard.validate"
local metrics_mod = require "moonshard.metrics"
local chat_template = require "moonshard.chat_template"

local M = {}

local null = cjson.null
-- lua-cjson writes an empty table as {}; lists that may be empty are marked and fixed after
local EMPTY = "\1\2moonshard-empty-list\2\1"
local EMPTY_JSON = cjson.encode(EMPTY)
local function encode(v)
  local s = cjson.encode(v)
  if s:find(EMPTY_JSON, 1, true) then s = s:gsub(EMPTY_JSON:gsub("%p", "%%%0"), "[]") end
  return s
end
M.encode = encode
local function list(t) return #t > 0 and t or EMPTY end
M.EMPTY, M.list = EMPTY, list

-- ------------------------------------------------------------------------------- errors

-- raised inside a handler: { status, message, param, type, code, headers }
local function api_error(status, message, param, code, etype, headers)
  error({ api_error = true, status = status, message = message, param = param, code = code, type = etype,
    headers = headers }, 0)
end

M.api_error = api_error

local function error_body(e)
  return { error = { message = e.message, type = e.type or (e.status >= 500 and "server_error" or "invalid_request_error"),
    param = e.param or null, code = e.code or null } }
end

-- a field through moonshard.validate; a bad value is a 400 naming it
local function field(body, key, spec)
  local ok, v = pcall(V.field, body, key, spec)
  if not ok then api_error(400, tostring(v), key) end
  return v
end

-- pieces of text that are not UTF-8 (a byte-level token's part of a character) are written as
-- vLLM writes them: "bytes:\xNN..."
local function token_text(s)
  if V.utf8(s) then return s end
  return "bytes:" .. s:gsub(".", function(c) return string.format("\\x%02x", c:byte()) end)
end

local function bytes_of(s)
  local b = {}
  for i = 1, #s do b[i] = s:byte(i) end
  return list(b)
end

-- ------------------------------------------------------------------------------- the API

local API = {}
API.__index = API

-- latency buckets (seconds) for time to first token and between tokens
local TTFT_BUCKETS = { 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80 }
local ITL_BUCKETS = { 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5 }

-- M.new(engine, model, opts) -> api (api.handler(req, res), api.on_response(res))
--   opts.name: the model's name in the API (default: the path's last part)
--   opts.api_key: required as "Authorization: Bearer KEY" on /v1/ paths when set
--   opts.max_batch, opts.max_queue: sequences running and waiting before 429 (default 1, 1024)
--   opts.template: a chat template (moonshard.chat_template; default: the model's own)
--   opts.metrics: a moonshard.metrics registry (default: a new one)
function M.new(engine, model, opts)
  opts = opts or {}
  local tok = model.tokenizer
  local self = setmetatable({ engine = engine, model = model, tok = tok, opts = opts,
    name = opts.name or tostring(model.path or "model"):gsub("/+$", ""):match("[^/]*$"),
    created = os.time(), max_batch = opts.max_batch or 1, max_queue = opts.max_queue or 1024,
    vocab = model.net and model.net.vocab_size or tok.vocab_size,
    max_seq = model.net and model.net.max_seq or math.huge, next_id = 0, live = {} }, API)
  -- the chat template and its stops (none: chat completions answer 400)
  local tmpl, terr = opts.template, nil
  if not tmpl then tmpl, terr = chat_template.resolve(nil, model.desc and model.desc.chat_template) end
  self.template, self.template_err = tmpl, terr
  local function text_of(id, default)
    if not id then return default end
    local t = tok.special_text and tok.special_text[id] or tok:piece(id)
    return t ~= "" and t or default
  end
  self.special = { bos = text_of(tok.bos, "<s>"), eos = text_of(tok.eos, "</s>") }
  local eos = {}
  for _, id in ipairs(model.desc and model.desc.stop or { tok.eos }) do eos[#eos + 1] = id end
  self.eos_ids = eos
  if tmpl then
    local extra = { tok.eos }
    for _, id in ipairs(eos) do extra[#extra + 1] = id end
    local ids, texts = chat_template.stops(tmpl, tok, extra)
    self.chat_stop_ids, self.chat_stop_texts = {}, texts
    for id in pairs(ids) do self.chat_stop_ids[#self.chat_stop_ids + 1] = id end
    table.sort(self.chat_stop_ids)
  end
  self:init_metrics(opts.metrics or metrics_mod.new())
  self.handler = function(req, res) return self:handle(req, res) end
  self.on_response = function(res) self.m.requests:inc(1, { status = tostring(res.status) }) end
  return self
end

function API:init_metrics(reg)
  self.metrics = reg
  local e = self.engine
  local last = { batch = 0 }
  self.last_step = last
  local function stat(k) return function() return e:stats()[k] or 0 end end
  self.m = {
    requests = reg:counter("moonshard_requests_total", "HTTP requests answered, by status code", { "status" }),
    prompt = reg:counter("moonshard_prompt_tokens_total", "prompt tokens of the requests submitted"),
    generated = reg:counter("moonshard_generation_tokens_total", "tokens generated for requests"),
    cancelled = reg:counter("moonshard_requests_cancelled_total", "requests whose client disconnected before the end"),
    ttft = reg:histogram("moonshard_time_to_first_token_seconds", "time from a request's arrival to its first token", TTFT_BUCKETS),
    itl = reg:histogram("moonshard_inter_token_latency_seconds", "time between consecutive tokens of a sequence", ITL_BUCKETS),
  }
  reg:gauge("moonshard_queue_length", "sequences waiting to be scheduled", stat("waiting"))
  reg:gauge("moonshard_running_sequences", "sequences being generated", stat("running"))
  reg:gauge("moonshard_running_batch_size", "sequences in the engine's last step", function() return last.batch end)
  reg:gauge("moonshard_kv_blocks_used", "KV-cache blocks in use", stat("kv_blocks_used"))
  reg:gauge("moonshard_kv_blocks_free", "KV-cache blocks free", stat("kv_blocks_free"))
  reg:gauge("moonshard_prefix_cache_queries", "prefix-cache lookups (blocks)", stat("prefix_queries"))
  reg:gauge("moonshard_prefix_cache_hits", "prefix-cache hits (blocks)", stat("prefix_hits"))
  reg:gauge("moonshard_prefix_cache_hit_rate", "prefix-cache hits over lookups (0 before any)", function()
    local s = e:stats()
    return (s.prefix_queries or 0) > 0 and (s.prefix_hits or 0) / s.prefix_queries or 0
  end)
  reg:gauge("moonshard_engine_steps", "engine steps run", stat("steps"))
  reg:gauge("moonshard_preemptions", "sequences preempted for KV blocks", stat("preemptions"))
end

-- engine.on_step is the server's: the running batch size for /metrics
function API:on_step(info) self.last_step.batch = info.batch or 0 end

-- ------------------------------------------------------------------------------- routing

local ROUTES = {
  ["/health"] = "GET", ["/metrics"] = "GET", ["/v1/models"] = "GET",
  ["/v1/completions"] = "POST", ["/v1/chat/completions"] = "POST",
}

function API:handle(req, res)
  req.t_arrival = req.t_arrival or uv.hrtime()
  local ok, err = pcall(self.route, self, req, res)
  if ok then return end
  if type(err) ~= "table" or not err.api_error then error(err, 0) end
  if res.started then -- a stream already begun ends with an error event
    if res.chunked and not res.finished then
      res:write("data: " .. encode(error_body(err)) .. "\n\n")
      res:write("data: [DONE]\n\n")
      res:finish()
    end
    return
  end
  local headers = { ["Content-Type"] = "application/json" }
  for k, v in pairs(err.headers or {}) do headers[k] = v end
  res:send(err.status, headers, encode(error_body(err)))
end

-- a 401 unless the request carries the API key (when the server has one)
function API:check_auth(req)
  if not self.opts.api_key then return end
  local auth = req.headers.authorization or ""
  if auth ~= "Bearer " .. self.opts.api_key then
    api_error(401, auth == "" and "no API key given (Authorization: Bearer KEY)" or "the API key is not valid",
      nil, "invalid_api_key", nil, { ["WWW-Authenticate"] = "Bearer" })
  end
end

function API:route(req, res)
  local path = req.path
  if #path > 1 then path = path:gsub("/+$", "") end
  -- the web console's files and /v1/console/ routes (moonshard.console)
  if self.console and not ROUTES[path] and self.console:owns(path, req.method) then
    return self.console:route(req, res, path)
  end
  local method = ROUTES[path]
  if not method then api_error(404, string.format("no route %s %s", req.method, path), nil, "not_found") end
  if req.method ~= method and not (method == "GET" and req.method == "HEAD") then
    api_error(405, string.format("%s takes %s, not %s", path, method, req.method), nil, "method_not_allowed", nil,
      { Allow = method })
  end
  if path:match("^/v1/") then self:check_auth(req) end
  if path == "/health" then return res:json(200, { status = "ok" }) end
  if path == "/metrics" then
    return res:send(200, { ["Content-Type"] = metrics_mod.CONTENT_TYPE }, self.metrics:render())
  end
  if path == "/v1/models" then
    return res:json(200, { object = "list", data = { { id = self.name, object = "model", created = self.created,
      owned_by = "moonshard", max_model_len = self.max_seq ~= math.huge and self.max_seq or null,
      vocab_size = self.vocab } } })
  end
  local ok, body = pcall(cjson.decode, req.body)
  if not ok or type(body) ~= "table" or (next(body) ~= nil and rawget(body, 1) ~= nil) then
    api_error(400, "the body must be a JSON object (" .. (ok and V.show(body) or "not valid JSON") .. ")")
  end
  local model = field(body, "model", { type = "string" })
  if model and model ~= self.name then
    api_error(404, string.format("the model '%s' does not exist (this server has '%s')", model, self.name), "model",
      "model_not_found")
  end
  if path == "/v1/completions" then return self:completions(body, req, res) end
  return self:chat(body, req, res)
end

-- ------------------------------------------------------------------------------- sampling fields

-- the fields completions and chat share
function API:sampling(body)
  local s = {
    temperature = field(body, "temperature", { type = "number", min = 0, max = 2, default = 1 }),
    top_p = field(body, "top_p", { type = "number", min = 0, max = 1, default = 1 }),
    top_k = field(body, "top_k", { type = "int", min = -1, default = 0 }),
    seed = field(body, "seed", { type = "int", min = 0, max = 2 ^ 53 - 1 }),
    n = field(body, "n", { type = "int", min = 1, max = 16, default = 1 }),
    stream = field(body, "stream", { type = "boolean", default = false }),
    ignore_eos = field(body, "ignore_eos", { type = "boolean", default = false }),
  }
  if s.top_k == -1 then s.top_k = 0 end
  for _, k in ipairs { "presence_penalty", "frequency_penalty" } do
    local v = field(body, k, { type = "number", min = -2, max = 2 })
    if v and v ~= 0 then api_error(400, string.format("field '%s' is not supported (give 0 or leave it out)", k), k) end
  end
  local so = field(body, "stream_options", { type = "table" })
  s.include_usage = so and field(so, "include_usage", { type = "boolean", default = false }) or false
  if so and not s.stream then api_error(400, "field 'stream_options' is only allowed with stream: true", "stream_options") end
  local stop = body.stop
  if V.absent(stop) then
    s.stop = {}
  elseif type(stop) == "string" then
    s.stop = stop ~= "" and { stop } or {}
  else
    s.stop = field(body, "stop", { type = "list", max = 16, elem = { type = "string", min = 1 } })
  end
  return s
end

-- the ids of one prompt: a string (tokenized, BOS as the model wants) or a list of ids
function API:encode_prompt(p, param)
  if type(p) == "string" then
    if not V.utf8(p) then api_error(400, "field '" .. param .. "' is not valid UTF-8", param) end
    local ids = self.tok:encode(p, self.tok.add_bos ~= false)
    if #ids == 0 then ids = { self.tok.bos or self.tok.eos } end
    return ids
  end
  for i, id in ipairs(p) do
    if type(id) ~= "number" or id % 1 ~= 0 or id < 0 or id >= self.vocab then
      api_error(400, string.format("field '%s' holds %s at element %d, not a token id in 0..%d", param, V.show(id), i,
        self.vocab - 1), param)
    end
  end
  return p
end

-- prompt: a string, a list of strings, a list of ids or a list of lists of ids -> list of id lists
function API:prompts(body)
  local p = body.prompt
  if V.absent(p) then api_error(400, "missing field 'prompt' (a string, a list of strings or token ids)", "prompt") end
  local bad = "field 'prompt' must be a string, a list of strings, a list of token ids or a list of lists of token ids"
  if type(p) == "string" then return { self:encode_prompt(p, "prompt") } end
  if type(p) ~= "table" or rawget(p, 1) == nil then api_error(400, bad .. " (got " .. V.show(p) .. ")", "prompt") end
  local n = 0
  for _ in pairs(p) do n = n + 1 end
  if n ~= #p then api_error(400, bad, "prompt") end
  if type(p[1]) == "number" then return { self:encode_prompt(p, "prompt") } end
  local out = {}
  for i, x in ipairs(p) do
    if type(x) == "string" then
      out[i] = self:encode_prompt(x, "prompt")
    elseif type(x) == "table" and rawget(x, 1) ~= nil then
      out[i] = self:encode_prompt(x, "prompt")
    else
      api_error(400, bad .. string.format(" (element %d is %s)", i, V.show(x)), "prompt")
    end
  end
  if #out > 64 then api_error(400, "field 'prompt' holds more than 64 prompts", "prompt") end
  return out
end

-- ------------------------------------------------------------------------------- running choices

-- A choice follows one engine request: text held back while it may begin a stop string, the
-- tokens and their log-probabilities, the finish reason.
local function stop_cut(held, stops)
  for _, st in ipairs(stops) do
    local at = held:find(st, 1, true)
    if at then return at end
  end
end

-- bytes at the end of held that could begin a stop string
local function stop_hold(held, stops)
  local keep = 0
  for _, st in ipairs(stops) do
    for k = math.min(#st - 1, #held), 1, -1 do
      if k > keep and held:sub(-k) == st:sub(1, k) then keep = k break end
    end
  end
  return keep
end

-- Runs the choices of one request. spec: { prompts = { ids... }, n, sampling, max_tokens, logprobs
-- (k or nil), echo, stop_ids, on_text(choice, text, tokens), on_finish(choice) , on_all() }
function API:run(spec, req, res)
  local engine, m = self.engine, self.m
  local t_arrival = req.t_arrival or uv.hrtime()
  local group = { choices = {}, open = 0, prompt_tokens = 0, completion_tokens = 0 }
  local s = spec.sampling
  -- capacity: sequences in the engine and these must fit in the batch and the queue
  local st = engine:stats()
  local need = #spec.prompts * s.n
  if (st.waiting or 0) + (st.running or 0) + need > self.max_batch + self.max_queue then
    api_error(429, string.format("the server is busy (%d sequences waiting, %d running); retry later",
      st.waiting or 0, st.running or 0), nil, "rate_limit_exceeded", "rate_limit_error", { ["Retry-After"] = "1" })
  end
  for pi, ids in ipairs(spec.prompts) do
    if #ids + spec.max_tokens > self.max_seq then
      local param = #ids >= self.max_seq and spec.prompt_param or "max_tokens"
      api_error(400, string.format("this model's context is %d tokens; the prompt holds %d and max_tokens asks for %d",
        self.max_seq, #ids, spec.max_tokens), param, "context_length_exceeded")
    end
    for j = 1, s.n do
      local c = { index = (pi - 1) * s.n + (j - 1), prompt_ids = ids, held = "", parts = {}, ids = {}, lps = {},
        tops = {}, texts = {}, n_tokens = 0 }
      group.choices[#group.choices + 1] = c
    end
    group.prompt_tokens = group.prompt_tokens + #ids * s.n
  end
  local stop_ids = {}
  if not s.ignore_eos then for _, id in ipairs(spec.stop_ids) do stop_ids[#stop_ids + 1] = id end end

  local function finish(c, reason)
    if c.finished then return end
    if c.held ~= "" then
      spec.on_text(c, c.held)
      c.held = ""
    end
    c.finished, c.finish_reason = true, reason
    group.open = group.open - 1
    spec.on_finish(c)
    if group.open == 0 then
      self.live[group] = nil
      spec.on_all(group)
    end
  end

  local function on_token(c, r, id, text, lp)
    if id == nil then -- text the engine held back, at the end
      if c.finished or type(text) ~= "string" or text == "" then return end
      if #s.stop == 0 then return spec.on_text(c, text) end
      c.held = c.held .. text
      return
    end
    local now = uv.hrtime()
    if c.t_last then m.itl:observe((now - c.t_last) / 1e9) else m.ttft:observe((now - t_arrival) / 1e9) end
    c.t_last = now
    c.n_tokens = c.n_tokens + 1
    group.completion_tokens = group.completion_tokens + 1
    m.generated:inc(1)
    if c.finished then return end
    if type(text) ~= "string" then text = c.dec:push(id) end
    c.ids[#c.ids + 1] = id
    c.texts[#c.texts + 1] = text
    if spec.logprobs then
      local tops = r and r.top_logprobs
      c.lps[#c.lps + 1] = lp or 0
      c.tops[#c.tops + 1] = tops and tops[#r.output_ids] or {}
    end
    local stops = s.stop
    if #stops == 0 then
      spec.on_text(c, text)
      return
    end
    c.held = c.held .. text
    local at = stop_cut(c.held, stops)
    if at then
      c.held = c.held:sub(1, at - 1)
      finish(c, "stop")
      if c.req and not c.engine_done then -- after the engine's callback returns
        local t = uv.new_timer()
        t:start(0, 0, function()
          t:close()
          if not c.engine_done then c.engine_done = true engine:cancel(c.req) end
        end)
      end
      return
    end
    local keep = stop_hold(c.held, stops)
    if keep < #c.held then
      spec.on_text(c, c.held:sub(1, #c.held - keep))
      c.held = c.held:sub(#c.held - keep + 1)
    end
  end

  m.prompt:inc(group.prompt_tokens)
  group.open = #group.choices
  self.live[group] = true
  if spec.start then spec.start(group) end
  for _, c in ipairs(group.choices) do
    if spec.max_tokens == 0 and not (spec.echo and spec.logprobs) then
      c.engine_done = true
      finish(c, "length")
    else
      c.dec = self.tok:decoder(c.prompt_ids[#c.prompt_ids])
      local r, err = engine:submit {
        prompt_ids = c.prompt_ids, max_tokens = spec.max_tokens, temperature = s.temperature, top_p = s.top_p,
        top_k = s.top_k, seed = s.seed and (s.seed + c.index) or nil, stop_ids = stop_ids, ignore_eos = s.ignore_eos,
        logprobs = spec.logprobs, echo = spec.echo and spec.logprobs ~= nil or nil,
        on_token = function(r, id, text, lp) on_token(c, r, id, text, lp) end,
        on_finish = function(r2, reason)
          c.engine_done = true
          c.prompt_logprobs, c.prompt_top = r2 and r2.prompt_logprobs, r2 and r2.prompt_top_logprobs
          if reason == "cancelled" and not c.finished then reason = "abort" end
          finish(c, reason)
        end,
      }
      if not r then
        -- the others already submitted go; this one is refused
        for _, o in ipairs(group.choices) do
          if o.req and not o.engine_done then o.engine_done = true engine:cancel(o.req) end
        end
        self.live[group] = nil
        api_error(400, tostring(err), spec.prompt_param)
      end
      c.req = r
    end
  end
  if group.open > 0 then
    res:on_close(function()
      m.cancelled:inc(1)
      for _, c in ipairs(group.choices) do
        c.finished = true
        if c.req and not c.engine_done then
          c.engine_done = true
          engine:cancel(c.req)
        end
      end
      self.live[group] = nil
    end)
  end
  return group
end

local function usage(group)
  return { prompt_tokens = group.prompt_tokens, completion_tokens = group.completion_tokens,
    total_tokens = group.prompt_tokens + group.completion_tokens }
end

function API:new_id(prefix)
  self.next_id = self.next_id + 1
  return string.format("%s-%x%06x", prefix, self.created, self.next_id)
end

-- SSE: one event a JSON chunk
local function sse(res, obj) return res:write("data: " .. encode(obj) .. "\n\n") end

local SSE_HEADERS = { ["Content-Type"] = "text/event-stream", ["Cache-Control"] = "no-cache" }

-- ------------------------------------------------------------------------------- /v1/completions

-- the logprobs object of a completion choice: tokens, token_logprobs, top_logprobs, text_offset
function API:completion_logprobs(c, echo, base, from)
  local tok = self.tok
  local lp = { tokens = {}, token_logprobs = {}, top_logprobs = {}, text_offset = {} }
  local off = base
  local function add(text, logprob, top)
    lp.tokens[#lp.tokens + 1] = token_text(text)
    lp.token_logprobs[#lp.token_logprobs + 1] = logprob == nil and null or logprob
    local t = null
    if top then
      t = {}
      for _, e in ipairs(top) do t[token_text(tok:piece(e.id))] = e.logprob end
      if next(t) == nil then t = null end
    end
    lp.top_logprobs[#lp.top_logprobs + 1] = t
    lp.text_offset[#lp.text_offset + 1] = off
    off = off + #text
  end
  if echo then
    local dec = tok:decoder()
    local plp, ptop = c.prompt_logprobs or {}, c.prompt_top or {}
    for i, id in ipairs(c.prompt_ids) do
      local e = plp[i]
      local text = dec:push(id)
      if type(e) == "number" then add(text, e, ptop[i] or {}) else add(text, nil, nil) end
    end
  end
  for i = from or 1, #c.ids do add(c.texts[i], c.lps[i], c.tops[i]) end
  for _, k in ipairs { "tokens", "token_logprobs", "top_logprobs", "text_offset" } do lp[k] = list(lp[k]) end
  return lp
end

function API:completions(body, req, res)
  local prompts = self:prompts(body)
  local s = self:sampling(body)
  local max_tokens = field(body, "max_tokens", { type = "int", min = 0, default = 16 })
  local logprobs = field(body, "logprobs", { type = "int", min = 0, max = 20 })
  local echo = field(body, "echo", { type = "boolean", default = false })
  field(body, "best_of", { type = "int", min = 1, max = 1 })
  field(body, "suffix", { type = "string", max = 0 })
  local id, created = self:new_id("cmpl"), os.time()
  local tok = self.tok
  local function prompt_text(c) return tok:decode(c.prompt_ids) end
  local stream = s.stream
  local function chunk(choices, extra)
    local o = { id = id, object = "text_completion", created = created, model = self.name, choices = list(choices) }
    for k, v in pairs(extra or {}) do o[k] = v end
    return o
  end
  local spec = { prompts = prompts, sampling = s, max_tokens = max_tokens, logprobs = logprobs, echo = echo,
    stop_ids = self.eos_ids, prompt_param = "prompt" }
  if stream then
    spec.on_text = function(c, text)
      if not c.sent_echo and echo then
        c.sent_echo = true
        text = prompt_text(c) .. text
      end
      if text == "" then return end
      local lp = null
      if logprobs then -- the tokens since the last chunk (offsets from the stream's start)
        lp = self:completion_logprobs(c, false, c.off or 0, (c.lp_sent or 0) + 1)
        c.lp_sent = #c.ids
        if #c.ids > 0 then c.off = lp.text_offset[#lp.text_offset] + #c.texts[#c.ids] end
      end
      sse(res, chunk { { index = c.index, text = text, logprobs = lp, finish_reason = null } })
    end
    spec.on_finish = function(c)
      if res:closed() then return end
      local text = ""
      if echo and not c.sent_echo then c.sent_echo, text = true, prompt_text(c) end
      local lp = null
      if logprobs and (echo and not c.lp_sent or #c.ids > (c.lp_sent or 0)) then
        lp = self:completion_logprobs(c, echo and not c.lp_sent, c.off or 0, (c.lp_sent or 0) + 1)
      end
      sse(res, chunk { { index = c.index, text = text, logprobs = lp, finish_reason = c.finish_reason } })
    end
    spec.on_all = function(group)
      if res:closed() then return end
      if s.include_usage then sse(res, chunk({}, { usage = usage(group) })) end
      res:write("data: [DONE]\n\n")
      res:finish()
    end
  else
    spec.on_text = function(c, text) c.parts[#c.parts + 1] = text end
    spec.on_finish = function() end
    spec.on_all = function(group)
      if res:closed() then return end
      local choices = {}
      for _, c in ipairs(group.choices) do
        local pre = echo and prompt_text(c) or ""
        choices[#choices + 1] = { index = c.index, text = pre .. table.concat(c.parts),
          logprobs = logprobs and self:completion_logprobs(c, echo, 0) or null, finish_reason = c.finish_reason }
      end
      res:json(200, chunk(choices, { usage = usage(group) }))
    end
  end
  -- a stream starts once the checks passed (a refused request gets its status), before any token
  if stream then spec.start = function() res:stream(200, SSE_HEADERS) end end
  self:run(spec, req, res)
end

-- ------------------------------------------------------------------------------- /v1/chat/completions

local ROLES = { "system", "user", "assistant", "developer", "tool" }

function API:chat_messages(body)
  local msgs = field(body, "messages", { type = "list", min = 1, required = true })
  local out = {}
  for i, mm in ipairs(msgs) do
    local where = string.format("messages[%d]", i - 1)
    if type(mm) ~= "table" then api_error(400, where .. " must be an object (got " .. V.show(mm) .. ")", "messages") end
    local role = mm.role
    local okr = false
    for _, r in ipairs(ROLES) do if role == r then okr = true end end
    if not okr then
      api_error(400, string.format("%s.role must be one of %s (got %s)", where, table.concat(ROLES, ", "), V.show(role)),
        "messages")
    end
    local content = mm.content
    if type(content) == "table" then -- a list of parts: text ones joined
      local parts = {}
      for k, p in ipairs(content) do
        if type(p) ~= "table" or p.type ~= "text" or type(p.text) ~= "string" then
          api_error(400, string.format("%s.content[%d] must be a text part ({\"type\": \"text\", \"text\": ...})", where, k - 1),
            "messages")
        end
        parts[#parts + 1] = p.text
      end
      content = table.concat(parts)
    elseif V.absent(content) and role == "assistant" then
      content = ""
    elseif type(content) ~= "string" then
      api_error(400, string.format("%s.content must be a string or a list of text parts (got %s)", where, V.show(content)),
        "messages")
    end
    if not V.utf8(content) then api_error(400, where .. ".content is not valid UTF-8", "messages") end
    out[#out + 1] = { role = role == "developer" and "system" or role, content = content }
  end
  return out
end

function API:chat(body, req, res)
  if not self.template then
    api_error(400, "this model has no chat template (" .. tostring(self.template_err):gsub(";.*", "")
      .. "); start the server with --template, or use /v1/completions", "messages")
  end
  local msgs = self:chat_messages(body)
  local s = self:sampling(body)
  local max_tokens = field(body, "max_completion_tokens", { type = "int", min = 0 })
  max_tokens = max_tokens or field(body, "max_tokens", { type = "int", min = 0 })
  local want_lp = field(body, "logprobs", { type = "boolean", default = false })
  local top = field(body, "top_logprobs", { type = "int", min = 0, max = 20 })
  if top and not want_lp then api_error(400, "field 'top_logprobs' needs logprobs: true", "top_logprobs") end
  local ok, text = pcall(self.template.format, msgs, true, self.special)
  if not ok or type(text) ~= "string" then api_error(400, "the chat template failed: " .. tostring(text), "messages") end
  local ids = self.tok:encode(text, false, true)
  if #ids == 0 then api_error(400, "the chat template rendered an empty prompt", "messages") end
  if not max_tokens then max_tokens = math.max(1, math.min(1024, self.max_seq - #ids)) end
  local id, created = self:new_id("chatcmpl"), os.time()
  local function chunk(choices, extra)
    local o = { id = id, object = s.stream and "chat.completion.chunk" or "chat.completion", created = created,
      model = self.name, choices = list(choices) }
    for k, v in pairs(extra or {}) do o[k] = v end
    return o
  end
  local tok = self.tok
  local function lp_content(c, from, to)
    local out = {}
    for i = from, to do
      local t = c.texts[i]
      local tops = {}
      for _, e in ipairs(c.tops[i] or {}) do
        if #tops >= (top or 0) then break end
        local p = tok:piece(e.id)
        tops[#tops + 1] = { token = token_text(p), logprob = e.logprob, bytes = bytes_of(p) }
      end
      out[#out + 1] = { token = token_text(t), logprob = c.lps[i], bytes = bytes_of(t), top_logprobs = list(tops) }
    end
    return { content = list(out) }
  end
  local spec = { prompts = { ids }, sampling = s, max_tokens = max_tokens, logprobs = want_lp and math.max(top or 0, 1) or nil,
    stop_ids = self.chat_stop_ids, prompt_param = "messages" }
  for _, st in ipairs(self.chat_stop_texts or {}) do s.stop[#s.stop + 1] = st end
  if s.stream then
    spec.on_text = function(c, text)
      if text == "" then return end
      local lp = null
      if want_lp then
        lp = lp_content(c, (c.lp_sent or 0) + 1, #c.ids)
        c.lp_sent = #c.ids
      end
      sse(res, chunk { { index = c.index, delta = { content = text }, logprobs = lp, finish_reason = null } })
    end
    spec.on_finish = function(c)
      if res:closed() then return end
      sse(res, chunk { { index = c.index, delta = setmetatable({}, nil), logprobs = null, finish_reason = c.finish_reason } })
    end
    spec.on_all = function(group)
      if res:closed() then return end
      if s.include_usage then sse(res, chunk({}, { usage = usage(group) })) end
      res:write("data: [DONE]\n\n")
      res:finish()
    end
  else
    spec.on_text = function(c, text) c.parts[#c.parts + 1] = text end
    spec.on_finish = function() end
    spec.on_all = function(group)
      if res:closed() then return end
      local choices = {}
      for _, c in ipairs(group.choices) do
        choices[#choices + 1] = { index = c.index, message = { role = "assistant", content = table.concat(c.parts) },
          logprobs = want_lp and lp_content(c, 1, #c.ids) or null, finish_reason = c.finish_reason }
      end
      res:json(200, chunk(choices, { usage = usage(group) }))
    end
  end
  if s.stream then
    spec.start = function(group)
      res:stream(200, SSE_HEADERS)
      for _, c in ipairs(group.choices) do -- the first chunk of each choice carries the role
        sse(res, chunk { { index = c.index, delta = { role = "assistant", content = "" }, logprobs = null, finish_reason = null } })
      end
    end
  end
  self:run(spec, req, res)
end

return M
