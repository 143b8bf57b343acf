-- moonshard.stage: which dtype each weight gets where, block-quantized weights included; and
-- quantized tensors through the Lua tensor API (conversions, bytes, devices).
local moonshard = require "moonshard"
local stage = require "moonshard.stage"
local tensor = moonshard.tensor
local ffi = require "ffi"

local function gpu_count()
  local n = ffi.new("int[1]")
  if moonshard.C.msh_device_count(moonshard.C.MSH_CUDA, n) ~= 0 then return 0 end
  return n[0]
end

-- A (rows, cols) q4_1 tensor quantized from known values, and those values.
local function q4_1(rows, cols)
  local vals = {}
  for i = 1, rows * cols do vals[i] = math.sin(i * 0.37) * (1 + (i % 7)) end
  local f = tensor.from(vals, { rows, cols })
  return f:to("q4_1"), f
end

describe("block-quantized tensors in Lua", function()
  it("have dtype names, byte sizes, and convert to float dtypes", function()
    local q, f = q4_1(3, 64)
    assert.are.equal("q4_1", q:dtype())
    assert.is_true(q:is_quantized())
    assert.is_false(f:is_quantized())
    assert.are.equal(3 * 2 * 20, q:nbytes())
    assert.are.equal(3 * 64 * 4, f:nbytes())
    local back = q:to("f32"):values()
    local orig = f:values()
    for i = 1, #orig, 32 do -- within a step of Q4_1 (1/15 of a block's range) of the originals
      local lo, hi = math.huge, -math.huge
      for j = i, i + 31 do lo, hi = math.min(lo, orig[j]), math.max(hi, orig[j]) end
      for j = i, i + 31 do assert.is_true(math.abs(back[j] - orig[j]) <= (hi - lo) / 15, "element " .. j) end
    end
    local h = q:to("f16"):values()
    for i = 1, #back do assert.is_true(math.abs(h[i] - back[i]) <= math.abs(back[i]) * 2 ^ -10 + 1e-7) end
    assert.are.same(back, q:values()) -- values() dequantizes
  end)

  it("refuse views that split a block", function()
    local q = q4_1(4, 64)
    assert.are.equal(2, q:narrow(1, 1, 2):size(1))
    assert.has_error(function() q:narrow(2, 0, 16) end)
    assert.has_error(function() q:transpose(1, 2) end)
  end)
end)

describe("resident stage dtypes", function()
  local pick = stage.target_dtype
  local q = q4_1(2, 64)
  local q1d = tensor.from({ 1, 2 }, { 2 })
  local f = tensor.new({ 2, 64 }, "f32")
  local bf = tensor.new({ 2, 64 }, "bf16")

  it("keeps block-quantized weights on the CPU unless a dtype is named", function()
    assert.are.equal("q4_1", pick(q, 0, nil, "f32"))
    assert.are.equal("q4_1", pick(q, 0, "native"))
    assert.are.equal("f16", pick(q, 0, "f16"))
    assert.are.equal("q8_0", pick(q, 0, "q8_0"))
  end)

  it("turns them into bf16 (or the dtype named) on a GPU, and keeps them under native", function()
    assert.are.equal("bf16", pick(q, 1, nil))
    assert.are.equal("q4_1", pick(q, 1, "native")) -- a GPU's matmul and embedding take blocks
    assert.are.equal("f16", pick(q, 1, "f16"))
    assert.are.equal("q8_0", pick(q, 1, "q8_0"))
  end)

  it("leaves float weights to float_dtype, and quantizes only matrices", function()
    assert.are.equal("f32", pick(bf, 0, nil, "f32"))
    assert.are.equal("bf16", pick(bf, 0, "native", "f32"))
    assert.are.equal("bf16", pick(bf, 0, nil))
    assert.are.equal("q8_0", pick(f, 0, "q8_0", "f32"))
    assert.are.equal("f32", pick(q1d, 0, "q8_0"))
    assert.are.equal("q8_0", pick(f, 1, "q8_0"))
  end)

  it("places the file's quantized weights without copying them", function()
    local w = { embed = q, norm = q1d, output = q, layers = { { wq = q, attn_norm = q1d } } }
    local s = stage.resident(w, "cpu", { float_dtype = "f32" })
    assert.are.equal(q, s:embed())
    assert.are.equal(q, s:acquire(1).wq)
    local s16 = stage.resident(w, "cpu", { dtype = "f16" })
    assert.are.equal("f16", s16:acquire(1).wq:dtype())
  end)

  it("multiplies with quantized weights through ops.matmul on the CPU", function()
    local vals = {}
    for i = 1, 64 do vals[i] = math.cos(i) end
    local x = tensor.from(vals, { 1, 64 })
    local out = tensor.new({ 1, 2 }, "f32")
    moonshard.ops.matmul(out, x, q)
    local ref = tensor.new({ 1, 2 }, "f32")
    moonshard.ops.matmul(ref, x, q:to("f32"))
    -- 8-bit x: within half a step of x (amax / 254 a block) times the weights' magnitudes
    local wv, bound = q:values(), {}
    for r = 1, 2 do
      bound[r] = 0
      for b = 0, 1 do
        local amax, ws = 0, 0
        for k = 1, 32 do
          amax = math.max(amax, math.abs(vals[b * 32 + k]))
          ws = ws + math.abs(wv[(r - 1) * 64 + b * 32 + k])
        end
        bound[r] = bound[r] + amax / 254 * ws + 1e-5
      end
    end
    local o, rv = out:values(), ref:values()
    for r = 1, 2 do assert.is_true(math.abs(o[r] - rv[r]) <= bound[r], "row " .. r) end
  end)
end)

describe("fused weights", function()
  local dummy = require "moonshard.loaders.dummy"
  local function rows_of(t, r0, n)
    return t:narrow(1, r0, n):values()
  end

  it("stacks q/k/v and gate/up row by row, from files and from lazy random weights", function()
    local q4, f4 = q4_1(4, 64)
    local q2, f2 = q4_1(2, 64)
    local lazy_g, lazy_u = dummy.lazy({ 3, 32 }, 11), dummy.lazy({ 3, 32 }, 12)
    local w = { layers = { { wq = f4, wk = f2, wv = f2, w_gate = lazy_g, w_up = lazy_u, wo = f4 } } }
    local layers_only = { embed = false, head = false }
    local s = stage.resident(w, "cpu", layers_only)
    local l = s:acquire(1)
    assert.are.same({ 8, 64 }, l.wqkv:shape())
    assert.are.same(f4:values(), rows_of(l.wqkv, 0, 4))
    assert.are.same(f2:values(), rows_of(l.wqkv, 4, 2))
    assert.are.same(f2:values(), rows_of(l.wqkv, 6, 2))
    assert.are.same(lazy_g:values(), rows_of(l.w_gu, 0, 3))
    assert.are.same(lazy_u:values(), rows_of(l.w_gu, 3, 3))
    assert.is_nil(l.wq)
    assert.is_nil(l.w_gate)
    assert.are.equal(f4, l.wo)
    -- quantized weights stack as blocks; weights of different dtypes stay apart
    local sq = stage.resident({ layers = { { wq = q4, wk = q2, wv = q2 } } }, "cpu", layers_only)
    assert.are.equal("q4_1", sq:acquire(1).wqkv:dtype())
    assert.are.same(q2:to("f32"):values(), sq:acquire(1).wqkv:narrow(1, 4, 2):to("f32"):values())
    local mixed = stage.resident({ layers = { { wq = q4, wk = f2, wv = q2 } } }, "cpu", layers_only)
    assert.is_nil(mixed:acquire(1).wqkv)
    assert.are.equal(q4, mixed:acquire(1).wq)
    local off = stage.resident(w, "cpu", { fuse = false, embed = false, head = false }):acquire(1)
    assert.is_nil(off.wqkv)
    assert.are.equal(f4, off.wq)
  end)
end)

describe("block-quantized tensors on a CUDA device", function()
  if gpu_count() == 0 then
    pending("no CUDA device (or no CUDA backend in this build)")
    return
  end
  local q = q4_1(4, 64)

  it("move as bytes, dequantize on the way to float dtypes, and go to the GPU's matmul", function()
    local g = q:to("q4_1", "cuda")
    assert.are.equal("cuda:0", g:device())
    assert.are.same(q:values(), g:to("q4_1", "cpu"):values())
    assert.are.same(q:to("bf16"):values(), g:to("bf16"):values()) -- cuda q4_1 -> cuda bf16, through the host
    local x, out = tensor.new({ 1, 64 }, "f32", "cuda"), tensor.new({ 1, 4 }, "f32", "cuda")
    x:randn(3, 0, 1)
    moonshard.ops.matmul(out, x, g) -- the quantized GEMV (tests/gpu/test_cuda_quant.c checks it)
    local ref = tensor.new({ 1, 4 }, "f32")
    moonshard.ops.matmul(ref, x:to("f32", "cpu"), q:to("f32"))
    for i, v in ipairs(ref:values()) do assert.is_true(math.abs(out:values()[i] - v) <= 1e-4 * (1 + math.abs(v))) end
  end)

  it("become bf16 weights when a stage places them on the GPU", function()
    local s = stage.resident({ embed = q, norm = tensor.from({ 1 }, { 1 }), output = q, layers = {} }, "cuda")
    assert.are.equal("bf16", s:embed():dtype())
    assert.are.equal("cuda:0", s:embed():device())
    assert.are.same(q:to("bf16"):values(), s:embed():values())
  end)
end)
