-- Policy without recompiling: sweep sampling temperatures and watch the story change.
-- usage: moonshard examples/sampling_sweep.lua [MODEL]
local moonshard = require "moonshard"
-- the default model beside the repository, wherever the example is run from
local root = require("moonshard.host").root
local m = assert(moonshard.load(arg[1] or (root .. "/../shared/data/models/stories260K")))
for _, t in ipairs { 0, 0.5, 1.0 } do
  local parts = {}
  local stats = assert(m:generate({ prompt = "Tom had a dog", max_tokens = 30, temperature = t, seed = 1 },
    function(s) parts[#parts + 1] = s end))
  print(string.format("T=%.1f (%d tokens): %s", t, stats.generated_tokens, table.concat(parts):gsub("\n", " ")))
end
