-- The generated binding covers the whole public header.
local h = require "helpers"
local core = require "moonshard.core"

describe("moonshard.core binding", function()
  it("resolves every msh_* function declared in moonshard.h", function()
    local header = h.read(h.root .. "/core/include/moonshard.h")
    local body = header:match("/%* ffi:begin %*/(.-)/%* ffi:end %*/")
    assert.is_not_nil(body)
    local names, missing = {}, {}
    for name in body:gmatch("[%s%*](msh_[%w_]+)%s*%(") do names[#names + 1] = name end
    assert.is_true(#names > 50, "too few functions found: " .. #names)
    for _, name in ipairs(names) do
      local ok = pcall(function() return core.C[name] end)
      if not ok then missing[#missing + 1] = name end
    end
    assert.are.same({}, missing)
  end)

  it("turns a failing status into nil, message, code", function()
    local out = core.ffi.new("msh_file*[1]")
    local ok, msg, code = core.try(core.C.msh_file_open(out, "/nonexistent/model.bin"))
    assert.is_nil(ok)
    assert.are.equal("ENOENT", code)
    assert.truthy(msg:find("/nonexistent/model.bin", 1, true))
  end)
end)
