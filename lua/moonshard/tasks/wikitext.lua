-- WikiText-2, mirroring lm-evaluation-harness task `wikitext` (lm_eval/tasks/wikitext/
-- wikitext.yaml, version 2.0): rolling log-likelihood of each article (split at its " = Title = "
-- lines) after the harness's wikitext_detokenizer; word_perplexity, byte_perplexity and
-- bits_per_byte, with words and bytes counted on the article before detokenization.
local function detokenize(s)
  s = s:gsub("s '", "s'")
  s = s:gsub("/' (%d)/", "/'%1/")
  s = s:gsub(" @%-@ ", "-"):gsub(" @,@ ", ","):gsub(" @%.@ ", ".")
  s = s:gsub(" : ", ": "):gsub(" ; ", "; "):gsub(" %. ", ". "):gsub(" ! ", "! "):gsub(" %? ", "? "):gsub(" , ", ", ")
  s = s:gsub("%(%s*([^%)]-)%s*%)", "(%1)")
  s = s:gsub("%[%s*([^%]]-)%s*%]", "[%1]")
  s = s:gsub("{%s*([^}]-)%s*}", "{%1}")
  s = s:gsub('"%s*([^"]-)%s*"', '"%1"')
  s = s:gsub("'%s*([^']-)%s*'", "'%1'")
  s = s:gsub("= = = =", "===="):gsub("= = =", "==="):gsub("= =", "==")
  s = s:gsub(" \194\176 ", "\194\176")
  s = s:gsub(" \n", "\n"):gsub("\n ", "\n")
  s = s:gsub(" N ", " 1 "):gsub(" 's", "'s")
  return s
end
return {
  name = "wikitext", harness = "wikitext", version = 2.0,
  data = "wikitext2_raw_test.txt", format = "text", output_type = "loglikelihood_rolling",
  detokenize = detokenize,
  -- articles: a line " = Title = " (one "=" each side) starts one
  docs = function(text)
    local docs, cur = {}, nil
    for line in (text .. "\n"):gmatch("([^\n]*)\n") do
      if line:match("^ = [^=].* = $") then
        cur = { lines = {}, _line = #docs + 1 }
        docs[#docs + 1] = cur
      end
      if cur then cur.lines[#cur.lines + 1] = line end
    end
    for _, d in ipairs(docs) do d.page = table.concat(d.lines, "\n") .. "\n"; d.lines = nil end
    return docs
  end,
  doc_to_text = function() return "" end,
  doc_to_target = function(doc) return detokenize(doc.page) end,
  count = function(doc)
    local words = 1
    for _ in doc.page:gmatch("%s+") do words = words + 1 end
    return words, #doc.page
  end,
  metrics = { "word_perplexity", "byte_perplexity", "bits_per_byte" },
}
