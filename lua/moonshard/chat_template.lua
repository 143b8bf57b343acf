-- moonshard.chat_template: turns a conversation into the prompt text a chat model was trained on.
--
-- A model's own template is a Jinja string (GGUF tokenizer.chat_template, tokenizer_config.json
-- chat_template). moonshard does not run Jinja: it recognizes the known formats by their markers
-- and renders them in Lua, keeping the details that change answers (SmolLM2's and Qwen2's
-- default system prompt, Llama-3.1's date header):
--
--   chatml  <|im_start|>role\ncontent<|im_end|>\n        SmolLM2, Qwen2, ...
--   llama3  <|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>
--   llama2  <s>[INST] <<SYS>>\nsystem\n<</SYS>>\n\nuser [/INST] answer </s>
--   mistral <s>[INST] user [/INST]answer</s>
--   zephyr  <|user|>\ncontent</s>\n<|assistant|>\n   TinyLlama-Chat, Zephyr
--
-- A template is { name, format = function(messages, add_generation_prompt, tokens) -> string,
-- stop = { strings or ids that end an answer } }. messages: { { role = "system" | "user" |
-- "assistant", content = "..." }, ... }; tokens: { bos = "<s>", eos = "</s>" } (the model's texts).
-- Any other format: a Lua file (M.load_file) returning such a table, or just the function
-- (optionally followed by the stop list).
local M = {}

local function trim(s) return (s:gsub("^%s+", ""):gsub("%s+$", "")) end

-- ---------------------------------------------------------------------------------- formats

-- ChatML; default_system is put first when the conversation has no system message.
function M.chatml(default_system)
  return {
    name = "chatml", default_system = default_system, stop = { "<|im_end|>", "<|endoftext|>" },
    format = function(messages, add_generation_prompt)
      local out = {}
      if default_system and (not messages[1] or messages[1].role ~= "system") then
        out[1] = "<|im_start|>system\n" .. default_system .. "<|im_end|>\n"
      end
      for _, m in ipairs(messages) do
        out[#out + 1] = "<|im_start|>" .. m.role .. "\n" .. m.content .. "<|im_end|>\n"
      end
      if add_generation_prompt then out[#out + 1] = "<|im_start|>assistant\n" end
      return table.concat(out)
    end,
  }
end

-- Llama-3; with date (Llama-3.1 and later) every prompt opens with a system header giving the
-- knowledge cutoff and the date, as those templates do.
function M.llama3(date)
  return {
    name = "llama3", date = date, stop = { "<|eot_id|>", "<|end_of_text|>", "<|eom_id|>" },
    format = function(messages, add_generation_prompt, tokens)
      local out = { tokens and tokens.bos or "<|begin_of_text|>" }
      local first = 1
      if date then
        local system = ""
        if messages[1] and messages[1].role == "system" then system = trim(messages[1].content); first = 2 end
        out[#out + 1] = "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: "
          .. date .. "\n\n" .. system .. "<|eot_id|>"
      end
      for i = first, #messages do
        local m = messages[i]
        out[#out + 1] = "<|start_header_id|>" .. m.role .. "<|end_header_id|>\n\n" .. trim(m.content) .. "<|eot_id|>"
      end
      if add_generation_prompt then out[#out + 1] = "<|start_header_id|>assistant<|end_header_id|>\n\n" end
      return table.concat(out)
    end,
  }
end

-- Llama-2 chat: BOS [INST] per user turn, a <<SYS>> block in the first one, answers between
-- spaces and followed by EOS.
function M.llama2()
  return {
    name = "llama2", stop = { "</s>" },
    format = function(messages, _, tokens)
      local bos, eos = tokens and tokens.bos or "<s>", tokens and tokens.eos or "</s>"
      local system, first = nil, 1
      if messages[1] and messages[1].role == "system" then system, first = messages[1].content, 2 end
      local out = {}
      for i = first, #messages do
        local m = messages[i]
        local content = m.content
        if i == first and system then content = "<<SYS>>\n" .. system .. "\n<</SYS>>\n\n" .. content end
        if m.role == "user" then
          out[#out + 1] = bos .. "[INST] " .. trim(content) .. " [/INST]"
        elseif m.role == "assistant" then
          out[#out + 1] = " " .. trim(content) .. " " .. eos
        end
      end
      return table.concat(out)
    end,
  }
end

-- Mistral-Instruct: one BOS, [INST] around user turns, answers followed by EOS. Its template
-- has no system role: a system message goes in front of the first user message.
function M.mistral()
  return {
    name = "mistral", stop = { "</s>" },
    format = function(messages, _, tokens)
      local bos, eos = tokens and tokens.bos or "<s>", tokens and tokens.eos or "</s>"
      local system, first = nil, 1
      if messages[1] and messages[1].role == "system" then system, first = messages[1].content, 2 end
      local out = { bos }
      for i = first, #messages do
        local m = messages[i]
        local content = m.content
        if i == first and system then content = system .. "\n\n" .. content end
        if m.role == "user" then
          out[#out + 1] = "[INST] " .. content .. " [/INST]"
        elseif m.role == "assistant" then
          out[#out + 1] = content .. eos
        end
      end
      return table.concat(out)
    end,
  }
end

-- Zephyr (TinyLlama-Chat).
function M.zephyr()
  return {
    name = "zephyr", stop = { "</s>" },
    format = function(messages, add_generation_prompt, tokens)
      local eos = tokens and tokens.eos or "</s>"
      local out = {}
      for _, m in ipairs(messages) do out[#out + 1] = "<|" .. m.role .. "|>\n" .. m.content .. eos .. "\n" end
      if add_generation_prompt then out[#out + 1] = "<|assistant|>\n" end
      return table.concat(out)
    end,
  }
end

M.builtin = { chatml = M.chatml, llama3 = M.llama3, llama2 = M.llama2, mistral = M.mistral, zephyr = M.zephyr }

-- ------------------------------------------------------------------------------ recognition

-- Undoes Jinja string-literal escapes (\n, \', \", \\).
local function unescape(s)
  return (s:gsub("\\(.)", { n = "\n", t = "\t", ["'"] = "'", ['"'] = '"', ["\\"] = "\\" }))
end

-- The literal system prompt a ChatML template inserts when the conversation has none: the text
-- of a '<|im_start|>system\n...<|im_end|>' string literal, or nil.
local function chatml_default_system(t)
  local at = 1
  while true do
    local s, e = t:find("<|im_start|>system", at, true)
    if not s then return nil end
    local rest = t:sub(e + 1)
    local body = rest:match("^\n(.-)<|im_end|>") or rest:match("^\\n(.-)<|im_end|>")
    if body and body ~= "" and not body:find("[{}'\"+]") then return unescape(body) end
    at = e + 1
  end
end

-- M.detect(template_string) -> template | nil, message
function M.detect(t)
  if type(t) ~= "string" or t == "" then
    return nil, "the model has no chat template"
  end
  if t:find("<|im_start|>", 1, true) then return M.chatml(chatml_default_system(t)) end
  if t:find("<|start_header_id|>", 1, true) then
    local date = t:find("Cutting Knowledge Date", 1, true) and (t:match("date_string%s*=%s*[\"']([^\"']+)[\"']") or "26 Jul 2024")
    return M.llama3(date)
  end
  if t:find("[INST]", 1, true) then
    if t:find("<<SYS>>", 1, true) then return M.llama2() end
    return M.mistral()
  end
  if t:find("<|user|>", 1, true) and t:find("<|assistant|>", 1, true) then return M.zephyr() end
  return nil, "the model's chat template is not one moonshard knows (ChatML, Llama-2, Llama-3, Zephyr)"
end

-- M.load_file(path) -> template | nil, message. The file returns a template table, or a format
-- function (optionally followed by a list of stop strings or ids).
function M.load_file(path)
  local chunk, err = loadfile(path)
  if not chunk then return nil, err end
  local ok, v, stop = pcall(chunk)
  if not ok then return nil, string.format("'%s': %s", path, tostring(v)) end
  if type(v) == "function" then v = { format = v, stop = stop } end
  if type(v) ~= "table" or type(v.format) ~= "function" then
    return nil, string.format("'%s' must return a function(messages, add_generation_prompt, tokens) -> string"
      .. " or a table { format = function, stop = { ... } }", path)
  end
  if v.stop ~= nil and type(v.stop) ~= "table" then
    return nil, string.format("'%s': stop must be a list of strings or token ids", path)
  end
  v.name = v.name or path
  v.stop = v.stop or {}
  return v
end

-- M.resolve(spec, model_template) -> template | nil, message
--   spec: nil (recognize the model's own template), a builtin name ("chatml", "llama3", ...) or
--   the path of a Lua file.
function M.resolve(spec, model_template)
  if spec then
    if M.builtin[spec] then return M.builtin[spec]() end
    if spec:match("%.lua$") then return M.load_file(spec) end
    local names = {}
    for k in pairs(M.builtin) do names[#names + 1] = k end
    table.sort(names)
    return nil, string.format("--template '%s': not a Lua file (.lua) or a known format (%s)", spec,
      table.concat(names, ", "))
  end
  local t, err = M.detect(model_template)
  if t then return t end
  return nil, err .. "; give one with --template FILE.lua (a Lua file returning"
    .. " function(messages, add_generation_prompt) -> string, and the stop strings) or --template chatml|llama2|llama3|mistral|zephyr"
end

-- M.stops(template, tokenizer, extra) -> ids, texts: the set { [id] = true } of tokens that end
-- an answer (the template's numeric stops, its stop strings that are one token, the ids in
-- extra) and the list of stop strings that are not one token (matched on the text).
function M.stops(template, tok, extra)
  local ids, texts = {}, {}
  for _, s in ipairs(template.stop or {}) do
    if type(s) == "number" then
      ids[s] = true
    elseif type(s) == "string" and s ~= "" then
      local id = tok.find and tok:find(s)
      if id then ids[id] = true else texts[#texts + 1] = s end
    end
  end
  for _, id in ipairs(extra or {}) do ids[id] = true end
  return ids, texts
end

return M
