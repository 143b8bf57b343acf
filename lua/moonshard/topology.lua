-- moonshard.topology: the machine as a plain table, the planner's input (moonshard.plan).
--
--   local topo = assert(require("moonshard.topology").discover())
--   topo.nodes[1].cores, topo.gpus[1].numa, topo.islands[1].kind, topo.memlock.soft
--
-- discover(opts):
--   opts.topology   an hwloc XML file standing in for this machine (default: $HWLOC_XMLFILE, else
--                   this machine), or a cluster file (.json: { "nodes": [ { "xml": "a.xml",
--                   "gpus": "a.gpus.json" }, ... ] }, paths relative to it)
--   opts.gpus       a fake GPU table (a path or a table, NVML's shape: { driver, cuda_driver,
--                   gpus = { { busid, name, memory, ... nvlink_peers } } }); default
--                   $MSH_FAKE_GPUS, else FILE.gpus.json beside an XML FILE.xml, else NVML (only for
--                   this machine: an XML file is another machine)
--   opts.nodes      K: the node repeated K times (a homogeneous cluster)
-- -> {
--   nodes   = { { hostname, packages, cores, pus, memory, cpu_model, gpus = { indices } } },
--   numa    = { { node, os_index, memory, cores, cpus, package, hugepages } },
--   gpus    = { { index (0-based, global), node, local_index, busid, numa, name, memory,
--                 memory_free, power_limit_w, sm_clock_mhz, sm_clock_max_mhz, pcie_gen,
--                 pcie_width, host_gbs, nvlinks, nvlink_peers, root, island } },
--   islands = { { kind = "nvlink" | "pcie-switch" | "single", node, gpus = { indices }, gbs } },
--   memory  = { total, available }, memlock = { soft, hard } (math.huge: unlimited),
--   nvml    = { status, driver, cuda_driver, common_ancestor, p2p_read }, source }
-- or nil, message. Islands: GPUs joined by NVLink (directly or through NVSwitches), else GPUs
-- under one PCIe switch (the same root port), else one GPU alone; tensor parallelism stays inside one.
local cjson = require "cjson.safe"

local M = {}

local function read_json(path)
  local f, err = io.open(path, "rb")
  if not f then return nil, string.format("cannot read '%s': %s", path, err) end
  local text = f:read("*a")
  f:close()
  local v, jerr = cjson.decode(text)
  if type(v) ~= "table" then return nil, string.format("'%s' is not valid JSON: %s", path, tostring(jerr)) end
  return v
end
M.read_json = read_json

local function exists(path)
  local f = io.open(path, "rb")
  if f then f:close() return true end
  return false
end

local function dirname(p) return p:match("^(.*)/[^/]*$") or "." end

-- PCIe bytes per second per lane and generation (after encoding), and the share of it a pinned
-- copy reaches (PERFORMANCE.md: 55.0 of 63.0 GB/s on Gen5 x16)
M.PCIE_LANE_GBS = { [1] = 0.25, [2] = 0.5, [3] = 0.985, [4] = 1.969, [5] = 3.938, [6] = 7.563 }
M.PCIE_EFFICIENCY = 0.87
-- one NVLink link's GB/s per direction by compute capability (NVLink 3: 25, NVLink 4: 25 x 18 links)
M.NVLINK_LINK_GBS = 25

-- The raw JSON of the C core for an XML file (nil: this machine).
function M.raw(xml, no_nvml)
  local core = require "moonshard.core"
  local ffi, C = core.ffi, core.C
  local out = ffi.new("msh_topology*[1]")
  local ok, msg = core.try(C.msh_topology_load(out, xml, no_nvml and C.MSH_TOPOLOGY_NO_NVML or 0))
  if not ok then return nil, msg end
  local text = ffi.string(C.msh_topology_json(out[0], nil))
  C.msh_topology_free(out[0])
  local v, err = cjson.decode(text)
  if not v then return nil, "topology JSON: " .. tostring(err) end
  return v
end

local function meminfo()
  local f = io.open("/proc/meminfo", "r")
  if not f then return {} end
  local t = {}
  for line in f:lines() do
    local k, v, unit = line:match("^(%S+):%s+(%d+)%s*(%a*)")
    if k then t[k] = tonumber(v) * (unit == "kB" and 1024 or 1) end
  end
  f:close()
  return t
end
M.meminfo = meminfo

-- union-find over 1..n
local function groups(n)
  local parent = {}
  for i = 1, n do parent[i] = i end
  local function find(i)
    while parent[i] ~= i do parent[i] = parent[parent[i]]; i = parent[i] end
    return i
  end
  return find, function(a, b) parent[find(a)] = find(b) end
end

-- One node's table from the core's JSON and a GPU table (NVML's or a fake one).
local function build_node(raw, gputab, this_machine)
  local m = raw.machine or {}
  local node = { hostname = m.hostname or "?", packages = m.packages or 1, cores = m.cores or 1, pus = m.pus or 1,
    memory = m.memory or 0, cpu_model = m.cpu_model, source = m.source, numa = {}, gpus = {}, islands = {} }
  for _, n in ipairs(raw.numa or {}) do
    local huge = 0
    for _, pt in ipairs(n.page_types or {}) do
      if pt.size > 4096 then huge = huge + pt.size * pt.count end
    end
    node.numa[#node.numa + 1] = { os_index = n.os_index, memory = n.memory, cores = n.cores, cpus = n.cpus,
      package = n.package, hugepages = huge }
  end
  -- GPUs: the PCI tree's, with NVML's (or the fake table's) facts by bus id
  local facts, order = {}, {}
  for _, g in ipairs(gputab and gputab.gpus or {}) do
    if g.busid then facts[g.busid:lower()] = g; order[#order + 1] = g.busid:lower() end
  end
  local pci = {}
  for _, g in ipairs(raw.pci_gpus or {}) do pci[g.busid] = g end
  local ids = {}
  for _, id in ipairs(order) do ids[#ids + 1] = id end
  if #ids == 0 then for id in pairs(pci) do ids[#ids + 1] = id end end
  table.sort(ids)
  for i, id in ipairs(ids) do
    local f, p = facts[id] or {}, pci[id] or {}
    local g = {}
    for k, v in pairs(f) do g[k] = v end
    g.busid, g.local_index = id, i - 1
    g.numa = p.numa ~= nil and p.numa or f.numa or -1
    if g.numa == -1 and #node.numa == 1 then g.numa = node.numa[1].os_index end
    -- the root port above it (the topmost PCI-to-PCI bridge): GPUs sharing one share its uplink
    local br = p.bridges or {}
    local root
    for _, b in ipairs(br) do if not b:match("^host:") then root = b end end
    g.root = f.root or root or ("alone:" .. id)
    g.nvlink_peers = f.nvlink_peers or {}
    g.nvlinks = #g.nvlink_peers
    local gen, width = f.pcie_gen or f.pcie_gen_max, f.pcie_width or f.pcie_width_max
    if gen and width and M.PCIE_LANE_GBS[gen] then
      g.host_gbs = M.PCIE_LANE_GBS[gen] * width * M.PCIE_EFFICIENCY
    elseif p.link_gbs and p.link_gbs > 0 then
      g.host_gbs = p.link_gbs * M.PCIE_EFFICIENCY
    end
    g.name = g.name or "NVIDIA GPU"
    node.gpus[i] = g
  end
  -- islands
  local n = #node.gpus
  local find, union = groups(n)
  local byid, nvl = {}, {}
  for i, g in ipairs(node.gpus) do byid[g.busid] = i end
  local switch_first
  for i, g in ipairs(node.gpus) do
    for _, peer in ipairs(g.nvlink_peers) do
      if peer == "nvswitch" then
        nvl[i] = true
        if switch_first then union(i, switch_first) else switch_first = i end
      elseif byid[peer:lower()] then
        nvl[i], nvl[byid[peer:lower()]] = true, true
        union(i, byid[peer:lower()])
      end
    end
  end
  for i = 1, n do
    for j = i + 1, n do
      if not nvl[i] and not nvl[j] and node.gpus[i].root == node.gpus[j].root then union(i, j) end
    end
  end
  local seen = {}
  for i = 1, n do
    local r = find(i)
    if not seen[r] then
      seen[r] = { gpus = {} }
      node.islands[#node.islands + 1] = seen[r]
    end
    local isl = seen[r]
    isl.gpus[#isl.gpus + 1] = i
    if nvl[i] then isl.kind = "nvlink" end
  end
  for _, isl in ipairs(node.islands) do
    local g = node.gpus[isl.gpus[1]]
    if isl.kind == "nvlink" then
      isl.gbs = (g.nvlinks or 0) * M.NVLINK_LINK_GBS
    else
      isl.kind = #isl.gpus > 1 and "pcie-switch" or "single"
      isl.gbs = g.host_gbs
    end
  end
  -- memory and limits
  if this_machine then
    local mi = meminfo()
    node.available = mi.MemAvailable or node.memory
    node.hugepages_total = (mi.HugePages_Total or 0) * (mi.Hugepagesize or 0)
  else
    node.available = node.memory
  end
  -- the limit is this process's; another machine's (an XML file) is its table's, else unknown
  node.memlock = gputab and gputab.memlock or (this_machine and raw.memlock) or { soft = -1, hard = -1 }
  node.nvml = raw.nvml or { status = gputab and "fake" or "skipped" }
  if gputab then
    node.nvml = { status = "fake", driver = gputab.driver, cuda_driver = gputab.cuda_driver }
  end
  return node
end

local function limit(v) if v == nil or v < 0 then return math.huge end return v end

-- Joins nodes into the table described at the top.
local function assemble(nodes)
  local t = { nodes = {}, numa = {}, gpus = {}, islands = {}, memory = { total = 0, available = 0 } }
  for ni, node in ipairs(nodes) do
    local base = #t.gpus
    local entry = { hostname = node.hostname, packages = node.packages, cores = node.cores, pus = node.pus,
      memory = node.memory, available = node.available, cpu_model = node.cpu_model, gpus = {}, source = node.source }
    for _, n in ipairs(node.numa) do
      local c = {}
      for k, v in pairs(n) do c[k] = v end
      c.node = ni - 1
      t.numa[#t.numa + 1] = c
    end
    for _, g in ipairs(node.gpus) do
      local c = {}
      for k, v in pairs(g) do c[k] = v end
      c.node, c.index = ni - 1, #t.gpus
      t.gpus[#t.gpus + 1] = c
      entry.gpus[#entry.gpus + 1] = c.index
    end
    for _, isl in ipairs(node.islands) do
      local c = { kind = isl.kind, node = ni - 1, gbs = isl.gbs, gpus = {} }
      for _, i in ipairs(isl.gpus) do
        c.gpus[#c.gpus + 1] = base + i - 1
        t.gpus[base + i].island = #t.islands + 1
      end
      t.islands[#t.islands + 1] = c
    end
    t.nodes[ni] = entry
    t.memory.total = t.memory.total + node.memory
    t.memory.available = t.memory.available + node.available
    t.memory.hugepages = node.hugepages_total
  end
  local ml = nodes[1] and nodes[1].memlock or {}
  t.memlock = { soft = limit(ml.soft), hard = limit(ml.hard) }
  t.nvml = nodes[1] and nodes[1].nvml or {}
  return t
end

local function gpu_table(spec)
  if type(spec) == "table" then return spec end
  if type(spec) == "string" and spec ~= "" then return read_json(spec) end
  return nil
end

-- One node: an XML file (or this machine) and its GPU table.
local function discover_node(xml, gpus)
  local this_machine = not xml
  local gt, err
  if gpus then
    gt, err = gpu_table(gpus)
    if not gt then return nil, err end
  elseif xml then
    local side = xml:gsub("%.xml$", "") .. ".gpus.json"
    if exists(side) then
      gt, err = read_json(side)
      if not gt then return nil, err end
    end
  end
  local raw, rerr = M.raw(xml, gt ~= nil or xml ~= nil)
  if not raw then return nil, rerr end
  if not gt and raw.nvml and raw.nvml.status == "ok" then
    gt = { gpus = raw.nvml_gpus or {} }
  end
  local node = build_node(raw, gt, this_machine)
  if raw.nvml and raw.nvml.status == "ok" and not gpus then node.nvml = raw.nvml end
  return node
end

function M.discover(opts)
  opts = opts or {}
  local path = opts.topology or os.getenv("HWLOC_XMLFILE")
  if path == "" then path = nil end
  local gpus = opts.gpus or os.getenv("MSH_FAKE_GPUS")
  if gpus == "" then gpus = nil end
  local nodes = {}
  if path and path:match("%.json$") then
    local spec, err = read_json(path)
    if not spec then return nil, err end
    if type(spec.nodes) ~= "table" or #spec.nodes == 0 then
      return nil, string.format("'%s': a cluster file lists its nodes as \"nodes\": [{\"xml\": ..., \"gpus\": ...}]", path)
    end
    local dir = dirname(path)
    local function rel(p) if not p or p:sub(1, 1) == "/" then return p end return dir .. "/" .. p end
    for i, n in ipairs(spec.nodes) do
      local node, nerr = discover_node(rel(n.xml), rel(n.gpus))
      if not node then return nil, string.format("%s: node %d: %s", path, i - 1, nerr) end
      nodes[i] = node
    end
  else
    local node, err = discover_node(path, gpus)
    if not node then return nil, err end
    nodes[1] = node
  end
  local k = opts.nodes or 1
  for i = #nodes + 1, k do nodes[i] = nodes[1] end
  local t = assemble(nodes)
  t.source = path or "this machine"
  return t
end

-- A short text view: one line per node, NUMA node and island.
function M.describe(t)
  local lines = {}
  local function gib(b) return string.format("%.0f GiB", b / 2 ^ 30) end
  for ni, n in ipairs(t.nodes) do
    lines[#lines + 1] = string.format("node %d %s: %d socket%s, %d cores / %d threads, %s RAM (%s available)%s", ni - 1,
      n.hostname, n.packages, n.packages == 1 and "" or "s", n.cores, n.pus, gib(n.memory), gib(n.available),
      n.cpu_model and (", " .. n.cpu_model) or "")
    for _, nu in ipairs(t.numa) do
      if nu.node == ni - 1 then
        local g = {}
        for _, gpu in ipairs(t.gpus) do
          if gpu.node == ni - 1 and gpu.numa == nu.os_index then g[#g + 1] = tostring(gpu.local_index) end
        end
        lines[#lines + 1] = string.format("  NUMA %d: cpus %s, %s%s", nu.os_index, nu.cpus or "?", gib(nu.memory or 0),
          #g > 0 and (", GPUs " .. table.concat(g, " ")) or "")
      end
    end
    for _, isl in ipairs(t.islands) do
      if isl.node == ni - 1 then
        local g = {}
        for _, i in ipairs(isl.gpus) do g[#g + 1] = tostring(t.gpus[i + 1].local_index) end
        lines[#lines + 1] = string.format("  island %s: GPUs %s%s", isl.kind, table.concat(g, " "),
          isl.gbs and string.format(" (%.0f GB/s)", isl.gbs) or "")
      end
    end
  end
  return table.concat(lines, "\n")
end

-- ------------------------------------------------------------------------- NUMA placement

-- M.numa_node(topo, place) -> os_index | nil, reason: the NUMA node a rank belongs on.
--   place.device       "cpu" or "cuda[:i]" (i: the GPU's index on its node, PCI bus order)
--   place.local_rank, place.local_world   the rank among the node's ranks (default 0 of 1)
-- A GPU rank goes to its GPU's node. CPU ranks sharing a machine of several NUMA nodes are spread
-- over them in order (ranks 0..k-1 on the first node, ...). One NUMA node: nothing to choose.
function M.numa_node(topo, place)
  local numa = topo.numa or {}
  local nodes = {}
  for _, n in ipairs(numa) do if (n.node or 0) == 0 then nodes[#nodes + 1] = n end end
  if #nodes < 2 then return nil, "one NUMA node" end
  local device = place.device or "cpu"
  local kind, idx = device:match("^(%a+):?(%d*)$")
  if kind == "cuda" then
    local i = tonumber(idx) or place.local_rank or 0
    for _, g in ipairs(topo.gpus or {}) do
      if (g.node or 0) == 0 and g.local_index == i then
        if g.numa == nil or g.numa < 0 then return nil, string.format("GPU %d's NUMA node is unknown", i) end
        return g.numa
      end
    end
    return nil, string.format("GPU %d is not in the topology", i)
  end
  local r, w = place.local_rank or 0, math.max(place.local_world or 1, 1)
  if w == 1 then return nil, "one CPU rank uses every NUMA node" end
  return nodes[math.floor(r * #nodes / w) + 1].os_index
end

local bound -- the binding made in this process: { node, reason }

-- M.bind(place, env?) -> { node = os_index | nil, reason } | nil, message: binds this process (its
-- threads and the memory it allocates from now on, pinned buffers included) to the node
-- M.numa_node chooses, once per process. $MOONSHARD_NUMA: "off" (no binding), a node's
-- os_index (that node), or "auto" (default). A GPU rank also reads GPUs in PCI bus order
-- (CUDA_DEVICE_ORDER=PCI_BUS_ID unless set), the order the topology numbers them in.
function M.bind(place, env)
  if bound then return bound end
  local getenv = env or os.getenv
  local want = getenv("MOONSHARD_NUMA") or "auto"
  if want == "" then want = "auto" end
  if want == "off" then bound = { reason = "MOONSHARD_NUMA=off" } return bound end
  local node, reason
  if want == "auto" then
    local raw, err = M.raw(nil, true)
    if not raw then bound = { reason = err } return bound end
    local topo = { numa = {}, gpus = {} }
    local n = build_node(raw, nil, true)
    for _, nu in ipairs(n.numa) do topo.numa[#topo.numa + 1] = { node = 0, os_index = nu.os_index } end
    if #topo.numa < 2 then bound = { reason = "one NUMA node" } return bound end
    if (place.device or "cpu"):match("^cuda") then
      -- the GPUs' NUMA nodes come from NVML's bus ids matched to the PCI tree
      local full, ferr = M.discover()
      if not full then bound = { reason = ferr } return bound end
      topo = full
    end
    node, reason = M.numa_node(topo, place)
    if not node then bound = { reason = reason } return bound end
  else
    node = tonumber(want)
    if not node or node < 0 or node % 1 ~= 0 then
      return nil, string.format("MOONSHARD_NUMA=%s: off, auto or a NUMA node's number", want)
    end
  end
  local core = require "moonshard.core"
  if (place.device or "cpu"):match("^cuda") and not getenv("CUDA_DEVICE_ORDER") then
    pcall(core.ffi.cdef, "int setenv(const char *name, const char *value, int overwrite);")
    core.ffi.C.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID", 0)
  end
  local ok, msg = core.try(core.C.msh_numa_bind(node))
  if not ok then return nil, (msg:gsub("^msh_numa_bind: ", ""):gsub(" %(topology%.c:%d+%)$", "")) end
  bound = { node = node, reason = want == "auto" and "auto" or "MOONSHARD_NUMA" }
  return bound
end

-- M.binding() -> { cpus = "0-15", nodes = "0" } | nil, message: this process's current binding.
function M.binding()
  local core = require "moonshard.core"
  local cpus, nodes = core.ffi.new("char[?]", 1024), core.ffi.new("char[?]", 256)
  local ok, msg = core.try(core.C.msh_numa_binding(cpus, 1024, nodes, 256))
  if not ok then return nil, msg end
  return { cpus = core.ffi.string(cpus), nodes = core.ffi.string(nodes) }
end

return M
