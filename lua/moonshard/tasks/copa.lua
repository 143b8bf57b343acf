-- COPA, mirroring lm-evaluation-harness task `copa` (lm_eval/tasks/super_glue/copa/default.yaml,
-- version 1.0): the premise without its final period, then " because" / " therefore"; each
-- choice with its first letter lowercased after " "; acc. Data: the llm-foundry copy, whose
-- query is that context already and whose choices are lowercased (100 items).
return {
  name = "copa", harness = "copa", version = 1.0,
  data = "copa.jsonl", output_type = "multiple_choice",
  doc_to_text = function(doc) return doc.query end,
  doc_to_choice = function(doc)
    local out = {}
    for i, c in ipairs(doc.choices) do out[i] = c:sub(1, 1):lower() .. c:sub(2) end
    return out
  end,
  doc_to_target = function(doc) return doc.gold end,
  check = require("moonshard.eval_check").choices,
  metrics = { "acc" },
}
