-- A CPU-only start maps none of the CUDA libraries: the CUDA backend is a module of its own
-- (libmoonshard_cuda.so) that libmoonshard loads on the first use of a CUDA device. Without the
-- module CUDA is unavailable (no devices, the loader's reason in the error) and the CPU works.
local h = require "helpers"

-- A -e chunk that runs `body` then prints how many lines of /proc/self/maps name a CUDA library.
local function maps_chunk(body)
  return body .. [[

    local n = 0
    for line in io.lines("/proc/self/maps") do
      if line:find("libcudart", 1, true) or line:find("libcublas", 1, true) or line:find("libnccl", 1, true)
        or line:find("libmoonshard_cuda", 1, true) then n = n + 1 end
    end
    print("cuda maps", n)]]
end

local function cuda_maps(out)
  return tonumber(out:match("cuda maps\t(%d+)"))
end

-- The module of this build, beside the executable's libmoonshard (nil in a build without CUDA).
local function module_path()
  local p = h.exe:gsub("[^/]+$", "") .. "libmoonshard_cuda.so"
  local f = io.open(p, "rb")
  if not f then return nil end
  f:close()
  return p
end

describe("startup", function()
  it("a -e chunk on the CPU maps no CUDA library", function()
    local out, err, code = h.run { "-e", maps_chunk("print(1)") }
    assert.are.equal(0, code, err)
    assert.truthy(out:find("^1\n"), out)
    assert.are.equal(0, cuda_maps(out), out)
  end)

  it("a CPU tensor op and a CPU device count leave CUDA unloaded", function()
    local out, err, code = h.run { "-e", maps_chunk([[
      local moonshard = require "moonshard"
      local ffi, C = require "ffi", moonshard.C
      local n = ffi.new("int[1]")
      moonshard.core.check(C.msh_device_count(C.MSH_CPU, n))
      local t = ffi.new("msh_tensor*[1]")
      moonshard.core.check(C.msh_tensor_new(t, C.MSH_F32, 1, ffi.new("int64_t[1]", 8), C.MSH_CPU, 0))
      C.msh_tensor_free(t[0])
      print("cpus", n[0])]]) }
    assert.are.equal(0, code, err)
    assert.truthy(out:find("cpus\t1\n", 1, true), out)
    assert.are.equal(0, cuda_maps(out), out)
  end)

  it("generate on the CPU loads no CUDA library", function()
    local out, code = h.sh("LD_DEBUG=libs " .. h.q(h.exe) .. " generate --model " .. h.q(h.stories) ..
      " --max-tokens 4 --temperature 0 --device cpu 2>&1 >/dev/null </dev/null")
    assert.are.equal(0, code, out)
    assert.truthy(out:find("file=", 1, true), "LD_DEBUG printed nothing:\n" .. out)
    for _, lib in ipairs { "libcudart", "libcublas", "libnccl", "libmoonshard_cuda" } do
      assert.falsy(out:find("file=[^\n]*" .. lib), lib .. " was loaded")
    end
  end)

  it("without the module CUDA is unavailable and says why, and the CPU still generates", function()
    local env = "MOONSHARD_CUDA_MODULE=/nonexistent/libmoonshard_cuda.so "
    local chunk = maps_chunk([[
      local moonshard = require "moonshard"
      local ffi, C = require "ffi", moonshard.C
      local n = ffi.new("int[1]", -1)
      print("count", C.msh_device_count(C.MSH_CUDA, n), n[0], "has", C.msh_has_cuda())
      print("why", ffi.string(C.msh_last_error()))
      local t = ffi.new("msh_tensor*[1]")
      local ok, msg = moonshard.core.try(C.msh_tensor_new(t, C.MSH_F32, 1, ffi.new("int64_t[1]", 8), C.MSH_CUDA, 0))
      print("new", ok == true, msg)]])
    local out, code = h.sh(env .. h.q(h.exe) .. " -e " .. h.q(chunk) .. " 2>&1 </dev/null")
    assert.are.equal(0, code, out)
    assert.truthy(out:find("count\t0\t0\thas\t0\n", 1, true), out)
    assert.truthy(out:find("why\t[^\n]*/nonexistent/libmoonshard_cuda.so"), out)
    assert.truthy(out:find("new\tfalse\t", 1, true), out)
    assert.truthy(out:find("CUDA is not available", 1, true), out)
    assert.truthy(out:find("/nonexistent/libmoonshard_cuda.so", 1, true), out) -- the dlerror text
    assert.are.equal(0, cuda_maps(out), out)
    local gen, gcode = h.sh(env .. h.q(h.exe) .. " generate --model " .. h.q(h.stories) ..
      " --max-tokens 4 --temperature 0 --device cpu 2>/dev/null </dev/null")
    assert.are.equal(0, gcode, gen)
    assert.truthy(#gen > 0, "generate printed nothing")
  end)

  it("a library that is not the CUDA module is refused, not used", function()
    local core_lib = h.exe:gsub("[^/]+$", "") .. "libmoonshard.so" -- loads, registers nothing
    local out, code = h.sh("MOONSHARD_CUDA_MODULE=" .. h.q(core_lib) .. " " .. h.q(h.exe) .. " -e " .. h.q([[
      local moonshard = require "moonshard"
      local ffi, C = require "ffi", moonshard.C
      local n = ffi.new("int[1]", -1)
      print("count", C.msh_device_count(C.MSH_CUDA, n), n[0], "has", C.msh_has_cuda())
      print("why", ffi.string(C.msh_last_error()))]]) .. " 2>&1 </dev/null")
    assert.are.equal(0, code, out)
    assert.truthy(out:find("count\t0\t0\thas\t0\n", 1, true), out)
    assert.truthy(out:find("registered no CUDA backend", 1, true), out)
  end)

  it("asking for a CUDA device loads the module of this build (no GPU: zero devices)", function()
    local path = module_path()
    if not path then
      pending("this build has no CUDA module")
      return
    end
    local out, err, code = h.run { "-e", maps_chunk([[
      local moonshard = require "moonshard"
      local ffi, C = require "ffi", moonshard.C
      local n = ffi.new("int[1]", -1)
      print("count", C.msh_device_count(C.MSH_CUDA, n), n[0] >= 0, "has", C.msh_has_cuda())]]) }
    assert.are.equal(0, code, err)
    assert.truthy(out:find("count\t0\ttrue\thas\t1\n", 1, true), out)
    assert.is_true(cuda_maps(out) > 0, out)
  end)
end)
