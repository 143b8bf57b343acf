-- `moonshard doctor`: a useful CPU report on a machine without GPUs, GPU lines from a fake
-- topology, one line per problem with its fix, and a non-zero exit on a blocking one.
local h = require "helpers"
local cjson = require "cjson"

describe("moonshard doctor", function()
  it("reports this machine and exits 0 when nothing blocks", function()
    local dir = h.tmpdir()
    local out, err, code = h.run { "doctor", "--offload-dir", dir, "--read-mib", "8" }
    h.rmdir(dir)
    assert.are.equal(0, code, err)
    assert.matches("node 0", out)
    assert.matches("memory: .- total", out)
    assert.matches("RLIMIT_MEMLOCK", out)
    assert.matches("offload dir .- read [%d%.]+ GB/s", out)
  end)

  it("gives JSON with the topology, limits and problems", function()
    local out, err, code = h.run { "doctor", "--json" }
    assert.are.equal(0, code, err)
    local j = cjson.decode(out)
    assert.is_table(j.topology.nodes)
    assert.is_number(j.memory.total)
    assert.is_table(j.problems)
    if #j.topology.gpus == 0 then assert.are.equal("cpu", j.device) end
  end)

  it("lists a fake machine's GPUs with their NUMA node and NVLink", function()
    local out, err, code = h.run { "doctor", "--topology", h.root .. "/tests/fixtures/topology/dgx8.xml" }
    assert.are.equal(0, code, err)
    assert.matches("island nvlink: GPUs 0 1 2 3 4 5 6 7", out)
    assert.matches("GPU 7 0000:bb:00.0 NVIDIA H100 80GB HBM3: .-NUMA 1.-NVLink links 18", out)
  end)

  it("fails on a missing offload folder, naming the fix", function()
    local out, err, code = h.run { "doctor", "--offload-dir", "/nonexistent/moonshard" }
    assert.are.equal(1, code, err)
    assert.matches("BLOCKING: %-%-offload%-dir /nonexistent/moonshard does not exist or is not writable %-> mkdir", out)
  end)
end)
