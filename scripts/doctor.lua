-- Checks this machine for moonshard: topology (GPU-NUMA tree, NVLink / P2P matrix), driver,
-- CUDA and NCCL versions, pinned-memory limits, free RAM, huge pages, the offload folder's disk
-- and read rate, GPU clocks and power caps. Each problem is one line with its fix; the exit
-- status is 1 when a problem blocks a run, else 0 (a machine without GPUs is a CPU machine).
local args = require "moonshard.args"
local cjson = require "cjson"
local opts = args.parse(arg, {
  usage = "moonshard doctor [--offload-dir DIR] [--json]",
  { "offload-dir", "string", "the --disk-offload folder to check (space, writable, read rate)" },
  { "read-mib", "int", "MiB written and read back to measure the offload folder", default = 256, min = 1, max = 65536 },
  { "topology", "string", "an hwloc XML file standing in for this machine", input = "topology" },
  { "json", "flag", "print the report as JSON" },
})
local ffi = require "ffi"
local core = require "moonshard.core"
local topology = require "moonshard.topology"
local plan = require "moonshard.plan"
local C = core.C
local gib = plan.gib

local report = { problems = {} }
local blocking = false
local function problem(block, what, fix)
  report.problems[#report.problems + 1] = { blocking = block, problem = what, fix = fix }
  if block then blocking = true end
end

local topo, terr = topology.discover { topology = opts.topology }
if not topo then
  problem(true, "topology: " .. terr, "install libhwloc-dev and rebuild, or pass --topology FILE.xml")
  topo = { nodes = {}, gpus = {}, islands = {}, numa = {}, memory = {}, memlock = {}, nvml = {} }
end
report.topology = topo

-- versions: NVML's driver, the CUDA runtime and NCCL where their libraries load
local versions = { driver = topo.nvml.driver, cuda_driver = topo.nvml.cuda_driver }
local function try_version(libs, decl, fn)
  pcall(ffi.cdef, decl)
  for _, name in ipairs(libs) do
    local ok, lib = pcall(ffi.load, name)
    if ok then
      local v = ffi.new("int[1]")
      local ok2, rc = pcall(function() return lib[fn](v) end)
      if ok2 and rc == 0 then return v[0] end
    end
  end
end
versions.cuda_runtime = try_version({ "libcudart.so", "libcudart.so.12", "libcudart.so.13" },
  "int cudaRuntimeGetVersion(int *v);", "cudaRuntimeGetVersion")
versions.nccl = try_version({ "libnccl.so.2", "libnccl.so" }, "int ncclGetVersion(int *v);", "ncclGetVersion")
report.versions = versions

-- memory: RAM, pinned limits, huge pages
local mi = topology.meminfo()
local allowed, total, memlock = ffi.new("uint64_t[1]"), ffi.new("uint64_t[1]"), ffi.new("uint64_t[1]")
local pin = {}
if C.msh_pin_limit(plan.PIN_SHARE, 1, allowed, total, memlock) == 0 then
  pin.allowed = tonumber(allowed[0])
  pin.memlock = memlock[0] == ffi.cast("uint64_t", -1) and math.huge or tonumber(memlock[0])
  pin.share = plan.PIN_SHARE
end
report.memory = { total = mi.MemTotal, available = mi.MemAvailable, pinned = pin,
  hugepages = { total = mi.HugePages_Total, free = mi.HugePages_Free, size = mi.Hugepagesize } }
local f = io.open("/sys/kernel/mm/transparent_hugepage/enabled")
if f then report.memory.thp = (f:read("*l") or ""):match("%[(%w+)%]"); f:close() end
if pin.memlock and pin.memlock < (mi.MemTotal or 0) * plan.PIN_SHARE then
  problem(false, string.format("RLIMIT_MEMLOCK is %s: --cpu-offload pins at most that per process (beyond it host "
    .. "buffers are pageable, about a third of the bandwidth)", gib(pin.memlock)),
    "raise it: `ulimit -l unlimited` (or memlock in /etc/security/limits.conf, LimitMEMLOCK= for systemd, "
    .. "--ulimit memlock=-1 for docker)")
end
if (mi.MemAvailable or 0) < 2 * 2 ^ 30 then
  problem(false, string.format("only %s of RAM available", gib(mi.MemAvailable or 0)), "stop other processes or add memory")
end

-- GPUs: PCIe links, clocks, power caps, NUMA placement
if #topo.gpus == 0 then
  report.device = "cpu"
  report.cpu = { cores = topo.nodes[1] and topo.nodes[1].cores, threads = topo.nodes[1] and topo.nodes[1].pus,
    nvml = topo.nvml.status }
else
  report.device = "cuda"
  for _, g in ipairs(topo.gpus) do
    local id = string.format("GPU %d (%s)", g.local_index, g.busid)
    if g.pcie_gen and g.pcie_gen_max and g.pcie_gen < g.pcie_gen_max then
      problem(false, string.format("%s: PCIe link at Gen%d of Gen%d (idle GPUs train the link down; under load it "
        .. "should rise)", id, g.pcie_gen, g.pcie_gen_max), "check under load; if it stays, reseat the card or check BIOS PCIe settings")
    end
    if g.pcie_width and g.pcie_width_max and g.pcie_width < g.pcie_width_max then
      problem(false, string.format("%s: PCIe link x%d of x%d", id, g.pcie_width, g.pcie_width_max),
        "reseat the card or move it to a full-width slot")
    end
    if g.power_limit_w and g.power_default_w and g.power_limit_w < 0.95 * g.power_default_w then
      problem(false, string.format("%s: power cap %.0f W below its default %.0f W", id, g.power_limit_w, g.power_default_w),
        string.format("sudo nvidia-smi -i %d -pl %.0f", g.local_index, g.power_default_w))
    end
    if g.numa == -1 and #topo.numa > 1 then
      problem(false, id .. ": NUMA node unknown", "check hwloc sees the PCI tree (libhwloc-dev with PCI support)")
    end
  end
  if not versions.driver and topo.nvml.status ~= "fake" then
    problem(true, "GPUs found by hwloc but NVML did not load: " .. tostring(topo.nvml.error), "install the NVIDIA driver")
  end
end

-- the offload folder: exists, writable, free space, sequential read rate
if opts.offload_dir then
  local dir = opts.offload_dir
  local d = { path = dir }
  report.offload_dir = d
  local probe = dir .. "/.moonshard-doctor-" .. tostring(os.time()) .. ".bin"
  local w = io.open(probe, "wb")
  if not w then
    problem(true, string.format("--offload-dir %s does not exist or is not writable", dir),
      string.format("mkdir -p %s and make it writable, or name another folder", dir))
  else
    local chunk = string.rep("\0\1\2\3", 256 * 1024) -- 1 MiB
    local ok = true
    for _ = 1, opts.read_mib do ok = ok and w:write(chunk) ~= nil end
    w:close()
    if not ok then
      problem(true, string.format("--offload-dir %s: writing %d MiB failed (full?)", dir, opts.read_mib), "free space there")
    else
      local rd = require("moonshard.ceilings").disk(probe)
      if rd then d.read_gbs, d.dd_gbs, d.reader_gbs, d.cached = rd.gbs, rd.dd_gbs, rd.reader_gbs, not rd.direct or nil end
    end
    os.remove(probe)
    local df = io.popen(string.format("df -B1 --output=avail,source '%s' 2>/dev/null | tail -1", dir:gsub("'", "'\\''")))
    local line = df and df:read("*l") or ""
    if df then df:close() end
    local avail, source = line:match("(%d+)%s+(%S+)")
    d.free, d.device = tonumber(avail), source
    if d.read_gbs and d.read_gbs < 1.0 and not d.cached then
      problem(false, string.format("--offload-dir %s reads at %.2f GB/s: the disk tier will be slow", dir, d.read_gbs),
        "put the offload folder on an NVMe drive")
    end
  end
end

if opts.json then
  -- JSON has no infinity: an unlimited limit is -1
  local function fin(v) return v == math.huge and -1 or v end
  topo.memlock = { soft = fin(topo.memlock.soft), hard = fin(topo.memlock.hard) }
  if pin.memlock then pin.memlock = fin(pin.memlock) end
  io.stdout:write(cjson.encode(report), "\n")
else
  local out = {}
  local function line(...) out[#out + 1] = string.format(...) end
  line("moonshard doctor")
  line("%s", topology.describe(topo))
  if #topo.gpus == 0 then
    line("GPUs: none (NVML %s): moonshard runs on the CPU with %d threads", tostring(topo.nvml.status),
      topo.nodes[1] and topo.nodes[1].pus or 1)
  else
    for _, g in ipairs(topo.gpus) do
      line("GPU %d %s %s: %s, NUMA %d, PCIe Gen%s x%s, SM %s/%s MHz, power cap %s W, NVLink links %d", g.local_index, g.busid,
        g.name, gib(g.memory or 0), g.numa, tostring(g.pcie_gen), tostring(g.pcie_width), tostring(g.sm_clock_mhz),
        tostring(g.sm_clock_max_mhz), tostring(g.power_limit_w), g.nvlinks or 0)
    end
    local m = topo.nvml.common_ancestor
    if m and #m > 1 then
      local names = { [0] = "X", [10] = "PIX", [20] = "PXB", [30] = "PHB", [40] = "NODE", [50] = "SYS" }
      line("GPU pairs (common ancestor; NV: NVLink island, p2p read status 0 = ok):")
      for i, row in ipairs(m) do
        local cells = {}
        for j, v in ipairs(row) do
          local nv = topo.gpus[i].island == topo.gpus[j].island and topo.islands[topo.gpus[i].island].kind == "nvlink"
          cells[j] = i == j and "X" or (nv and "NV" or (names[v] or tostring(v)))
          local p2p = topo.nvml.p2p_read and topo.nvml.p2p_read[i][j]
          if i ~= j and p2p and p2p ~= 0 then cells[j] = cells[j] .. "!" end
        end
        line("  GPU%d  %s", i - 1, table.concat(cells, "\t"))
      end
    end
  end
  line("versions: driver %s, CUDA driver %s, CUDA runtime %s, NCCL %s", tostring(versions.driver or "-"),
    tostring(versions.cuda_driver or "-"), tostring(versions.cuda_runtime or "-"), tostring(versions.nccl or "-"))
  line("memory: %s total, %s available; pinned allowed %s (share %.2f, RLIMIT_MEMLOCK %s); huge pages %d x %s, THP %s",
    gib(mi.MemTotal or 0), gib(mi.MemAvailable or 0), gib(pin.allowed or 0), pin.share or 0,
    pin.memlock == math.huge and "unlimited" or gib(pin.memlock or 0), mi.HugePages_Total or 0,
    gib(mi.Hugepagesize or 0), tostring(report.memory.thp))
  if report.offload_dir then
    local d = report.offload_dir
    line("offload dir %s: %s free on %s, read %s", d.path, d.free and gib(d.free) or "?", tostring(d.device),
      d.read_gbs and string.format("%.2f GB/s%s", d.read_gbs, d.cached and " (page cache: no O_DIRECT)" or "") or "?")
  end
  if #report.problems == 0 then line("no problems found") end
  for _, p in ipairs(report.problems) do
    line("%s: %s -> %s", p.blocking and "BLOCKING" or "warning", p.problem, p.fix)
  end
  io.stdout:write(table.concat(out, "\n"), "\n")
end
if blocking then os.exit(1) end
