-- Batched forward passes against each sequence run alone: model:forward_batch of three different
-- prompts (one position for all, then a decode step at the tracked positions), and of prompts of
-- different lengths prefilled slot by slot and decoded together at per-sequence positions (one
-- and two tokens a step). Returns the largest |difference| over every compared logit and the
-- number of rows compared. m has opts.batch >= 3; single (m itself or another model) runs one
-- sequence through model:forward (slot 0). Every rank of a parallel run calls it alike.
local M = {}

local function row(values, b, V)
  local r = {}
  for i = 1, V do r[i] = values[(b - 1) * V + i] end
  return r
end

function M.run(m, single, V)
  local prompts = {
    { 1, 17, 42, 99, 7, 63 },
    { 1, 5, 5, 120, 33, 8 },
    { 1, 88, 2, 61, 19, 140 },
  }
  local lens = { 6, 3, 5 }
  local step1 = { 11, 77, 150 }
  local step2 = { { 9, 4 }, { 130, 66 }, { 25, 101 } }
  for _, p in ipairs(prompts) do for i, id in ipairs(p) do p[i] = id % V end end

  -- the references, one sequence at a time
  local same, same_next, diff_next, diff_two = {}, {}, {}, {}
  for b = 1, 3 do
    single:reset()
    same[b] = assert(single:forward(prompts[b], 0)):values()
    same_next[b] = assert(single:forward(step1[b] % V)):values()
    single:reset()
    assert(single:forward({ unpack(prompts[b], 1, lens[b]) }, 0))
    diff_next[b] = assert(single:forward(step1[b] % V)):values()
    diff_two[b] = assert(single:forward({ step2[b][1] % V, step2[b][2] % V })):values()
  end

  local worst, rows = 0, 0
  local function compare(got, want)
    local g = got:values()
    for b = 1, 3 do
      local r = row(g, b, V)
      for i = 1, V do worst = math.max(worst, math.abs(r[i] - want[b][i])) end
      rows = rows + 1
    end
  end

  m:reset()
  compare(assert(m:forward_batch(prompts, 0)), same)
  compare(assert(m:forward_batch({ { step1[1] % V }, { step1[2] % V }, { step1[3] % V } })), same_next)

  m:reset()
  for b = 1, 3 do assert(m:forward_batch({ { unpack(prompts[b], 1, lens[b]) } }, 0, b - 1)) end
  compare(assert(m:forward_batch({ { step1[1] % V }, { step1[2] % V }, { step1[3] % V } }, lens)), diff_next)
  local two = {}
  for b = 1, 3 do two[b] = { step2[b][1] % V, step2[b][2] % V } end
  compare(assert(m:forward_batch(two)), diff_two) -- positions tracked per slot: 7, 4, 6
  return worst, rows
end

return M
