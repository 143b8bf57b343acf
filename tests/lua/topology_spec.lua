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
end)
