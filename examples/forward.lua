-- Load a model, run a forward pass, and read the logits: the ten lines from the README.
-- usage: moonshard examples/forward.lua [MODEL]
local moonshard = require "moonshard"
-- the default model beside the repository, wherever the example is run from
local root = require("moonshard.host").root
local m = assert(moonshard.load(arg[1] or (root .. "/../shared/data/models/stories260K")))
local ids = m.tokenizer:encode("Once upon a time", true)   -- with BOS
local logits = assert(m:forward(ids))                       -- (1, vocab) of the last token
local best = m:argmax(logits)
print(#ids .. " tokens in; most likely next piece: " .. m.tokenizer:piece(best))
local all = assert(m:forward(ids, 0, { all_logits = true })) -- (T, vocab), cache rewritten
print(all)                                                   -- tensor(5x512, f32, cpu)
