-- moonshard.tokenizer: text <-> token ids, and a streaming decoder that emits only whole UTF-8
-- characters. Vocabularies: SentencePiece-style BPE in the llama2.c tokenizer.bin format.
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
  self.pieces = {}
  return self
end

-- tok:encode(text, add_bos?) -> Lua array of ids (from 0)
function Tokenizer:encode(text, add_bos)
  local cap = #text + 8
  local ids, n = ffi.new("int32_t[?]", cap), ffi.new("int[1]")
  local s = C.msh_tokenizer_encode(self.h, text, #text, add_bos and 1 or 0, ids, cap, n)
  if s == C.MSH_ERANGE then
    cap = n[0]
    ids = ffi.new("int32_t[?]", cap)
    s = C.msh_tokenizer_encode(self.h, text, #text, add_bos and 1 or 0, ids, cap, n)
  end
  core.check(s, 2)
  local t = {}
  for i = 0, n[0] - 1 do t[i + 1] = ids[i] end
  return t
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

-- tok:decode(ids) -> text
function Tokenizer:decode(ids)
  local dec = self:decoder()
  local parts = {}
  for i = 1, #ids do parts[#parts + 1] = dec:push(ids[i]) end
  parts[#parts + 1] = dec:flush()
  return table.concat(parts)
end

-- A streaming decoder: push(id) returns the text that is complete so far ("" while a UTF-8
-- character is still incomplete); flush() returns what is left.
local Decoder = {}
Decoder.__index = Decoder

function Tokenizer:decoder(prev)
  return setmetatable({ tok = self, prev = prev or self.bos, pending = "" }, Decoder)
end

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
