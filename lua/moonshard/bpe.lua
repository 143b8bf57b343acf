-- moonshard.bpe: byte-level BPE tokenizers (GPT-2, Llama-3, Qwen2, SmolLM2 style) over the C
-- tokenizer (msh_bpe_*), which gives the ids Hugging Face `tokenizers` gives. Built from GGUF
-- metadata (tokenizer.ggml.model "gpt2") or from a Hugging Face tokenizer.json.
--
-- Interface (shared with moonshard.tokenizer): tok:encode(text, add_bos?, parse_special?) -> ids,
-- tok:piece(id) -> bytes, tok:decode(ids) -> text, tok:decoder(prev) -> streaming decoder,
-- tok:find(text) -> id of a special/added token; fields bos, eos, vocab_size, add_bos (whether
-- the model wants BOS in front of a prompt).
local core = require "moonshard.core"
local tokenizer = require "moonshard.tokenizer"

local ffi, C = core.ffi, core.C

local M = {}

-- Pre-tokenizer regexes (PCRE2, compiled with UTF and UCP), as the models' tokenizer.json files
-- configure them.
local GPT2 = [['s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+]]
local LLAMA3 = [[(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*]]
  .. [[|\s*[\r\n]+|\s+(?!\S)|\s+]]
local QWEN2 = [[(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*]]
  .. [[|\s*[\r\n]+|\s+(?!\S)|\s+]]

M.regex = { gpt2 = GPT2, llama3 = LLAMA3, qwen2 = QWEN2 }

-- Pre-tokenizers by their GGUF name (tokenizer.ggml.pre, as llama.cpp names them).
M.PRE = {
  smollm = { patterns = { [[\p{N}]], GPT2 } },   -- Digits(individual) then GPT-2's ByteLevel
  ["gpt-2"] = { patterns = { GPT2 } },
  ["llama-bpe"] = { patterns = { LLAMA3 }, ignore_merges = true },
  qwen2 = { patterns = { QWEN2 } },
}

-- A value from a file, shown in a message: its control bytes escaped so the message stays one
-- line, and cut after 80 bytes.
local function shown(v)
  local s = tostring(v):gsub("%c", function(c) return string.format("\\x%02x", c:byte()) end)
  if #s > 80 then s = s:sub(1, 80) .. "..." end
  return s
end

local function known_pre()
  local names = {}
  for k in pairs(M.PRE) do names[#names + 1] = k end
  table.sort(names)
  return table.concat(names, ", ")
end
M.known_pre = known_pre

-- Token kinds (moonshard.h MSH_BPE_*).
M.NORMAL, M.SPECIAL, M.ADDED, M.UNUSED = C.MSH_BPE_NORMAL, C.MSH_BPE_SPECIAL, C.MSH_BPE_ADDED, C.MSH_BPE_UNUSED

local Tokenizer = {}
Tokenizer.__index = Tokenizer

-- Packs a Lua array of strings into one char buffer and n + 1 offsets.
local function pack(strings)
  local n, total = #strings, 0
  for i = 1, n do total = total + #strings[i] end
  local text = ffi.new("char[?]", math.max(total, 1))
  local off = ffi.new("int64_t[?]", n + 1)
  local at = 0
  for i = 1, n do
    local s = strings[i]
    off[i - 1] = at
    ffi.copy(text + at, s, #s)
    at = at + #s
  end
  off[n] = at
  return text, off
end

-- M.new(spec) -> tokenizer | nil, message
--   spec.tokens: Lua array of token texts, id 0 first (normal tokens in GPT-2's byte-to-unicode
--     form, special and added tokens literally)
--   spec.kinds: Lua array of M.NORMAL / M.SPECIAL / M.ADDED / M.UNUSED (default all normal)
--   spec.merges: Lua array of "left right" strings, highest priority first
--   spec.patterns: pre-tokenizer regexes; spec.ignore_merges: boolean
--   spec.bos, spec.eos: ids (or nil); spec.add_bos: whether prompts start with BOS
--   spec.name: where it came from, for messages
function M.new(spec)
  local tokens, merges, patterns = spec.tokens, spec.merges or {}, spec.patterns or {}
  local n = #tokens
  if n == 0 then return nil, string.format("%s: empty vocabulary", spec.name or "tokenizer") end
  for _, k in ipairs { "bos", "eos" } do
    local id = spec[k]
    if id ~= nil and (type(id) ~= "number" or id < 0 or id >= n or id % 1 ~= 0) then
      return nil, string.format("%s: the %s token id %s is not in the vocabulary of %d tokens", spec.name or "tokenizer",
        k:upper(), shown(id), n)
    end
  end
  local text, off = pack(tokens)
  local kinds = ffi.new("uint8_t[?]", n)
  if spec.kinds then for i = 1, n do kinds[i - 1] = spec.kinds[i] or 0 end end
  local mtext, moff = pack(merges)
  local pats = ffi.new("const char*[?]", math.max(#patterns, 1))
  for i = 1, #patterns do pats[i - 1] = patterns[i] end -- anchored by `patterns` until the call returns
  local out = ffi.new("msh_bpe*[1]")
  local ok, msg = core.try(C.msh_bpe_new(out, n, text, off, kinds, #merges, mtext, moff, #patterns, pats,
    spec.ignore_merges and C.MSH_BPE_IGNORE_MERGES or 0))
  if not ok then
    -- the message quotes the pattern or token at fault: control bytes in it are escaped, so that it
    -- stays one line
    msg = msg:gsub("%c", function(c) return string.format("\\x%02x", c:byte()) end)
    return nil, (spec.name and spec.name .. ": " or "") .. msg
  end
  local self = setmetatable({
    h = ffi.gc(out[0], C.msh_bpe_free), name = spec.name,
    vocab_size = n, bos = spec.bos, eos = spec.eos, add_bos = spec.add_bos and true or false,
    strip_space_after_bos = false, pieces = {},
    ids = ffi.new("int32_t[?]", 256), cap = 256, n_out = ffi.new("int[1]"),
  }, Tokenizer)
  return self
end

-- tok:encode(text, add_bos?, parse_special?) -> Lua array of ids (from 0). Added tokens are always
-- recognized in text; special (control) tokens only with parse_special.
function Tokenizer:encode(text, add_bos, parse_special)
  if type(text) ~= "string" then error("encode: text must be a string", 2) end
  local flags = parse_special and C.MSH_BPE_PARSE_SPECIAL or 0
  local s = C.msh_bpe_encode(self.h, text, #text, flags, self.ids, self.cap, self.n_out)
  if s == C.MSH_ERANGE then
    self.cap = self.n_out[0] + 64
    self.ids = ffi.new("int32_t[?]", self.cap)
    s = C.msh_bpe_encode(self.h, text, #text, flags, self.ids, self.cap, self.n_out)
  end
  core.check(s, 2)
  local t, ids = {}, self.ids
  local k = 0
  if add_bos and self.bos then k = 1; t[1] = self.bos end
  for i = 0, self.n_out[0] - 1 do t[k + i + 1] = ids[i] end
  return t
end

local piece_ptr, piece_len = ffi.new("const char*[1]"), ffi.new("size_t[1]")

-- tok:piece(id) -> the bytes token id stands for (cached)
function Tokenizer:piece(id)
  local p = self.pieces[id]
  if p then return p end
  core.check(C.msh_bpe_piece(self.h, id, piece_ptr, piece_len), 2)
  p = ffi.string(piece_ptr[0], piece_len[0])
  self.pieces[id] = p
  return p
end

local found = ffi.new("int32_t[1]")

-- tok:find(text) -> id of the special or added token written text (else of the normal token
-- whose bytes are text), or nil
function Tokenizer:find(text)
  if C.msh_bpe_find(self.h, text, #text, found) ~= 0 then return nil end
  return found[0]
end

-- tok:kind(id) -> M.NORMAL / M.SPECIAL / M.ADDED / M.UNUSED, or nil out of range
function Tokenizer:kind(id)
  local k = C.msh_bpe_token_kind(self.h, id)
  return k >= 0 and k or nil
end

function Tokenizer:decode(ids) return tokenizer.decode(self, ids) end
function Tokenizer:decoder(prev) return tokenizer.decoder(self, prev) end

M.Tokenizer = Tokenizer

-- ------------------------------------------------------------------------------------ GGUF

-- GGUF token types (llama.cpp): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
local GGUF_KIND = { [1] = M.NORMAL, [2] = M.SPECIAL, [3] = M.SPECIAL, [4] = M.ADDED, [5] = M.UNUSED, [6] = M.NORMAL }

-- M.from_gguf(g) -> tokenizer | nil, message, for a handle from moonshard.loaders.gguf.open whose
-- tokenizer.ggml.model is "gpt2".
function M.from_gguf(g)
  local path = g.path
  local pre = g:get("tokenizer.ggml.pre")
  if pre == nil then pre = "gpt-2" end -- llama.cpp's default for files written before the key existed
  local cfg = M.PRE[pre]
  if not cfg then
    return nil, string.format("'%s': pre-tokenizer '%s' (tokenizer.ggml.pre) is not supported (known: %s)",
      path, shown(pre), known_pre())
  end
  local tokens, err = g:strings("tokenizer.ggml.tokens")
  if not tokens then return nil, err end
  local merges
  merges, err = g:strings("tokenizer.ggml.merges")
  if not merges then return nil, err end
  local kinds
  if g:get("tokenizer.ggml.token_type") then
    local types
    types, err = g:numbers("tokenizer.ggml.token_type")
    if not types then return nil, err end
    if #types ~= #tokens then
      return nil, string.format("'%s': tokenizer.ggml.token_type has %d entries for %d tokens", path, #types, #tokens)
    end
    kinds = {}
    for i = 1, #types do kinds[i] = GGUF_KIND[types[i]] or M.NORMAL end
  end
  local bos, eos = g:get("tokenizer.ggml.bos_token_id"), g:get("tokenizer.ggml.eos_token_id")
  local add_bos = g:get("tokenizer.ggml.add_bos_token")
  return M.new {
    name = "'" .. path .. "'", tokens = tokens, kinds = kinds, merges = merges,
    patterns = cfg.patterns, ignore_merges = cfg.ignore_merges,
    bos = type(bos) == "number" and bos or nil, eos = type(eos) == "number" and eos or nil,
    add_bos = add_bos == true,
  }
end

-- ------------------------------------------------------------------------------ tokenizer.json

-- The pre-tokenizer of a tokenizer.json as moonshard patterns, or nil, message.
--   ByteLevel(use_regex)                                   -> GPT-2's regex
--   Sequence[Digits(individual_digits), ByteLevel(use_regex)] -> \p{N} then GPT-2's (SmolLM2)
--   Sequence[Split(Regex r, Isolated), ByteLevel(use_regex=false)] -> r (Llama-3, Qwen2)
function M.patterns_from_json(pt, where)
  if type(pt) ~= "table" then return nil, where .. ": no pre_tokenizer (not a byte-level BPE tokenizer)" end
  local list = pt.type == "Sequence" and pt.pretokenizers or { pt }
  if type(list) ~= "table" then return nil, where .. ": pre_tokenizer Sequence without pretokenizers" end
  local patterns, byte_level = {}, false
  for i, p in ipairs(list) do
    if type(p) ~= "table" then return nil, where .. ": malformed pre_tokenizer" end
    if p.type == "ByteLevel" then
      if i ~= #list then return nil, where .. ": ByteLevel must be the last pre-tokenizer" end
      if p.add_prefix_space == true then
        return nil, where .. ": ByteLevel add_prefix_space is not supported"
      end
      if p.use_regex ~= false then patterns[#patterns + 1] = GPT2 end
      byte_level = true
    elseif p.type == "Digits" then
      patterns[#patterns + 1] = p.individual_digits and [[\p{N}]] or [[\p{N}+]]
    elseif p.type == "Split" then
      local pat = type(p.pattern) == "table" and p.pattern or {}
      local behavior = shown(p.behavior)
      if behavior ~= "Isolated" or p.invert == true then
        return nil, string.format("%s: Split pre-tokenizer with behavior %s%s is not supported (Isolated only)",
          where, behavior, p.invert and ", inverted" or "")
      end
      if type(pat.Regex) == "string" then
        patterns[#patterns + 1] = pat.Regex
      elseif type(pat.String) == "string" then
        patterns[#patterns + 1] = (pat.String:gsub("[%^%$%(%)%%%.%[%]%*%+%-%?\\|{}]", "\\%0"))
      else
        return nil, where .. ": Split pre-tokenizer without a pattern"
      end
    else
      return nil, string.format("%s: pre-tokenizer '%s' is not supported (a byte-level BPE needs ByteLevel,"
        .. " optionally after Split and Digits)", where, shown(p.type))
    end
  end
  if not byte_level then
    return nil, where .. ": the pre-tokenizer has no ByteLevel step (not a byte-level BPE tokenizer)"
  end
  return patterns
end

-- M.from_json(tj, opts?) -> tokenizer | nil, message, for a decoded tokenizer.json
--   opts.name (for messages), opts.bos, opts.eos (token texts or ids), opts.add_bos (default:
--   whether the post_processor adds a token in front)
function M.from_json(tj, opts)
  opts = opts or {}
  local where = opts.name or "tokenizer.json"
  local model = type(tj) == "table" and tj.model
  if type(model) ~= "table" then return nil, where .. ": no 'model' object" end
  local mtype = model.type or "BPE"
  if mtype ~= "BPE" then
    return nil, string.format("%s: tokenizer model type '%s' is not supported (supported: BPE)", where, shown(mtype))
  end
  if type(model.vocab) ~= "table" then return nil, where .. ": model.vocab is missing" end
  local patterns, perr = M.patterns_from_json(tj.pre_tokenizer, where)
  if not patterns then return nil, perr end
  local norm = tj.normalizer
  if type(norm) == "table" and norm.type ~= "NFC" then
    return nil, string.format("%s: normalizer '%s' is not supported", where, shown(norm.type))
  end
  local tokens, kinds, n = {}, {}, 0
  for text, id in pairs(model.vocab) do
    if type(text) ~= "string" then return nil, where .. ": model.vocab must map token texts to ids" end
    if type(id) ~= "number" or not (id >= 0 and id <= 16777216) or id % 1 ~= 0 then
      return nil, string.format("%s: vocabulary entry '%s' has a bad id", where, shown(text))
    end
    tokens[id + 1] = text
    kinds[id + 1] = M.NORMAL
    if id + 1 > n then n = id + 1 end
  end
  for _, a in ipairs(type(tj.added_tokens) == "table" and tj.added_tokens or {}) do
    if type(a) ~= "table" or type(a.id) ~= "number" or type(a.content) ~= "string" or not (a.id >= 0 and a.id <= 16777216)
      or a.id % 1 ~= 0 then
      return nil, where .. ": malformed added_tokens entry"
    end
    tokens[a.id + 1] = a.content
    kinds[a.id + 1] = a.special and M.SPECIAL or M.ADDED
    if a.id + 1 > n then n = a.id + 1 end
  end
  for i = 1, n do
    if tokens[i] == nil then tokens[i] = ""; kinds[i] = M.UNUSED end -- holes in the id space
  end
  local merges = {}
  for i, m in ipairs(type(model.merges) == "table" and model.merges or {}) do
    if type(m) == "string" then merges[i] = m
    elseif type(m) == "table" and type(m[1]) == "string" and type(m[2]) == "string" then merges[i] = m[1] .. " " .. m[2]
    else return nil, string.format("%s: merge %d is malformed", where, i) end
  end
  local add_bos = opts.add_bos
  if add_bos == nil then add_bos = M.post_processor_adds_bos(tj.post_processor) end
  local function id_of(v)
    if type(v) == "number" then return v end
    if type(v) ~= "string" then return nil end
    local id = model.vocab[v]
    if id then return id end
    for _, a in ipairs(type(tj.added_tokens) == "table" and tj.added_tokens or {}) do
      if a.content == v then return a.id end
    end
  end
  return M.new {
    name = where, tokens = tokens, kinds = kinds, merges = merges, patterns = patterns,
    ignore_merges = model.ignore_merges == true, bos = id_of(opts.bos), eos = id_of(opts.eos),
    add_bos = add_bos,
  }
end

-- Whether a tokenizer.json post_processor puts a special token in front of a single sequence
-- (TemplateProcessing, as Llama-3's adds <|begin_of_text|>), alone or inside a Sequence.
function M.post_processor_adds_bos(pp)
  if type(pp) ~= "table" then return false end
  if pp.type == "Sequence" and type(pp.processors) == "table" then
    for _, p in ipairs(pp.processors) do
      if M.post_processor_adds_bos(p) then return true end
    end
    return false
  end
  if pp.type == "TemplateProcessing" and type(pp.single) == "table" and type(pp.single[1]) == "table" then
    return pp.single[1].SpecialToken ~= nil
  end
  return false
end

return M
