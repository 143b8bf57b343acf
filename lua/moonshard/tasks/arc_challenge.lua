-- ARC-Challenge, mirroring lm-evaluation-harness task `arc_challenge` (lm_eval/tasks/arc/arc_challenge.yaml,
-- version 1.0): "Question: {{question}}\nAnswer:", the choices' texts after " ", acc and
-- acc_norm. Data: the llm-foundry copy (query "Question: ...", choices, gold), 1172 test items.
return {
  name = "arc_challenge", harness = "arc_challenge", version = 1.0,
  data = "arc_challenge.jsonl", output_type = "multiple_choice",
  doc_to_text = function(doc) return doc.query .. "\nAnswer:" end,
  doc_to_choice = function(doc) return doc.choices end,
  doc_to_target = function(doc) return doc.gold end,
  check = require("moonshard.eval_check").choices,
  metrics = { "acc", "acc_norm" },
}
