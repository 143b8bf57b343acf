-- OpenBookQA, mirroring lm-evaluation-harness task `openbookqa` (lm_eval/tasks/openbookqa/
-- openbookqa.yaml, version 1.0): the question stem alone, the choices' texts after " ", acc and
-- acc_norm. Data: the llm-foundry copy (query = the stem; 500 test items).
return {
  name = "openbookqa", harness = "openbookqa", version = 1.0,
  data = "openbookqa.jsonl", output_type = "multiple_choice",
  doc_to_text = function(doc) return doc.query end,
  doc_to_choice = function(doc) return doc.choices end,
  doc_to_target = function(doc) return doc.gold end,
  check = require("moonshard.eval_check").choices,
  metrics = { "acc", "acc_norm" },
}
