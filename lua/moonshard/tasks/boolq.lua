-- BoolQ, mirroring lm-evaluation-harness task `boolq` (lm_eval/tasks/super_glue/boolq/default.yaml,
-- version 2.0): "{{passage}}\nQuestion: {{question}}?\nAnswer:", choices "no" / "yes", acc. Data:
-- the llm-foundry copy (query "Passage: {{passage}}\nQuestion: {{question}}?"; 3270 validation).
return {
  name = "boolq", harness = "boolq", version = 2.0,
  data = "boolq.jsonl", output_type = "multiple_choice",
  doc_to_text = function(doc) return (doc.query:gsub("^Passage: ", "")) .. "\nAnswer:" end,
  doc_to_choice = function() return { "no", "yes" } end,
  doc_to_target = function(doc) return doc.gold end,
  check = require("moonshard.eval_check").choices,
  metrics = { "acc" },
}
