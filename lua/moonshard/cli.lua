-- moonshard.cli: the host's command line. `moonshard FILE.lua args`, `moonshard NAME args`
-- (scripts/NAME.lua), `moonshard -e CODE`, `moonshard --help`, `moonshard help NAME`,
-- `moonshard --version`.
--
-- Errors: a script's error prints one line, `moonshard: MESSAGE`, and exits 1. The traceback is
-- printed too with `--debug` (before the command or among its options) or MOONSHARD_DEBUG=1.
local host = require "moonshard.host"
local ffi = require "ffi"

ffi.cdef [[
typedef struct _IO_FILE FILE;
int ferror(FILE *stream);
]]

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
  out:write("       moonshard help COMMAND            a command's options\n")
  out:write("       moonshard --help | --version\n")
  out:write("       --debug (anywhere before the command's arguments end) shows tracebacks\n\ncommands:\n")
  for _, name in ipairs(list_commands()) do
    out:write(string.format("  %-12s %s\n", name, script_summary(host.scripts .. "/" .. name .. ".lua")))
  end
  out:write("\n`moonshard COMMAND --help` shows a command's options.\n")
end

-- Whether tracebacks are shown: --debug on the command line or MOONSHARD_DEBUG set (not "0").
function M.debug()
  local env = os.getenv("MOONSHARD_DEBUG")
  return host.debug == true or (env ~= nil and env ~= "" and env ~= "0")
end

-- The one line a user sees for an error value: its first line, without the traceback.
function M.message(e)
  local s = tostring(e)
  return (s:match("^([^\n]*)"))
end

-- True when something written to stdout was lost (a full disk, a closed pipe read end ...).
local function stdout_failed()
  io.stdout:flush()
  return ffi.C.ferror(io.stdout) ~= 0
end
M.stdout_failed = stdout_failed

-- Runs chunk with args as `...` and as the global `arg`; returns the exit code.
local function run_chunk(chunk, name, args)
  local script_arg = { [0] = name }
  for i, a in ipairs(args) do script_arg[i] = a end
  _G.arg = script_arg
  local ok, err = xpcall(chunk, function(e)
    if e == nil then return nil end
    return { msg = tostring(e), trace = debug.traceback(tostring(e), 2) }
  end, unpack(args))
  if not ok then
    -- error() with no message: exit quietly
    if err ~= nil then
      io.stderr:write("moonshard: ", M.debug() and err.trace or M.message(err.msg), "\n")
    end
    return 1
  end
  local code = type(err) == "number" and err or 0
  if code == 0 and stdout_failed() then
    io.stderr:write("moonshard: error writing to stdout (output lost)\n")
    return 1
  end
  return code
end

-- os.exit closes the Lua state by default here, so finalizers release what the library holds
-- (tensors, files, communicators) before the process ends. A lost write to stdout turns a
-- successful exit into a failure.
local raw_exit = os.exit
os.exit = function(code, close)
  if close == nil then close = true end
  if (code == nil or code == 0 or code == true) and stdout_failed() then
    io.stderr:write("moonshard: error writing to stdout (output lost)\n")
    code = 1
  end
  io.stdout:flush()
  return raw_exit(code, close)
end

-- Takes the --debug flags out of the host's own options (before the command).
local function strip_debug(argv)
  local out = {}
  local i = 1
  while argv[i] == "--debug" do
    host.debug = true
    i = i + 1
  end
  for k = i, #argv do out[#out + 1] = argv[k] end
  return out
end

function M.main(argv)
  argv = strip_debug(argv)
  local first = argv[1]
  local rest = {}
  for i = 2, #argv do rest[#rest + 1] = argv[i] end
  if first == "help" and rest[1] then
    -- `moonshard help NAME`: NAME's own help
    first, rest = rest[1], { "--help" }
  elseif first == nil or first == "--help" or first == "-h" or first == "help" then
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
