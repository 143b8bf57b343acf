-- ARC-Easy, mirroring lm-evaluation-harness task `arc_easy` (lm_eval/tasks/arc/arc_easy.yaml,
-- version 1.0): "Question: {{question}}\nAnswer:", the choices' texts after " ", acc and
-- acc_norm. Data: the llm-foundry copy (query "Question: ...", choices, gold), 2376 test items.
return {
  name = "arc_easy", harness = "arc_easy", version = 1.0,
  data = "arc_easy.jsonl", output_type = "multiple_choice",
  doc_to_text = function(doc) return doc.query .. "\nAnswer:" end,
  doc_to_choice = function(doc) return doc.choices end,
  doc_to_target = function(doc) return doc.gold end,
  check = require("moonshard.eval_check").choices,
  metrics = { "acc", "acc_norm" },
}
