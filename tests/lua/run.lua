-- Runs the Lua specs (tests/lua/**/*_spec.lua) with busted inside the moonshard host, so the
-- specs see the same LuaJIT, luv loop and libmoonshard as scripts do.
local host = require "moonshard.host"
package.path = host.root .. "/tests/lua/?.lua;" .. package.path
local extra = { ... }
_G.arg = { [0] = "busted", "--pattern=_spec", "--output=plainTerminal", host.root .. "/tests/lua" }
for _, a in ipairs(extra) do table.insert(_G.arg, #_G.arg, a) end
require("busted.runner")({ standalone = false })
