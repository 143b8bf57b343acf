-- moonshard.policy.pipeline: which layers each pipeline stage runs.
-- Balanced by cost: every layer costs its parameter count (or a measured time when given), the
-- last stage also pays for the output head when decode is what is balanced, and stages take
-- contiguous runs of layers so that the most loaded stage is as light as possible.
local M = {}

-- M.parse("0-12,13-25") -> { {1, 13}, {14, 26} } (1-based inclusive layer ranges) or nil, message
function M.parse(spec, n_layers)
  local ranges, expect = {}, 0
  for part in spec:gmatch("[^,]+") do
    local a, b = part:match("^%s*(%d+)%s*%-%s*(%d+)%s*$")
    if not a then a = part:match("^%s*(%d+)%s*$"); b = a end
    if not a then return nil, string.format("bad layer range '%s' (want A-B)", part) end
    a, b = tonumber(a), tonumber(b)
    if a ~= expect then
      return nil, string.format("layer ranges must cover 0..%d in order without gaps: '%s' starts at %d, expected %d",
        n_layers - 1, part, a, expect)
    end
    if b < a then return nil, string.format("empty layer range '%s'", part) end
    ranges[#ranges + 1] = { a + 1, b + 1 }
    expect = b + 1
  end
  if expect ~= n_layers then
    return nil, string.format("layer ranges cover %d of %d layers", expect, n_layers)
  end
  return ranges
end

-- M.balance(costs, pp, first_extra, last_extra) -> ranges: splits layers 1..#costs into pp
-- contiguous runs minimizing the largest run cost (first and last stage carry extra costs).
function M.balance(costs, pp, first_extra, last_extra)
  local n = #costs
  assert(pp >= 1 and pp <= n, "need 1 <= stages <= layers")
  first_extra, last_extra = first_extra or 0, last_extra or 0
  local prefix = { [0] = 0 }
  for i = 1, n do prefix[i] = prefix[i - 1] + costs[i] end
  local function cost(s, a, b) -- stage s (1-based) running layers a..b
    local c = prefix[b] - prefix[a - 1]
    if s == 1 then c = c + first_extra end
    if s == pp then c = c + last_extra end
    return c
  end
  -- best[s][i]: minimal max cost running layers 1..i on stages 1..s
  local best, cut = {}, {}
  for s = 1, pp do best[s], cut[s] = {}, {} end
  for i = 1, n do best[1][i] = cost(1, 1, i) end
  for s = 2, pp do
    for i = s, n do
      local b, at = math.huge, nil
      for j = s - 1, i - 1 do
        local v = math.max(best[s - 1][j], cost(s, j + 1, i))
        if v < b then b, at = v, j end
      end
      best[s][i], cut[s][i] = b, at
    end
  end
  local ranges, i = {}, n
  for s = pp, 2, -1 do
    local j = cut[s][i]
    ranges[s] = { j + 1, i }
    i = j
  end
  ranges[1] = { 1, i }
  return ranges
end

-- M.plan(desc, pp, opts?) -> ranges. opts.layers: "0-12,13-25" override; opts.costs: measured
-- per-layer times; opts.balance: "decode" (default: a decode step reads every weight, so the
-- output head costs its parameters on the last stage) or "prefill" (long prompts: the head runs
-- for one row a sequence, so only the layers count).
function M.plan(desc, pp, opts)
  opts = opts or {}
  if opts.layers then
    local r, err = M.parse(opts.layers, desc.n_layers)
    if not r then return nil, err end
    if #r ~= pp then return nil, string.format("%d layer ranges for %d pipeline stages", #r, pp) end
    return r
  end
  if pp > desc.n_layers then
    return nil, string.format("%d pipeline stages for %d layers", pp, desc.n_layers)
  end
  local D, F, hd = desc.dim, desc.hidden_dim, desc.head_dim or desc.dim / desc.n_heads
  local per_layer = D * hd * (2 * desc.n_heads + 2 * desc.n_kv_heads) + 3 * D * F
  local costs = opts.costs or {}
  if not opts.costs then for l = 1, desc.n_layers do costs[l] = per_layer end end
  local balance = opts.balance or "decode"
  if balance ~= "decode" and balance ~= "prefill" then
    return nil, string.format("unknown pipeline balance '%s' (decode or prefill)", tostring(balance))
  end
  local head = balance == "decode" and desc.vocab_size * D or 0
  return M.balance(costs, pp, 0, head)
end

return M
