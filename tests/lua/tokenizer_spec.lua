local h = require "helpers"
local tokenizer = require "moonshard.tokenizer"

describe("SentencePiece-style tokenizer (tok512)", function()
  local tok = assert(tokenizer.load_sp(h.stories .. "/tok512.bin", 512))

  it("round-trips text, including characters that need byte fallback", function()
    for _, s in ipairs { "Once upon a time, Lily went to the park.", "naïve café 日本 🙂", "a\nb\tc" } do
      local ids = tok:encode(s, true)
      assert.are.equal(tok.bos, ids[1])
      assert.are.equal(s, tok:decode(ids))
    end
  end)

  -- true when s is a sequence of whole UTF-8 characters
  local function whole_utf8(s)
    local i = 1
    while i <= #s do
      local b = s:byte(i)
      local n = b < 0x80 and 1 or b >= 0xF0 and 4 or b >= 0xE0 and 3 or b >= 0xC0 and 2 or 0
      if n == 0 or i + n - 1 > #s then return false end
      for j = i + 1, i + n - 1 do
        local c = s:byte(j)
        if c < 0x80 or c > 0xBF then return false end
      end
      i = i + n
    end
    return true
  end

  it("streams whole UTF-8 characters only", function()
    local text = "日本 🙂 ok"
    local ids = tok:encode(text, true)
    assert.is_true(#ids > 8) -- byte fallback: several tokens per character
    local dec = tok:decoder(ids[1])
    local pieces = {}
    for i = 2, #ids do
      local s = dec:push(ids[i])
      assert.is_true(whole_utf8(s), string.format("piece %q is not whole UTF-8", s))
      pieces[#pieces + 1] = s
    end
    assert.are.equal("", dec:flush())
    assert.are.equal(text, table.concat(pieces))
  end)
end)
