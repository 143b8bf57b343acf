-- moonshard.validate: one check for every value that arrives from outside (config.json and GGUF
-- metadata fields, tokenizer files, command-line values): type, range, finiteness and allowed
-- values, with the place, the name and what was wrong in the message.
--
--   local V = require "moonshard.validate"
--   local eps = V.field(cfg, "rms_norm_eps", { type = "number", gt = 0, default = 1e-6 }, path .. "/config.json")
--   --> 'dir/config.json': field 'rms_norm_eps' must be a positive finite number (got "x")
--
-- spec:
--   type       "int" | "number" | "string" | "boolean" | "table" | "list"
--   min, max   inclusive bounds (numbers, ints; for strings and lists: the length)
--   gt         exclusive lower bound (gt = 0: positive)
--   finite     numbers must be finite (default true; NaN is never accepted)
--   enum       the allowed values, listed in the message
--   required   absent (nil, or cjson.null) is an error
--   default    the value when absent
--   elem       a spec for each element of a list
--   int_or_list  an int or a non-empty list of ints (eos_token_id)
--   pattern    a Lua pattern a string must match, with `what` describing it in the message
-- A bad value raises error(msg, 0): callers that read outside input run inside a pcall (the
-- loaders) or let the message end the command (one line, no traceback).
local M = {}

local MAX_SAFE = 2 ^ 53 -- doubles hold every integer up to here exactly

-- cjson.null is a lightuserdata NULL; absent values are nil or that
local null
do
  local ok, cjson = pcall(require, "cjson")
  null = ok and cjson.null or nil
end

function M.absent(v)
  return v == nil or (null ~= nil and v == null)
end

-- How a value is shown in a message: strings quoted, tables by kind, long things cut.
function M.show(v)
  local t = type(v)
  if t == "string" then
    local s = v
    if #s > 40 then s = s:sub(1, 37) .. "..." end
    return (string.format("%q", s):gsub("\\\n", "\\n"))
  end
  if t == "number" then
    if v ~= v then return "nan" end
    if v == math.huge then return "inf" end
    if v == -math.huge then return "-inf" end
    if v % 1 == 0 and math.abs(v) < 1e16 then return string.format("%d", v) end
    return string.format("%.17g", v)
  end
  if t == "table" then
    if next(v) == nil then return "an empty table" end
    return rawget(v, 1) ~= nil and "a list" or "an object"
  end
  if M.absent(v) then return "null" end
  return tostring(v)
end

local function num_bounds_text(spec)
  local parts = {}
  if spec.gt ~= nil then
    parts[#parts + 1] = spec.gt == 0 and "positive" or ("greater than " .. M.show(spec.gt))
  end
  if spec.min ~= nil and spec.max ~= nil then
    parts[#parts + 1] = "in " .. M.show(spec.min) .. ".." .. M.show(spec.max)
  elseif spec.min ~= nil then
    parts[#parts + 1] = "at least " .. M.show(spec.min)
  elseif spec.max ~= nil then
    parts[#parts + 1] = "at most " .. M.show(spec.max)
  end
  return parts
end

-- What the spec asks for, as a phrase: "a positive finite number", "an integer in 1..8".
function M.describe(spec)
  local t = spec.type
  if spec.enum then
    local names = {}
    for i, e in ipairs(spec.enum) do names[i] = type(e) == "string" and e or M.show(e) end
    return "one of " .. table.concat(names, ", ")
  end
  if spec.int_or_list then return "an integer or a list of integers" end
  if t == "number" or t == "int" then
    local parts = num_bounds_text(spec)
    local finite = t == "number" and spec.finite ~= false
    local noun = t == "int" and "integer" or (finite and "finite number" or "number")
    local pre = #parts > 0 and parts[1]:match("^[%a%-]+$") and table.remove(parts, 1) or nil
    local s = (pre and (pre .. " ") or "") .. noun
    if #parts > 0 then s = s .. " " .. table.concat(parts, " ") end
    return (s:match("^[aeiou]") and "an " or "a ") .. s
  end
  if t == "string" then return spec.what or "a string" end
  if t == "boolean" then return "true or false" end
  if t == "list" then return spec.elem and ("a list of " .. M.describe(spec.elem):gsub("^an? ", "") .. "s") or "a list" end
  if t == "table" then return "an object" end
  return "a " .. tostring(t)
end

local function where_prefix(where)
  if where == nil or where == "" then return "" end
  return "'" .. where .. "': "
end

-- The message for a bad value. `name` is "field 'x'" for a config field or "--x" for an option.
local function fail(spec, where, name, v, extra)
  error(string.format("%s%s must be %s (got %s)%s", where_prefix(where), name, M.describe(spec), M.show(v),
    extra or ""), 0)
end

local function check_number(v, spec, where, name)
  if type(v) ~= "number" then fail(spec, where, name, v) end
  if v ~= v then fail(spec, where, name, v) end
  if spec.type == "int" then
    if v % 1 ~= 0 or v == math.huge or v == -math.huge then fail(spec, where, name, v) end
    if math.abs(v) >= MAX_SAFE then
      fail(spec, where, name, v, " (integers from 2^53 = 9007199254740992 up cannot be held exactly)")
    end
  elseif spec.finite ~= false and (v == math.huge or v == -math.huge) then
    fail(spec, where, name, v)
  end
  if spec.gt ~= nil and not (v > spec.gt) then fail(spec, where, name, v) end
  if spec.min ~= nil and v < spec.min then fail(spec, where, name, v) end
  if spec.max ~= nil and v > spec.max then fail(spec, where, name, v) end
  return v
end

local function is_list(v)
  if type(v) ~= "table" then return false end
  local n = 0
  for _ in pairs(v) do n = n + 1 end
  for i = 1, n do
    if v[i] == nil then return false end
  end
  return true
end

-- M.check(value, spec, where, name) -> the value (spec.default when absent) | raises
--   where: the file or source ("dir/config.json", "command line"); name: how the value is named
function M.check(v, spec, where, name)
  name = name or "value"
  if M.absent(v) then
    if spec.required then
      local what = (spec.type or spec.enum or spec.int_or_list) and (" (" .. M.describe(spec) .. ")") or ""
      if name:match("^field ") then -- 'dir/config.json': missing field 'hidden_size' (a positive integer)
        error(string.format("%smissing %s%s", where_prefix(where), name, what), 0)
      end
      error(string.format("%s%s is required%s", where_prefix(where), name, what), 0)
    end
    return spec.default
  end
  if spec.enum then
    for _, e in ipairs(spec.enum) do
      if v == e then return v end
    end
    fail(spec, where, name, v)
  end
  if spec.int_or_list then
    local int = { type = "int", min = spec.min, max = spec.max }
    if type(v) == "number" then
      if not pcall(check_number, v, int, where, name) then fail(spec, where, name, v) end
      return v
    end
    if not is_list(v) or #v == 0 then fail(spec, where, name, v) end
    for i, x in ipairs(v) do
      if type(x) ~= "number" or not pcall(check_number, x, int, where, name) then
        fail(spec, where, name, v, string.format(" (element %d is %s)", i, M.show(x)))
      end
    end
    return v
  end
  local t = spec.type
  if t == "int" or t == "number" then return check_number(v, spec, where, name) end
  if t == "string" then
    if type(v) ~= "string" then fail(spec, where, name, v) end
    if spec.min and #v < spec.min then fail(spec, where, name, v) end
    if spec.max and #v > spec.max then fail(spec, where, name, v) end
    if spec.pattern and not v:match(spec.pattern) then fail(spec, where, name, v) end
    return v
  end
  if t == "boolean" then
    if type(v) ~= "boolean" then fail(spec, where, name, v) end
    return v
  end
  if t == "table" then
    if type(v) ~= "table" then fail(spec, where, name, v) end
    return v
  end
  if t == "list" then
    if not is_list(v) then fail(spec, where, name, v) end
    if spec.min and #v < spec.min then fail(spec, where, name, v) end
    if spec.max and #v > spec.max then fail(spec, where, name, v) end
    if spec.elem then
      -- every element is required (a JSON list's null is one that is absent)
      local elem = spec.elem.required and spec.elem or setmetatable({ required = true }, { __index = spec.elem })
      for i, x in ipairs(v) do
        local ok, err = pcall(M.check, x, elem, nil, "element")
        if not ok then
          fail(spec, where, name, v, string.format(" (element %d: %s)", i, err))
        end
      end
    end
    return v
  end
  if t ~= nil then error("validate: unknown type '" .. tostring(t) .. "' in a spec", 2) end
  return v
end

-- M.field(tbl, key, spec, where) -> tbl[key] checked (spec.default when absent) | raises
function M.field(tbl, key, spec, where)
  if type(tbl) ~= "table" then
    error(string.format("%sexpected an object holding field '%s' (got %s)", where_prefix(where), key, M.show(tbl)), 0)
  end
  return M.check(tbl[key], spec, where, "field '" .. tostring(key) .. "'")
end

-- M.try(fn, ...) -> fn's results | nil, message: a check's error as a return value.
function M.try(fn, ...)
  local res = { pcall(fn, ...) }
  if not res[1] then return nil, res[2] end
  return unpack(res, 2, table.maxn(res))
end

-- ------------------------------------------------------------------ values from the command line

-- The weights' dtypes a --dtype may name.
M.DTYPES = { "native", "f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "i8g32", "i8g64", "i8g128", "i4g32",
  "i4g64", "i4g128" }

-- M.pp_layers(s) -> list of { first, last } (0-based, inclusive) | nil, message
-- "0-12,13-25": ranges in order, each non-empty, each starting where the previous ended.
function M.pp_layers(s)
  if type(s) ~= "string" or s == "" then return nil, "expects ranges like 0-12,13-25" end
  local out, want = {}, 0
  for part in (s .. ","):gmatch("([^,]*),") do
    local a, b = part:match("^%s*(%d+)%s*%-%s*(%d+)%s*$")
    if not a then
      return nil, string.format("expects ranges like 0-12,13-25 (got '%s': '%s' is not FIRST-LAST)", s, part)
    end
    a, b = tonumber(a), tonumber(b)
    if b < a then return nil, string.format("has the range %d-%d, which ends before it starts", a, b) end
    if a ~= want then
      return nil, string.format("has a range starting at layer %d where %d was expected (ranges are contiguous from 0)", a, want)
    end
    out[#out + 1] = { a, b }
    want = b + 1
  end
  return out
end

-- M.device(s) -> s | nil, message: "cpu", "cuda" or "cuda:N"
function M.device(s)
  if s == "cpu" or s == "cuda" or (type(s) == "string" and s:match("^cuda:%d+$")) then return s end
  return nil, string.format("expects cpu, cuda or cuda:N (got '%s')", tostring(s))
end

-- M.utf8(s) -> true | nil, byte offset (1-based) of the first byte that is not valid UTF-8
function M.utf8(s)
  local i, n = 1, #s
  while i <= n do
    local c = s:byte(i)
    local len
    if c < 0x80 then len = 1
    elseif c >= 0xC2 and c <= 0xDF then len = 2
    elseif c >= 0xE0 and c <= 0xEF then len = 3
    elseif c >= 0xF0 and c <= 0xF4 then len = 4
    else return nil, i end
    if i + len - 1 > n then return nil, i end
    for k = i + 1, i + len - 1 do
      local d = s:byte(k)
      if d < 0x80 or d > 0xBF then return nil, i end
    end
    if len == 3 then
      local d = s:byte(i + 1)
      if (c == 0xE0 and d < 0xA0) or (c == 0xED and d > 0x9F) then return nil, i end
    elseif len == 4 then
      local d = s:byte(i + 1)
      if (c == 0xF0 and d < 0x90) or (c == 0xF4 and d > 0x8F) then return nil, i end
    end
    i = i + len
  end
  return true
end

-- M.input_path(path, what) -> path | nil, message: a path a command will open for reading must be
-- a regular file or a folder (a FIFO or a device would block or never end); a symlink loop is
-- named as one. A path that does not exist passes: the loader says so with its own context.
function M.input_path(path, what)
  local uv = require "luv"
  what = what or "path"
  local st, err = uv.fs_stat(path)
  if not st then
    if tostring(err):match("^ELOOP") then
      return nil, string.format("'%s': too many levels of symbolic links (a symlink loop?)", path)
    end
    if tostring(err):match("^ENOTDIR") or tostring(err):match("^ENOENT") then return path end
    return nil, string.format("'%s': %s", path, tostring(err))
  end
  if st.type ~= "file" and st.type ~= "directory" then
    local kind = st.type == "fifo" and "a FIFO (named pipe)" or st.type == "char" and "a character device"
      or st.type == "block" and "a block device" or st.type == "socket" and "a socket" or ("a " .. tostring(st.type))
    return nil, string.format("'%s' is %s, not a regular file or a folder: the %s must be a file", path, kind, what)
  end
  return path
end

return M
