local rope = require "moonshard.rope"

describe("moonshard.rope", function()
  it("gives theta^(-2i/d) without scaling", function()
    local inv = rope.inv_freq({ theta = 10000 }, 8)
    assert.are.equal(4, #inv)
    for i = 0, 3 do assert.is_true(math.abs(inv[i + 1] - 10000 ^ (-2 * i / 8)) < 1e-15) end
  end)

  it("rotates only rotary_dim dims when asked", function()
    assert.are.equal(2, #rope.inv_freq({ rotary_dim = 4 }, 8))
  end)

  it("applies Llama-3 scaling: long wavelengths divided by factor, short kept", function()
    local cfg = { theta = 500000, scaling = { type = "llama3", factor = 8, low_freq_factor = 1,
      high_freq_factor = 4, original_max_position_embeddings = 8192 } }
    local base = rope.inv_freq({ theta = 500000 }, 128)
    local inv = rope.inv_freq(cfg, 128)
    assert.are.equal(base[1], inv[1]) -- highest frequency: unchanged
    assert.is_true(math.abs(inv[64] - base[64] / 8) < 1e-20) -- lowest: divided by the factor
    for i = 1, 64 do assert.is_true(inv[i] <= base[i] and inv[i] >= base[i] / 8 * (1 - 1e-12)) end
  end)

  it("rejects an unknown scaling", function()
    assert.has_error(function() rope.inv_freq({ scaling = { type = "yarn2" } }, 8) end)
  end)
end)
