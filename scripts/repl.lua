-- Interactive Lua prompt with the moonshard module loaded (line editing, history, tracebacks).
local args = require "moonshard.args"
args.parse(arg, { usage = "moonshard repl", summary = "Expressions print their values; Ctrl-D exits." })
_G.moonshard = require "moonshard"
-- a piped session in which a chunk failed exits 1 (an interactive one exits 0)
local failures, interactive = require("moonshard.repl").run()
if failures > 0 and not interactive then
  io.stderr:write(string.format("moonshard repl: %d of the chunks failed\n", failures))
  return 1
end
