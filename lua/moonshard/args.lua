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
-- On --help the usage is printed and os.exit(0); on a bad option, a message names it and
-- os.exit(2).
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
    lines[#lines + 1] = string.format("  %-22s %s%s", left, help or "", extra)
  end
  lines[#lines + 1] = string.format("  %-22s %s", "--help", "show this help")
  return table.concat(lines, "\n") .. "\n"
end

local function convert(o, raw)
  local kind = o[2]
  if kind == "string" then return raw end
  local n = tonumber(raw)
  if not n then return nil, string.format("--%s expects a number, got '%s'", o[1], raw) end
  if kind == "int" and n % 1 ~= 0 then
    return nil, string.format("--%s expects an integer, got '%s'", o[1], raw)
  end
  if o.min and n < o.min then return nil, string.format("--%s must be at least %s (got %s)", o[1], o.min, raw) end
  if o.max and n > o.max then return nil, string.format("--%s must be at most %s (got %s)", o[1], o.max, raw) end
  return n
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

function M.parse(argv, spec)
  local opts, err = M.try_parse(argv, spec)
  if opts then return opts, err end
  if err == "help" then
    io.stdout:write(M.usage(spec))
    os.exit(0)
  end
  io.stderr:write("moonshard: ", err, "\n", M.usage(spec))
  os.exit(2)
end

return M
