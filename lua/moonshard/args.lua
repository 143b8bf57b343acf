-- moonshard.args: command-line options from a declarative spec.
--
--   local opts = args.parse(arg, {
--     usage = "moonshard generate --model PATH [options]",
--     { "model", "string", "model path (file or directory)", required = true },
--     { "max-tokens", "int", "tokens to generate", default = 256 },
--     { "temperature", "number", "sampling temperature (0: greedy)", default = 1.0 },
--     { "verbose", "flag", "print more" },
--   })
-- Options are --name VALUE or --name=VALUE; results use underscores (opts.max_tokens).
-- On --help the usage is printed and os.exit(0); on a bad option, one line names it (with a hint
-- to --help) and os.exit(2).
--
-- Values are checked by moonshard.validate: numbers must be finite, ints exact (at most 2^53);
-- an option may also carry min, max, enum = { ... } (the allowed values, listed in the usage and
-- in the message), check = function(v) -> v | nil, message, and input = "what" (a path the
-- command reads: a FIFO, a device or a symlink loop is refused before anything opens it).
-- `--debug` is understood by every command: it shows tracebacks (moonshard.cli).
local V = require "moonshard.validate"

local M = {}

local function key(name) return (name:gsub("-", "_")) end

function M.usage(spec)
  local lines = { "usage: " .. (spec.usage or "moonshard COMMAND [options]") }
  if spec.summary then lines[#lines + 1] = "\n" .. spec.summary end
  lines[#lines + 1] = "\noptions:"
  for _, o in ipairs(spec) do
    local name, kind, help = o[1], o[2], o[3]
    local left = "--" .. name .. (kind == "flag" and "" or " " .. (kind == "int" and "N" or kind == "number" and "X" or "S"))
    local extra = o.default ~= nil and string.format(" (default %s)", tostring(o.default)) or ""
    if o.required then extra = " (required)" end
    if o.enum then extra = " (" .. table.concat(o.enum, ", ") .. ")" .. extra end
    lines[#lines + 1] = string.format("  %-22s %s%s", left, help or "", extra)
  end
  lines[#lines + 1] = string.format("  %-22s %s", "--help", "show this help")
  return table.concat(lines, "\n") .. "\n"
end

-- tonumber accepts "0x10", "1e3", " 5 ", "nan" and "inf"; a command-line number is a plain
-- decimal (an int: digits, an optional sign)
local function to_number(kind, raw)
  local s = raw:match("^%s*(.-)%s*$")
  if kind == "int" then
    if not s:match("^[+-]?%d+$") then return nil end
  elseif not (s:match("^[+-]?%d+%.?%d*$") or s:match("^[+-]?%d*%.%d+$") or s:match("^[+-]?%d+%.?%d*[eE][+-]?%d+$")
      or s:match("^[+-]?%d*%.%d+[eE][+-]?%d+$")) then
    return nil
  end
  return tonumber(s)
end

local function convert(o, raw)
  local kind = o[2]
  local name = "--" .. o[1]
  local v
  if kind == "string" then
    v = raw
    if o.enum then
      local ok, err = pcall(V.check, v, { type = "string", enum = o.enum }, nil, name)
      if not ok then return nil, err end
    end
  else
    local n = to_number(kind, raw)
    if not n then
      if kind == "int" and to_number("number", raw) then
        return nil, string.format("%s expects an integer, got '%s'", name, raw)
      end
      return nil, string.format("%s expects a %snumber, got '%s'", name, kind == "int" and "" or "finite ", raw)
    end
    local ok, err = pcall(V.check, n, { type = kind, min = o.min, max = o.max, enum = o.enum }, nil, name)
    if not ok then return nil, err end
    v = n
  end
  if o.input then
    local ok, err = V.input_path(v, o.input)
    if not ok then return nil, err end
  end
  if o.check then
    local cv, err = o.check(v)
    if cv == nil then return nil, string.format("%s %s", name, err or "is not valid") end
    v = cv
  end
  return v
end

-- M.try_parse(argv, spec) -> opts, positional | nil, message | "help"
function M.try_parse(argv, spec)
  local byname = {}
  for _, o in ipairs(spec) do byname[o[1]] = o end
  local opts, positional = {}, {}
  local i = 1
  while i <= #argv do
    local a = argv[i]
    if a == "--help" or a == "-h" then return nil, "help" end
    if a == "--debug" and not byname.debug then
      package.loaded["moonshard.host"].debug = true
      i = i + 1
      goto continue
    end
    local name, inline = a:match("^%-%-([%w%-_]+)=(.*)$")
    if not name then name = a:match("^%-%-([%w%-_]+)$") end
    if name then
      local o = byname[name] or byname[name:gsub("_", "-")]
      if not o then return nil, string.format("unknown option --%s", name) end
      if o[2] == "flag" then
        if inline then return nil, string.format("--%s takes no value", name) end
        opts[key(o[1])] = true
      else
        local raw = inline
        if raw == nil then
          i = i + 1
          raw = argv[i]
          if raw == nil then return nil, string.format("--%s needs a value", name) end
        end
        local v, err = convert(o, raw)
        if v == nil then return nil, err end
        opts[key(o[1])] = v
      end
    elseif spec.positional then
      positional[#positional + 1] = a
    else
      return nil, string.format("unexpected argument '%s'", a)
    end
    i = i + 1
    ::continue::
  end
  for _, o in ipairs(spec) do
    local k = key(o[1])
    if opts[k] == nil then
      if o.required then return nil, string.format("--%s is required", o[1]) end
      opts[k] = o.default
    end
  end
  return opts, positional
end

-- The command's name from its usage line ("moonshard generate --model ..." -> "moonshard generate").
function M.command(spec)
  local u = spec.usage or "moonshard"
  return u:match("^(moonshard %S+)") or u:match("^(%S+)") or "moonshard"
end

function M.parse(argv, spec)
  local opts, err = M.try_parse(argv, spec)
  if opts then return opts, err end
  if err == "help" then
    io.stdout:write(M.usage(spec))
    os.exit(0)
  end
  local cmd = M.command(spec)
  io.stderr:write(cmd, ": ", err, " (see `", cmd, " --help`)\n")
  os.exit(2)
end

return M
