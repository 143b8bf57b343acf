-- The examples run as documented.
local h = require "helpers"

describe("examples", function()
  it("forward.lua prints the next piece and the logits' shape", function()
    local out, err, code = h.run { h.root .. "/examples/forward.lua", h.stories }
    assert.are.equal(0, code, err)
    assert.truthy(out:match("^5 tokens in; most likely next piece: .+\ntensor%(5x512, f32, cpu%)\n$"), out)
  end)

  it("sampling_sweep.lua generates at three temperatures, greedy first", function()
    local out, err, code = h.run { h.root .. "/examples/sampling_sweep.lua", h.stories }
    assert.are.equal(0, code, err)
    local lines = {}
    for l in out:gmatch("[^\n]+") do lines[#lines + 1] = l end
    assert.are.equal(3, #lines)
    assert.truthy(lines[1]:match("^T=0%.0 %(30 tokens%): "), lines[1])
  end)
end)
