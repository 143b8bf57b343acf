-- moonshard.tokenizer: text <-> token ids, and a streaming decoder that emits only whole UTF-8
-- characters. Vocabularies: SentencePiece-style BPE in the llama2.c tokenizer.bin format, or
-- given as pieces and scores (GGUF "llama" vocabularies, tokenizer.json Metaspace models).
-- Byte-level BPE vocabularies (GPT-2, Llama-3, Qwen2, SmolLM2) live in moonshard.bpe and share
-- the interface: encode(text, add_bos, parse_special), piece(id), decode(ids), decoder(prev),
-- bos, eos, vocab_size, add_bos.
local core = require "moonshard.core"

local ffi, C = core.ffi, core.C

local M = {}
local Tokenizer = {}
Tokenizer.__index = Tokenizer

-- M.load_sp(path, vocab_size) -> tokenizer | nil, message
function M.load_sp(path, vocab_size)
  local out = ffi.new("msh_tokenizer*[1]")
  local ok, msg = core.try(C.msh_tokenizer_load_sp(out, path, vocab_size))
  if not ok then return nil, msg end
  local self = setmetatable({ h = ffi.gc(out[0], C.msh_tokenizer_free), path = path }, Tokenizer)
  self.vocab_size = C.msh_tokenizer_vocab_size(self.h)
  self.bos = C.msh_tokenizer_bos(self.h)
  self.eos = C.msh_tokenizer_eos(self.h)
  self.strip_space_after_bos = true
  self.add_bos = true
  self.pieces = {}
  return self
end

-- M.from_pieces(pieces, scores, opts?) -> tokenizer | nil, message
--   pieces: Lua array of token texts (id 0 first) in SentencePiece form ("\xe2\x96\x81" for a
--   space, "<0xNN>" byte fallbacks); scores: their merge scores (higher merges first).
--   opts.special: ids of control tokens found in text by encode(text, add_bos, true);
--   opts.add_bos (default true): whether the model wants BOS in front of a prompt.
-- Ids 0, 1, 2 are <unk>, <s>, </s> as in every Llama vocabulary. The C tokenizer reads the
-- llama2.c tokenizer.bin format, so the vocabulary goes through a temporary file.
function M.from_pieces(pieces, scores, opts)
  opts = opts or {}
  local n = #pieces
  if n < 3 or #scores ~= n then
    return nil, string.format("a SentencePiece vocabulary needs at least 3 pieces and one score each (got %d, %d)",
      n, #scores)
  end
  local parts, max_len = {}, 1
  local f32, i32 = ffi.new("float[1]"), ffi.new("int32_t[1]")
  for i = 1, n do
    local p = pieces[i]:gsub("\226\150\129", " ") -- U+2581 LOWER ONE EIGHTH BLOCK
    if #p > max_len then max_len = #p end
    f32[0] = scores[i]
    i32[0] = #p
    parts[i] = ffi.string(f32, 4) .. ffi.string(i32, 4) .. p
  end
  i32[0] = max_len
  local path = os.tmpname()
  local fh, ferr = io.open(path, "wb")
  if not fh then return nil, "cannot write a temporary vocabulary: " .. tostring(ferr) end
  fh:write(ffi.string(i32, 4), table.concat(parts))
  fh:close()
  local tok, err = M.load_sp(path, n)
  os.remove(path)
  if not tok then return nil, err end
  tok.path = opts.path
  if opts.add_bos ~= nil then tok.add_bos = opts.add_bos end
  if opts.bos then tok.bos = opts.bos end
  if opts.eos then tok.eos = opts.eos end
  tok.specials = {}
  for _, id in ipairs(opts.special or {}) do
    local p = pieces[id + 1]
    if p and p ~= "" then tok.specials[#tok.specials + 1] = { text = p, id = id } end
  end
  table.sort(tok.specials, function(a, b) return #a.text > #b.text end) -- longest first
  tok.special_text = {}
  for _, s in ipairs(tok.specials) do tok.special_text[s.id] = s.text end
  return tok
end

local function encode_plain(self, text, add_bos)
  local cap = #text + 8
  local ids, n = ffi.new("int32_t[?]", cap), ffi.new("int[1]")
  local s = C.msh_tokenizer_encode(self.h, text, #text, add_bos and 1 or 0, ids, cap, n)
  if s == C.MSH_ERANGE then
    cap = n[0]
    ids = ffi.new("int32_t[?]", cap)
    s = C.msh_tokenizer_encode(self.h, text, #text, add_bos and 1 or 0, ids, cap, n)
  end
  core.check(s, 3)
  local t = {}
  for i = 0, n[0] - 1 do t[i + 1] = ids[i] end
  return t
end

-- tok:encode(text, add_bos?, parse_special?) -> Lua array of ids (from 0). With parse_special,
-- control tokens written in the text ("<s>", "</s>", ...) become their ids and the text between
-- them is encoded piece by piece (each with SentencePiece's leading space).
function Tokenizer:encode(text, add_bos, parse_special)
  if not parse_special or not self.specials or #self.specials == 0 then
    return encode_plain(self, text, add_bos)
  end
  local out = add_bos and { self.bos } or {}
  local at = 1
  while at <= #text do
    local best, best_at
    for _, s in ipairs(self.specials) do
      local i = text:find(s.text, at, true)
      if i and (not best_at or i < best_at) then best, best_at = s, i end
    end
    local stop = best_at and best_at - 1 or #text
    if stop >= at then
      for _, id in ipairs(encode_plain(self, text:sub(at, stop), false)) do out[#out + 1] = id end
    end
    if not best then break end
    out[#out + 1] = best.id
    at = best_at + #best.text
  end
  return out
end

-- tok:find(text) -> the id of a control token written exactly as text, or nil
function Tokenizer:find(text)
  for _, s in ipairs(self.specials or {}) do
    if s.text == text then return s.id end
  end
  if text == "<s>" then return self.bos end
  if text == "</s>" then return self.eos end
  return nil
end

local piece_ptr, piece_len = ffi.new("const char*[1]"), ffi.new("size_t[1]")

-- tok:piece(id) -> the bytes token id stands for (cached)
function Tokenizer:piece(id)
  local p = self.pieces[id]
  if p then return p end
  core.check(C.msh_tokenizer_piece(self.h, id, piece_ptr, piece_len), 2)
  p = ffi.string(piece_ptr[0], piece_len[0])
  self.pieces[id] = p
  return p
end

-- M.decode(tok, ids) -> text, for any tokenizer with a decoder
function M.decode(tok, ids)
  local dec = tok:decoder()
  local parts = {}
  for i = 1, #ids do parts[#parts + 1] = dec:push(ids[i]) end
  parts[#parts + 1] = dec:flush()
  return table.concat(parts)
end

-- tok:decode(ids) -> text
function Tokenizer:decode(ids) return M.decode(self, ids) end

-- A streaming decoder: push(id) returns the text that is complete so far ("" while a UTF-8
-- character is still incomplete); flush() returns what is left.
local Decoder = {}
Decoder.__index = Decoder

-- M.decoder(tok, prev?) -> a streaming decoder over any tokenizer with piece(id) and bos
function M.decoder(tok, prev)
  return setmetatable({ tok = tok, prev = prev or tok.bos, pending = "" }, Decoder)
end

function Tokenizer:decoder(prev) return M.decoder(self, prev) end

-- Length of the longest prefix of s that ends on a UTF-8 character boundary.
local function complete_prefix(s)
  local n = #s
  local i = n
  -- walk back over at most 3 continuation bytes to the lead byte of the last character
  while i > 0 and i > n - 4 do
    local b = s:byte(i)
    if b < 0x80 then return n end -- ASCII: complete
    if b >= 0xC0 then
      local need = b >= 0xF0 and 4 or b >= 0xE0 and 3 or 2
      return (n - i + 1 >= need) and n or i - 1
    end
    i = i - 1
  end
  return n -- stray continuation bytes: pass through
end

function Decoder:push(id)
  local tok = self.tok
  local p = tok:piece(id)
  if tok.strip_space_after_bos and self.prev == tok.bos and p:byte(1) == 32 then p = p:sub(2) end
  self.prev = id
  local s = self.pending .. p
  local k = complete_prefix(s)
  self.pending = s:sub(k + 1)
  return s:sub(1, k)
end

function Decoder:flush()
  local s = self.pending
  self.pending = ""
  return s
end

return M
