-- WinoGrande, mirroring lm-evaluation-harness task `winogrande` (lm_eval/tasks/winogrande/
-- default.yaml, version 1.0): partial scoring. Each option fills the blank to make a context
-- (the sentence up to the blank); the rest of the sentence, after " ", is scored after each; acc.
-- Data: the llm-foundry copy (context_options, continuation, gold; 1267 dev items).
return {
  name = "winogrande", harness = "winogrande", version = 1.0,
  data = "winogrande.jsonl", output_type = "multiple_choice", multiple_input = true,
  doc_to_text = function(doc) return doc.context_options[doc.gold + 1] end, -- the gold context (few-shot examples)
  doc_to_choice = function(doc) return doc.context_options end,
  doc_to_target = function(doc) return doc.continuation end,
  check = function(doc)
    if type(doc.context_options) ~= "table" or #doc.context_options ~= 2 or type(doc.continuation) ~= "string"
      or type(doc.gold) ~= "number" or doc.gold < 0 or doc.gold > 1 then
      return nil, "a winogrande record needs context_options (2 strings), continuation and gold (0 or 1)"
    end
    return true
  end,
  metrics = { "acc" },
}
