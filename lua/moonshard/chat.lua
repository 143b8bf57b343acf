-- moonshard.chat: a multi-turn conversation with a chat model.
--
--   local s = assert(chat.new(model, { template = tmpl, temperature = 0 }))
--   local stats = s:ask("What is the capital of France?", io.write)
--   s:ask("And of Italy?", io.write)   -- the cache keeps the conversation so far
--
-- Each turn renders the whole conversation with the template and tokenizes it (special tokens
-- parsed, no BOS beyond what the template writes). The KV cache holds the tokens of the previous
-- turns; only the tokens after the longest common prefix are computed again, so a turn costs
-- the new message plus the template's few tokens around it. When the conversation outgrows the
-- context, the oldest exchanges are dropped (the system message stays) and the cache restarts.
local sampler_mod = require "moonshard.sampler"
local tensor = require "moonshard.tensor"
local chat_template = require "moonshard.chat_template"
local uv = require "luv"

local M = {}
local Session = {}
Session.__index = Session

-- M.new(model, opts) -> session | nil, message
--   model: from moonshard.load (with a tokenizer)
--   opts.template: a template (moonshard.chat_template); default: the model's own, recognized
--   opts.system: a system message (default: none, so the template's default applies)
--   opts.temperature (0.7), opts.top_k (0), opts.top_p (0.9), opts.seed (0), opts.max_tokens (512)
function M.new(model, opts)
  opts = opts or {}
  local tok = model.tokenizer
  if not tok then return nil, string.format("'%s': the model has no tokenizer", tostring(model.path)) end
  local tmpl = opts.template
  if not tmpl then
    local err
    tmpl, err = chat_template.resolve(nil, model.desc.chat_template)
    if not tmpl then return nil, err end
  end
  local self = setmetatable({ model = model, tok = tok, net = model.net, template = tmpl }, Session)
  -- the texts the template writes for BOS and EOS (SentencePiece pieces decode them to "")
  local function text_of(id, default)
    if not id then return default end
    local t = tok.special_text and tok.special_text[id] or tok:piece(id)
    return t ~= "" and t or default
  end
  self.tokens = { bos = text_of(tok.bos, "<s>"), eos = text_of(tok.eos, "</s>") }
  local extra = { tok.eos }
  for _, id in ipairs(model.desc.stop or {}) do extra[#extra + 1] = id end
  self.stop_ids, self.stop_texts = chat_template.stops(tmpl, tok, extra)
  self.sampler = sampler_mod.new {
    seed = opts.seed or 0, temperature = opts.temperature or 0.7, top_k = opts.top_k or 0, top_p = opts.top_p or 0.9,
  }
  self.max_tokens = opts.max_tokens or 512
  self.system = opts.system
  self.messages = {}
  self.cached = {} -- token ids whose keys and values are in the cache, in order
  self.host = self.net.device ~= "cpu" and assert(tensor.new({ 1, self.net.vocab_size }, "f32", "cpu"))
  return self
end

-- Forgets the conversation (the system message stays).
function Session:reset()
  self.messages = {}
end

-- Sets (text) or clears (nil) the system message; the conversation goes on.
function Session:set_system(text)
  self.system = text
end

-- The conversation as the template sees it.
function Session:conversation()
  local msgs = {}
  if self.system then msgs[1] = { role = "system", content = self.system } end
  for _, m in ipairs(self.messages) do msgs[#msgs + 1] = m end
  return msgs
end

-- The prompt of the conversation with the generation prompt, as token ids.
function Session:prompt_ids()
  local text = self.template.format(self:conversation(), true, self.tokens)
  if type(text) ~= "string" then error("the chat template returned " .. type(text) .. ", not a string", 0) end
  if text == "" then error("the chat template '" .. tostring(self.template.name) .. "' returned an empty prompt", 0) end
  return self.tok:encode(text, false, true), text
end

-- Longest common prefix of two id arrays.
local function common_prefix(a, b)
  local n = math.min(#a, #b)
  for i = 1, n do
    if a[i] ~= b[i] then return i - 1 end
  end
  return n
end

-- session:ask(text, on_text, opts?) -> stats | nil, message
--   on_text(s): receives the answer as it is produced (whole UTF-8 characters)
--   opts.interrupted(): checked between tokens; true ends the answer early (finish "interrupted")
--   opts.max_tokens: this answer's limit
-- The answer (even an interrupted one) joins the conversation.
function Session:ask(text, on_text, opts)
  opts = opts or {}
  local net, tok = self.net, self.tok
  self.messages[#self.messages + 1] = { role = "user", content = text }
  local max_tokens = opts.max_tokens or self.max_tokens
  local reserve = math.min(max_tokens, math.floor(net.max_seq / 4))
  local ok, ids = pcall(self.prompt_ids, self)
  if not ok then
    table.remove(self.messages)
    return nil, ids
  end
  -- drop the oldest exchanges until the prompt and some room for the answer fit
  while #ids + reserve > net.max_seq and #self.messages > 1 do
    table.remove(self.messages, 1)
    if self.messages[1] and self.messages[1].role == "assistant" then table.remove(self.messages, 1) end
    ids = self:prompt_ids()
  end
  if #ids >= net.max_seq then
    table.remove(self.messages)
    return nil, string.format("the message is %d tokens long with the template, more than the context of %d tokens allows",
      #ids, net.max_seq)
  end

  -- reuse the cache up to the first token that differs; at least one token must be computed
  local keep = math.min(common_prefix(self.cached, ids), #ids - 1)
  local new = {}
  for i = keep + 1, #ids do new[#new + 1] = ids[i] end
  local t0 = uv.hrtime()
  local logits, err = net:forward(new, keep)
  if not logits then
    table.remove(self.messages)
    self.cached = {}
    return nil, err
  end
  for i = #self.cached, #ids + 1, -1 do self.cached[i] = nil end
  for i = keep + 1, #ids do self.cached[i] = ids[i] end
  local t1 = uv.hrtime()

  local dec = tok:decoder(ids[#ids])
  local parts, generated, reason = {}, 0, "length"
  local stop_ids, stop_texts = self.stop_ids, self.stop_texts
  local held = "" -- text held back while it could be the start of a stop string
  local started, text_stopped = false, false
  local function emit(s)
    if not started then -- answers start at their first non-space character
      s = s:gsub("^%s+", "")
      if s == "" then return end
      started = true
    end
    parts[#parts + 1] = s
    on_text(s)
  end
  local function push_text(s)
    if #stop_texts == 0 then return emit(s) end
    held = held .. s
    for _, st in ipairs(stop_texts) do
      local at = held:find(st, 1, true)
      if at then
        emit(held:sub(1, at - 1))
        held = ""
        return true
      end
    end
    -- emit what can no longer begin a stop string
    local cut = #held
    for _, st in ipairs(stop_texts) do
      for k = math.min(#st - 1, #held), 1, -1 do
        if held:sub(-k) == st:sub(1, k) then cut = math.min(cut, #held - k) break end
      end
    end
    if cut > 0 then
      emit(held:sub(1, cut))
      held = held:sub(cut + 1)
    end
  end

  local interrupted = opts.interrupted
  local n_pieces = tok.vocab_size
  local failure
  while true do
    if interrupted and interrupted() then reason = "interrupted" break end
    if self.host then logits = self.host:copy_from(logits) end
    local ok, lerr = sampler_mod.check_logits(logits, net.pos - 1)
    if not ok then failure = lerr break end
    local id = self.sampler:sample(logits)
    if n_pieces and id >= n_pieces then
      failure = string.format("position %d: the model picked token id %d, which the tokenizer (%d pieces) does not "
        .. "have: the tokenizer is smaller than the model's vocabulary of %d", net.pos, id, n_pieces, net.vocab_size)
      break
    end
    if stop_ids[id] then reason = "stop" break end
    generated = generated + 1
    local s = dec:push(id)
    if s ~= "" and push_text(s) then reason, text_stopped = "stop", true break end
    if generated >= max_tokens then break end
    if net.pos >= net.max_seq then reason = "context" break end
    logits, err = net:forward(id, net.pos)
    if not logits then reason = "context" break end
    self.cached[#self.cached + 1] = id
  end
  if not text_stopped then
    local rest = dec:flush()
    if rest ~= "" then text_stopped = push_text(rest) end
    if not text_stopped and held ~= "" then emit(held) end
  end
  if failure then
    table.remove(self.messages)
    self.cached = {}
    return nil, failure
  end
  local t2 = uv.hrtime()
  local answer = table.concat(parts)
  self.messages[#self.messages + 1] = { role = "assistant", content = answer }
  local decode_s = (t2 - t1) / 1e9
  return {
    answer = answer, prompt_tokens = #ids, computed_prompt_tokens = #new, reused_tokens = keep,
    generated_tokens = generated, finish_reason = reason,
    prefill_s = (t1 - t0) / 1e9, decode_s = decode_s,
    prefill_tok_s = #new / math.max((t1 - t0) / 1e9, 1e-9),
    decode_tok_s = generated / math.max(decode_s, 1e-9),
  }
end

M.Session = Session
return M
