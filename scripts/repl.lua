-- Interactive Lua prompt with the moonshard module loaded (line editing, history, tracebacks).
local args = require "moonshard.args"
args.parse(arg, { usage = "moonshard repl", summary = "Expressions print their values; Ctrl-D exits." })
_G.moonshard = require "moonshard"
require("moonshard.repl").run()
