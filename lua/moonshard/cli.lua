-- moonshard.cli: the host's command line. `moonshard FILE.lua args`, `moonshard NAME args`
-- (scripts/NAME.lua), `moonshard -e CODE`, `moonshard --help`, `moonshard --version`.
local host = require "moonshard.host"

local M = {}

local function script_summary(path)
  local f = io.open(path, "r")
  if not f then return "" end
  local summary = ""
  for line in f:lines() do
    local s = line:match("^%-%-%s*(.-)%s*$")
    if not s then break end
    if s ~= "" and not s:match("^!") then summary = s break end
  end
  f:close()
  return summary
end

local function list_commands()
  local uv = require "luv"
  local names = {}
  local req = uv.fs_scandir(host.scripts)
  while req do
    local name, kind = uv.fs_scandir_next(req)
    if not name then break end
    local cmd = name:match("^(.-)%.lua$")
    if cmd and kind ~= "directory" then names[#names + 1] = cmd end
  end
  table.sort(names)
  return names
end

local function usage(out)
  out:write("moonshard ", host.version, ": a Lua-scriptable inference runtime for large language models\n\n")
  out:write("usage: moonshard COMMAND [args...]   run scripts/COMMAND.lua\n")
  out:write("       moonshard FILE.lua [args...]  run a Lua script\n")
  out:write("       moonshard -e CODE             run a Lua chunk\n")
  out:write("       moonshard --help | --version\n\ncommands:\n")
  for _, name in ipairs(list_commands()) do
    out:write(string.format("  %-12s %s\n", name, script_summary(host.scripts .. "/" .. name .. ".lua")))
  end
  out:write("\n`moonshard COMMAND --help` shows a command's options.\n")
end

-- Runs chunk with args as `...` and as the global `arg`; returns the exit code.
local function run_chunk(chunk, name, args)
  local script_arg = { [0] = name }
  for i, a in ipairs(args) do script_arg[i] = a end
  _G.arg = script_arg
  local ok, err = xpcall(chunk, function(e)
    return e ~= nil and debug.traceback(tostring(e), 2) or nil
  end, unpack(args))
  if not ok then
    if err ~= nil then io.stderr:write("moonshard: ", err, "\n") end -- error() with no message: exit quietly
    return 1
  end
  return type(err) == "number" and err or 0
end

-- os.exit closes the Lua state by default here, so finalizers release what the library holds
-- (tensors, files, communicators) before the process ends.
local raw_exit = os.exit
os.exit = function(code, close)
  if close == nil then close = true end
  io.stdout:flush()
  return raw_exit(code, close)
end

function M.main(argv)
  local first = argv[1]
  local rest = {}
  for i = 2, #argv do rest[#rest + 1] = argv[i] end
  if first == nil or first == "--help" or first == "-h" or first == "help" then
    usage(io.stdout)
    return first == nil and 2 or 0
  end
  if first == "--version" or first == "-v" then
    local C = require("moonshard.core").C
    io.stdout:write("moonshard ", require("ffi").string(C.msh_version()), "\n")
    return 0
  end
  if first == "-e" then
    if not rest[1] then
      io.stderr:write("moonshard: -e needs a Lua chunk\n")
      return 2
    end
    local code = table.remove(rest, 1)
    local chunk, err = loadstring(code, "=(command line)")
    if not chunk then
      io.stderr:write("moonshard: ", err, "\n")
      return 2
    end
    return run_chunk(chunk, "-e", rest)
  end
  local path
  if first:match("%.lua$") or first:find("/", 1, true) then
    path = first
  else
    path = host.scripts .. "/" .. first .. ".lua"
    if not io.open(path, "r") then
      io.stderr:write("moonshard: unknown command '", first, "' (see moonshard --help)\n")
      return 2
    end
  end
  local chunk, err = loadfile(path)
  if not chunk then
    io.stderr:write("moonshard: ", err, "\n")
    return 2
  end
  return run_chunk(chunk, path, rest)
end

return M
