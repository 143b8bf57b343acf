-- A scheduling policy: shortest prompt first. Waiting requests are admitted, and running ones
-- ranked (the last ranked is preempted first when KV blocks run out), by compare(a, b), which
-- says whether request a goes before request b.
--   moonshard serve --model M --policy examples/policy_shortest_first.lua
--   require("moonshard.engine").new(model, { policy = "examples/policy_shortest_first.lua" })
-- A request offers: id, arrival (a counter), prompt_len, tokens (prompt and generated so far),
-- num_computed, max_tokens, preemptions, and whatever its submitter set on it.
return {
  name = "shortest-prompt-first",
  compare = function(a, b)
    if a.prompt_len ~= b.prompt_len then return a.prompt_len < b.prompt_len end
    return a.arrival < b.arrival -- equal lengths: first come, first served
  end,
}
