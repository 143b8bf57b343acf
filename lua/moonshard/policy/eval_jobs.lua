-- moonshard.policy.eval_jobs: cuts an evaluation suite into jobs that run side by side, each job
-- one process (or one `moonshard launch` of tp*pp ranks) that loads the model once and runs its
-- tasks one after another. Used by `moonshard eval --jobs` and by sweeps with a task-list axis;
-- `--jobs-policy FILE.lua` replaces it with any file that returns a table with the same plan().
--
--   local jobs = require "moonshard.policy.eval_jobs"
--   local p = assert(jobs.plan(tasks, topo, { ranks = 2, device = "cpu", jobs = "auto" }))
--   p.jobs[1].tasks -> { "arc_easy", "piqa" }, p.jobs[1].threads -> 1, p.slots, p.reason
--
-- plan(tasks, topo, opts) -> { jobs = { job... }, slots = S, reason = "..." } | nil, message
--   tasks  { { name, cost } ... } in the order asked; cost: any positive work estimate (requests)
--   topo   moonshard.topology's table: nodes[1].cores, memory.available, gpus (memory_free,
--          memory, island, node), islands
--   opts   ranks       processes a job needs (tp * pp; default 1)
--          device      "cpu" (ranks are CPU processes) or "cuda" (one GPU a rank)
--          jobs        "auto" (as many as fit) or N (at most N)
--          need_bytes  memory one rank needs (device memory on a GPU, RAM on the CPU; default 0)
-- A job: { id (1-based), tasks = { names in the order asked }, cost, ranks, threads (CPU: threads
-- a rank), gpus (CUDA: the global GPU indices, tensor-parallel neighbours inside one island) }.
--
-- The policy: slots are what can run at once (GPUs with need_bytes free, grouped ranks at a time
-- inside one island, else one node; CPU cores split evenly, RAM permitting). The tasks go longest
-- first to the least loaded job (LPT), so jobs finish close together. Pure: plain tables in and out.
local M = {}

local function gib(b) return string.format("%.1f GiB", b / 2 ^ 30) end

-- GPU slots: lists of `ranks` free GPUs, filled island by island, then node by node.
local function gpu_slots(topo, ranks, need)
  local free, why = {}, {}
  for _, g in ipairs(topo.gpus or {}) do
    local avail = g.memory_free or g.memory or 0
    if avail >= need then free[#free + 1] = g else why[#why + 1] = g.index end
  end
  local slots, used = {}, {}
  local function take(list)
    local group = {}
    for _, g in ipairs(list) do
      if not used[g.index] then
        group[#group + 1] = g
        if #group == ranks then
          local s = {}
          for _, x in ipairs(group) do used[x.index] = true s[#s + 1] = x.index end
          slots[#slots + 1] = s
          group = {}
        end
      end
    end
  end
  -- inside islands first (tensor parallelism stays on one NVLink / PCIe-switch island)
  local by_island, islands = {}, {}
  for _, g in ipairs(free) do
    local k = g.island or -1
    if not by_island[k] then by_island[k] = {} islands[#islands + 1] = k end
    table.insert(by_island[k], g)
  end
  for _, k in ipairs(islands) do take(by_island[k]) end
  -- then whatever is left on one node
  local by_node, nodes = {}, {}
  for _, g in ipairs(free) do
    local k = g.node or 0
    if not by_node[k] then by_node[k] = {} nodes[#nodes + 1] = k end
    table.insert(by_node[k], g)
  end
  for _, k in ipairs(nodes) do take(by_node[k]) end
  return slots, #free, why
end

function M.plan(tasks, topo, opts)
  opts = opts or {}
  local ranks = opts.ranks or 1
  local need = opts.need_bytes or 0
  if type(tasks) ~= "table" or #tasks == 0 then return nil, "no tasks to plan" end
  if ranks < 1 or ranks % 1 ~= 0 then return nil, string.format("ranks must be a positive integer, got %s", tostring(ranks)) end
  local want = opts.jobs or "auto"
  if want ~= "auto" and (type(want) ~= "number" or want < 1 or want % 1 ~= 0) then
    return nil, string.format("jobs must be 'auto' or a positive integer, got '%s'", tostring(want))
  end
  for i, t in ipairs(tasks) do
    if type(t.name) ~= "string" or type(t.cost) ~= "number" or t.cost < 0 then
      return nil, string.format("task %d: needs a name and a cost >= 0", i)
    end
  end

  local slots, reason = {}, nil
  local cores = 1
  if opts.device == "cuda" then
    local gslots, nfree, busy = gpu_slots(topo, ranks, need)
    if #gslots == 0 then
      return nil, string.format("no %d free GPU%s for a job (%d GPU%s with %s free%s)", ranks, ranks == 1 and "" or "s",
        nfree, nfree == 1 and "" or "s", gib(need), #busy > 0 and ("; too full: " .. table.concat(busy, ",")) or "")
    end
    for _, s in ipairs(gslots) do slots[#slots + 1] = { gpus = s } end
    reason = string.format("%d slot%s of %d GPU%s (%d GPU%s with %s free)", #slots, #slots == 1 and "" or "s", ranks,
      ranks == 1 and "" or "s", nfree, nfree == 1 and "" or "s", gib(need))
  else
    cores = math.max(1, (topo.nodes and topo.nodes[1] and topo.nodes[1].cores) or 1)
    local n = math.max(1, math.floor(cores / ranks))
    local mem = topo.memory and topo.memory.available
    local by_mem
    if mem and need > 0 then
      by_mem = math.floor(mem / (need * ranks))
      if by_mem < 1 then
        return nil, string.format("a job of %d rank%s needs %s of RAM, %s available", ranks, ranks == 1 and "" or "s",
          gib(need * ranks), gib(mem))
      end
      n = math.min(n, by_mem)
    end
    for _ = 1, n do slots[#slots + 1] = {} end
    reason = string.format("%d slot%s of %d CPU rank%s on %d core%s%s", n, n == 1 and "" or "s", ranks,
      ranks == 1 and "" or "s", cores, cores == 1 and "" or "s", by_mem and by_mem < math.floor(cores / ranks)
      and string.format(" (RAM for %d)", by_mem) or "")
  end

  local n = math.min(#slots, #tasks)
  if want ~= "auto" then n = math.min(n, want) end
  local jobs = {}
  for j = 1, n do
    jobs[j] = { id = j, tasks = {}, cost = 0, ranks = ranks, gpus = slots[j].gpus, order = {} }
    if not slots[j].gpus then jobs[j].threads = math.max(1, math.floor(cores / (n * ranks))) end
  end
  -- longest first to the least loaded job; ties go to the lower id
  local order = {}
  for i, t in ipairs(tasks) do order[i] = { i = i, t = t } end
  table.sort(order, function(a, b)
    if a.t.cost ~= b.t.cost then return a.t.cost > b.t.cost end
    return a.i < b.i
  end)
  for _, o in ipairs(order) do
    local best = jobs[1]
    for j = 2, n do
      if jobs[j].cost < best.cost then best = jobs[j] end
    end
    best.cost = best.cost + o.t.cost
    best.order[#best.order + 1] = o.i
  end
  local out = {}
  for _, job in ipairs(jobs) do
    table.sort(job.order) -- a job runs its tasks in the order asked
    for _, i in ipairs(job.order) do job.tasks[#job.tasks + 1] = tasks[i].name end
    job.order = nil
    if #job.tasks > 0 then
      job.id = #out + 1
      out[#out + 1] = job
    end
  end
  return { jobs = out, slots = #slots, reason = reason }
end

return M
