-- gen_cdef.lua HEADER OUT: writes the LuaJIT ffi.cdef text of the public header, taken between
-- its "ffi:begin" and "ffi:end" markers, with comments and preprocessor lines removed.
local header, out = arg[1], arg[2]
assert(header and out, "usage: luajit gen_cdef.lua moonshard.h cdef.lua")
local src = assert(io.open(header, "rb")):read("*a")
local body = src:match("/%* ffi:begin %*/(.-)/%* ffi:end %*/")
assert(body, header .. ": ffi markers not found")
body = body:gsub("/%*.-%*/", ""):gsub("//[^\n]*", "")
local lines = {}
for line in body:gmatch("[^\n]*") do
  if not line:match("^%s*#") and line:match("%S") then lines[#lines + 1] = line end
end
local text = table.concat(lines, "\n")
assert(not text:find("%[%[") and not text:find("%]%]"), "cdef text must not contain long brackets")
local f = assert(io.open(out, "wb"))
f:write("-- Generated from ", header:match("[^/]*$"), " by tools/gen_cdef.lua. Do not edit.\n")
f:write("return [[\n", text, "\n]]\n")
f:close()
