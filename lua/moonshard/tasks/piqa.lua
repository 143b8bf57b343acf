-- PIQA, mirroring lm-evaluation-harness task `piqa` (lm_eval/tasks/piqa/piqa.yaml, version 1.0):
-- "Question: {{goal}}\nAnswer:", choices sol1 / sol2 after " ", acc and acc_norm. Data: the
-- llm-foundry copy, whose query is already "Question: {{goal}}\n" (1838 validation items).
return {
  name = "piqa", harness = "piqa", version = 1.0,
  data = "piqa.jsonl", output_type = "multiple_choice",
  doc_to_text = function(doc) return doc.query .. "Answer:" end,
  doc_to_choice = function(doc) return doc.choices end,
  doc_to_target = function(doc) return doc.gold end,
  check = require("moonshard.eval_check").choices,
  metrics = { "acc", "acc_norm" },
}
