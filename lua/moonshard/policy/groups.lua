-- moonshard.policy.groups: which ranks form the tensor-parallel, pipeline and data-parallel
-- groups. Megatron's order: tensor ranks vary fastest (adjacent ranks, so inside one node when
-- launchers number ranks node by node), then pipeline stages, then data-parallel replicas:
--
--   rank = dp_index * (pp * tp) + pp_index * tp + tp_index
--
-- A grid is a plain table:
--   { world = 8, sizes = { tp = 2, pp = 2, dp = 2 },
--     tp = { {0,1}, {2,3}, {4,5}, {6,7} },    -- each list in group-rank order
--     pp = { {0,2}, {1,3}, {4,6}, {5,7} },    -- in stage order
--     dp = { {0,4}, {1,5}, {2,6}, {3,7} },
--     coords = { [0] = { tp = 0, pp = 0, dp = 0 }, ... } }   -- 0-based positions
--
-- Users override the policy with a function(spec) -> grid (or nil, message) or with a table
-- holding at least tp, pp and dp lists; both are checked (every rank exactly once per kind,
-- groups of one kind of equal size) and get their sizes and coords filled in.
local M = {}

local function fits_err(tp, per)
  return string.format("tensor-parallel degree %d does not fit in nodes of %d ranks (tensor ranks must "
    .. "share a node; pass allow_cross_node to force it)", tp, per)
end

-- M.grid(spec) -> grid | nil, message
--   spec.world, spec.tp (1), spec.pp (1); spec.ranks_per_node (checked when given: tensor
--   groups must not cross nodes); spec.hosts (host name per rank, 1-based: checked the same way);
--   spec.allow_cross_node skips both checks.
function M.grid(spec)
  local world, tp, pp = spec.world, spec.tp or 1, spec.pp or 1
  for name, v in pairs { world = world, tp = tp, pp = pp } do
    if type(v) ~= "number" or v < 1 or v % 1 ~= 0 then
      return nil, string.format("%s must be a positive integer (got %s)", name, tostring(v))
    end
  end
  if world % (tp * pp) ~= 0 then
    return nil, string.format("a world of %d ranks does not split into tensor-parallel %d x pipeline %d "
      .. "(%d ranks per replica)", world, tp, pp, tp * pp)
  end
  local dp = world / (tp * pp)
  local per = spec.ranks_per_node
  if per and not spec.allow_cross_node and (tp > per or per % tp ~= 0) then return nil, fits_err(tp, per) end
  local g = { world = world, sizes = { tp = tp, pp = pp, dp = dp }, tp = {}, pp = {}, dp = {}, coords = {} }
  local function rank_of(d, p, t) return d * pp * tp + p * tp + t end
  for d = 0, dp - 1 do
    for p = 0, pp - 1 do
      local grp = {}
      for t = 0, tp - 1 do grp[#grp + 1] = rank_of(d, p, t) end
      g.tp[#g.tp + 1] = grp
    end
  end
  for d = 0, dp - 1 do
    for t = 0, tp - 1 do
      local grp = {}
      for p = 0, pp - 1 do grp[#grp + 1] = rank_of(d, p, t) end
      g.pp[#g.pp + 1] = grp
    end
  end
  for p = 0, pp - 1 do
    for t = 0, tp - 1 do
      local grp = {}
      for d = 0, dp - 1 do grp[#grp + 1] = rank_of(d, p, t) end
      g.dp[#g.dp + 1] = grp
    end
  end
  for r = 0, world - 1 do
    g.coords[r] = { dp = math.floor(r / (pp * tp)), pp = math.floor(r / tp) % pp, tp = r % tp }
  end
  if spec.hosts and not spec.allow_cross_node then
    local ok, err = M.check_hosts(g, spec.hosts)
    if not ok then return nil, err end
  end
  return g
end

-- Every tensor group on one host (hosts: host name per rank, 1-based).
function M.check_hosts(g, hosts)
  for _, grp in ipairs(g.tp) do
    local h = hosts[grp[1] + 1]
    for _, r in ipairs(grp) do
      if hosts[r + 1] ~= h then
        return nil, string.format("tensor-parallel group {%s} spans hosts %s and %s (tensor ranks must share a node)",
          table.concat(grp, ", "), tostring(h), tostring(hosts[r + 1]))
      end
    end
  end
  return true
end

-- M.find(groups, rank) -> index of the group holding rank (1-based), rank's position in it
-- (0-based); nil when no group holds it.
function M.find(groups, rank)
  for gi, grp in ipairs(groups or {}) do
    for pos, r in ipairs(grp) do
      if r == rank then return gi, pos - 1 end
    end
  end
  return nil
end

-- M.check(grid, world) -> a new grid (the same groups, sizes and coords filled in) | nil, message
function M.check(user, world)
  if type(user) ~= "table" then return nil, "groups: expected a table, got " .. type(user) end
  if (user.world or world) ~= world then
    return nil, string.format("groups: made for %s ranks, the world has %d", tostring(user.world), world)
  end
  local g = { world = world, tp = user.tp, pp = user.pp, dp = user.dp, sizes = {}, coords = {} }
  local want = user.sizes or {}
  for _, kind in ipairs { "tp", "pp", "dp" } do
    local groups = g[kind]
    if type(groups) ~= "table" or #groups == 0 then return nil, "groups: no '" .. kind .. "' groups" end
    local seen, size = {}, #groups[1]
    for _, grp in ipairs(groups) do
      if type(grp) ~= "table" or #grp ~= size then
        return nil, string.format("groups: '%s' groups differ in size", kind)
      end
      for pos, r in ipairs(grp) do
        if type(r) ~= "number" or r < 0 or r >= world or r % 1 ~= 0 then
          return nil, string.format("groups: '%s' names rank %s outside the world of %d", kind, tostring(r), world)
        end
        if seen[r] then return nil, string.format("groups: rank %d is in two '%s' groups", r, kind) end
        seen[r] = true
        g.coords[r] = g.coords[r] or {}
        g.coords[r][kind] = pos - 1
      end
    end
    for r = 0, world - 1 do
      if not seen[r] then return nil, string.format("groups: rank %d is in no '%s' group", r, kind) end
    end
    if want[kind] and want[kind] ~= size then
      return nil, string.format("groups: sizes.%s is %s but its groups hold %d ranks", kind, tostring(want[kind]), size)
    end
    g.sizes[kind] = size
  end
  if g.sizes.tp * g.sizes.pp * g.sizes.dp ~= world then
    return nil, string.format("groups: tp %d x pp %d x dp %d is not the world of %d", g.sizes.tp, g.sizes.pp,
      g.sizes.dp, world)
  end
  return g
end

-- M.resolve(override, spec) -> grid | nil, message: the default policy, or the user's.
function M.resolve(override, spec)
  if override == nil then return M.grid(spec) end
  local g, err
  if type(override) == "function" then
    g, err = override(spec)
    if not g then return nil, "groups policy: " .. tostring(err) end
  elseif type(override) == "table" then
    g = override
  else
    return nil, "groups: expected a table or a function, got " .. type(override)
  end
  return M.check(g, spec.world)
end

return M
