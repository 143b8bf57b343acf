-- GSM8K, mirroring lm-evaluation-harness task `gsm8k` (lm_eval/tasks/gsm8k/gsm8k.yaml, version
-- 3.0): "Question: {{question}}\nAnswer:", 5-shot by default (examples joined by "\n\n", each
-- with its full worked answer), greedy generation until "Question:", "</s>" or "<|im_end|>" (at
-- most 256 tokens); exact_match (case ignored; ",", "$", everything up to "#### " and a final "."
-- removed) under two filters: strict-match (the number after "#### ") and flexible-extract (the
-- last number in the text). The harness draws few-shot examples from the train split; only the
-- test split is here, so they come from it (never the question itself).
local function strict(text)
  return text:match("#### (%-?[%d%.,]+)")
end
local function flexible(text)
  local last
  for m in text:gmatch("%-?[%$%d%.,]+") do
    if m:match("%d") and (#m >= 2 or m:match("^%-?%d+$")) then last = m end
  end
  return last
end
return {
  name = "gsm8k", harness = "gsm8k", version = 3.0,
  data = "gsm8k_test.jsonl", output_type = "generate_until", num_fewshot = 5,
  doc_to_text = function(doc) return "Question: " .. doc.question .. "\nAnswer:" end,
  doc_to_target = function(doc) return doc.answer end,
  generation = { ["until"] = { "Question:", "</s>", "<|im_end|>" }, max_gen_toks = 256, do_sample = false, temperature = 0 },
  filters = { { name = "strict-match", fn = strict }, { name = "flexible-extract", fn = flexible } },
  check = function(doc)
    if type(doc.question) ~= "string" or type(doc.answer) ~= "string" then
      return nil, "a gsm8k record needs question and answer strings"
    end
    return true
  end,
  metrics = { "exact_match" },
}
