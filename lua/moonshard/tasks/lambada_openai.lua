-- LAMBADA (OpenAI's copy), mirroring lm-evaluation-harness task `lambada_openai`
-- (lm_eval/tasks/lambada/lambada_openai.yaml, version 1.0): the text up to its last space is the
-- context, " " .. the last word the target (target_delimiter ""); perplexity and acc (the whole
-- word the greedy continuation). 5153 test passages.
return {
  name = "lambada_openai", harness = "lambada_openai", version = 1.0,
  data = "lambada_openai.jsonl", output_type = "loglikelihood", target_delimiter = "",
  doc_to_text = function(doc) return (doc.text:match("^(.*) [^ ]*$")) or "" end,
  doc_to_target = function(doc) return " " .. (doc.text:match(" ([^ ]*)$") or doc.text) end,
  check = function(doc)
    if type(doc.text) ~= "string" then return nil, "a lambada record needs a text" end
    return true
  end,
  metrics = { "perplexity", "acc" },
}
