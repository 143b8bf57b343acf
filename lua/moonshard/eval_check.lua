-- moonshard.eval_check: record checks shared by the task files (a message names what is wrong;
-- moonshard.eval adds the file and line).
local M = {}

-- {query, choices, gold}: the multiple-choice records of the llm-foundry copies
function M.choices(doc)
  if type(doc.query) ~= "string" then return nil, "no query string" end
  if type(doc.choices) ~= "table" or #doc.choices < 2 then return nil, "choices must be a list of at least 2 strings" end
  for _, c in ipairs(doc.choices) do
    if type(c) ~= "string" then return nil, "choices must be strings" end
  end
  if type(doc.gold) ~= "number" or doc.gold < 0 or doc.gold >= #doc.choices or doc.gold % 1 ~= 0 then
    return nil, string.format("gold %s is not an index into the %d choices", tostring(doc.gold), #doc.choices)
  end
  return true
end

return M
