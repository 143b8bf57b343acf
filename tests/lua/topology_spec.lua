-- moonshard.topology: hwloc XML fixtures (tests/fixtures/topology, made by make.py there) with
-- fake GPU tables stand in for an 8-GPU NVLink node, a 4-GPU PCIe node with two switches, two such
-- nodes and a laptop; the machine itself gives a CPU topology whether or not NVML is present.
local h = require "helpers"
local topology = require "moonshard.topology"

local F = h.root .. "/tests/fixtures/topology/"

describe("topology", function()
  it("reads an 8-GPU NVLink node: NUMA placement from the PCI tree, one NVLink island", function()
    local t = assert(topology.discover { topology = F .. "dgx8.xml" })
    assert.are.equal(1, #t.nodes)
    assert.are.equal(2, t.nodes[1].packages)
    assert.are.equal(16, t.nodes[1].cores)
    assert.are.equal(2, #t.numa)
    assert.are.equal(8, #t.gpus)
    for i, g in ipairs(t.gpus) do
      assert.are.equal(i - 1, g.index)
      assert.are.equal(i <= 4 and 0 or 1, g.numa) -- the first four sit under socket 0
      assert.are.equal(18, g.nvlinks)
      assert.is_true(g.memory > 79e9)
    end
    assert.are.equal(1, #t.islands)
    assert.are.equal("nvlink", t.islands[1].kind)
    assert.are.equal(8, #t.islands[1].gpus)
    assert.are.equal(1, t.gpus[8].island)
  end)

  it("groups PCIe-only GPUs by the switch they share", function()
    local t = assert(topology.discover { topology = F .. "pcie4.xml" })
    assert.are.equal(4, #t.gpus)
    assert.are.equal(2, #t.islands)
    for _, isl in ipairs(t.islands) do
      assert.are.equal("pcie-switch", isl.kind)
      assert.are.equal(2, #isl.gpus)
    end
    assert.are.same({ 0, 1 }, t.islands[1].gpus)
    assert.are.same({ 2, 3 }, t.islands[2].gpus)
    assert.are.equal(t.gpus[1].root, t.gpus[2].root)
    assert.are_not.equal(t.gpus[1].root, t.gpus[3].root)
    assert.is_true(math.abs(t.gpus[1].host_gbs - 63.0 * 0.87) < 0.5) -- Gen5 x16
  end)

  it("joins two nodes from a cluster file, GPU indices global", function()
    local t = assert(topology.discover { topology = F .. "pcie4x2.json" })
    assert.are.equal(2, #t.nodes)
    assert.are.equal(8, #t.gpus)
    assert.are.equal(4, #t.islands)
    assert.are.equal(1, t.gpus[5].node)
    assert.are.equal(0, t.gpus[5].local_index)
    assert.are.same({ 4, 5, 6, 7 }, t.nodes[2].gpus)
    local r = assert(topology.discover { topology = F .. "pcie4.xml", nodes = 2 })
    assert.are.equal(8, #r.gpus)
  end)

  it("reads a laptop without GPUs", function()
    local t = assert(topology.discover { topology = F .. "laptop.xml" })
    assert.are.equal(0, #t.gpus)
    assert.are.equal(0, #t.islands)
    assert.are.equal(16 * 2 ^ 30, t.memory.total)
    assert.are.equal(8, t.nodes[1].pus)
    assert.matches("laptop", topology.describe(t))
  end)

  it("discovers this machine: cores, memory and the memlock limit, NVML absent or present", function()
    local t = assert(topology.discover { topology = "" })
    assert.is_true(t.nodes[1].cores >= 1)
    assert.is_true(t.memory.total > 0)
    assert.is_true(t.memory.available > 0)
    assert.is_number(t.memlock.soft)
    assert.is_string(t.nvml.status)
    if t.nvml.status ~= "ok" then assert.are.equal(0, #t.gpus) end
  end)

  it("names a bad file", function()
    local t, err = topology.discover { topology = h.root .. "/README.md" }
    assert.is_nil(t)
    assert.matches("not an hwloc XML", err)
    t, err = topology.discover { topology = F .. "missing.xml" }
    assert.is_nil(t)
    assert.matches("missing.xml", err)
  end)
  describe("NUMA placement", function()
    it("puts a GPU rank on its GPU's node and spreads CPU ranks over the nodes", function()
      local t = assert(topology.discover { topology = F .. "dgx8.xml" })
      for i = 0, 7 do
        assert.are.equal(i < 4 and 0 or 1, topology.numa_node(t, { device = "cuda:" .. i }))
      end
      -- "cuda" alone: the local rank's GPU
      assert.are.equal(1, topology.numa_node(t, { device = "cuda", local_rank = 5, local_world = 8 }))
      local got = {}
      for r = 0, 3 do got[#got + 1] = topology.numa_node(t, { device = "cpu", local_rank = r, local_world = 4 }) end
      assert.are.same({ 0, 0, 1, 1 }, got)
      local n, why = topology.numa_node(t, { device = "cpu" })
      assert.is_nil(n)
      assert.matches("one CPU rank", why)
      n, why = topology.numa_node(t, { device = "cuda:9" })
      assert.is_nil(n)
      assert.matches("GPU 9 is not in the topology", why)
      local laptop = assert(topology.discover { topology = F .. "laptop.xml" })
      n, why = topology.numa_node(laptop, { device = "cpu", local_rank = 1, local_world = 2 })
      assert.is_nil(n)
      assert.matches("one NUMA node", why)
    end)

    -- each case in a process of its own: a binding lasts for the process
    local function bind_in_child(numa)
      return h.run({ "-e", [[
        local topo = require "moonshard.topology"
        local b, err = topo.bind({ device = "cpu" })
        if not b then io.stderr:write(err, "\n") os.exit(3) end
        local now = assert(topo.binding())
        print(tostring(b.node) .. "|" .. b.reason .. "|" .. now.cpus .. "|" .. now.nodes)
      ]] }, nil, { MOONSHARD_NUMA = numa })
    end

    it("binds the process to a named node and reads the binding back", function()
      local raw = assert(topology.raw(nil, true))
      local first = raw.numa[1]
      local out, err, code = bind_in_child(tostring(first.os_index))
      assert.are.equal(0, code, err)
      local node, reason, cpus, nodes = out:match("^(%-?%d+)|([^|]+)|([^|]*)|([^|\n]*)")
      assert.are.equal(first.os_index, tonumber(node))
      assert.are.equal("MOONSHARD_NUMA", reason)
      assert.are.equal(first.cpus, cpus)
      assert.are.equal(tostring(first.os_index), nodes)
    end)

    it("leaves a one-node machine or MOONSHARD_NUMA=off unbound, and names a bad node", function()
      local out, err, code = bind_in_child("off")
      assert.are.equal(0, code, err)
      assert.matches("^nil|MOONSHARD_NUMA=off|", out)
      local raw = assert(topology.raw(nil, true))
      if #raw.numa == 1 then
        out, err, code = bind_in_child("auto")
        assert.are.equal(0, code, err)
        assert.matches("^nil|one NUMA node|", out)
      end
      out, err, code = bind_in_child("99")
      assert.are.equal(3, code)
      assert.matches("NUMA node 99: this machine has %d+ NUMA node", err)
      out, err, code = bind_in_child("near")
      assert.are.equal(3, code)
      assert.matches("MOONSHARD_NUMA=near: off, auto or a NUMA node's number", err)
      -- a command names it in one line
      out, err, code = h.run({ "generate", "--model", h.stories, "--max-tokens", "2" }, nil,
        { MOONSHARD_NUMA = "99" })
      assert.are.equal(1, code)
      assert.matches("NUMA node 99", err)
    end)
  end)
end)
