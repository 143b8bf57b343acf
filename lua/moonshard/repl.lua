-- moonshard.repl: an interactive LuaJIT prompt. Line editing and history come from libedit when
-- stdin is a terminal; piped input is read line by line. Expressions print their values,
-- incomplete input continues on the next line, and errors print a traceback to stderr without
-- ending the session (M.run counts them: a piped session with errors exits non-zero).
-- `moonshard` is preloaded as a global.
local ffi = require "ffi"

local M = {}

ffi.cdef [[
char *readline(const char *prompt);
int add_history(const char *line);
int read_history(const char *filename);
int write_history(const char *filename);
void using_history(void);
int isatty(int fd);
void free(void *p);
]]

local C = ffi.C

-- A short, readable rendering of a value (tables one level deep, keys sorted).
local function render(v, depth)
  local t = type(v)
  if t == "string" then return string.format("%q", v) end
  if t ~= "table" then return tostring(v) end
  local mt = getmetatable(v)
  if mt and mt.__tostring then return tostring(v) end
  depth = depth or 0
  if depth > 1 then return tostring(v) end
  local parts, n = {}, 0
  for i = 1, #v do
    n = n + 1
    if n > 32 then parts[#parts + 1] = "..." break end
    parts[#parts + 1] = render(v[i], depth + 1)
  end
  local keys = {}
  for k in pairs(v) do
    if not (type(k) == "number" and k >= 1 and k <= #v and k % 1 == 0) then keys[#keys + 1] = k end
  end
  table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
  for i, k in ipairs(keys) do
    if i > 32 then parts[#parts + 1] = "..." break end
    local ks = type(k) == "string" and k:match("^[%a_][%w_]*$") and k or "[" .. render(k, 2) .. "]"
    parts[#parts + 1] = ks .. " = " .. render(v[k], depth + 1)
  end
  return "{ " .. table.concat(parts, ", ") .. " }"
end
M.render = render

-- Compiles a chunk: an expression first (so `1 + 1` prints 2), then a statement.
-- Returns fn, or nil and "incomplete", or nil and the syntax error.
function M.compile(src)
  local fn = loadstring("return " .. src, "=stdin")
  if fn then return fn end
  local err
  fn, err = loadstring(src, "=stdin")
  if fn then return fn end
  if err:match("<eof>$") or err:match("<eof>'?$") then return nil, "incomplete" end
  return nil, err
end

-- Runs one complete chunk; writes its values to `out` and its error to `err_out` (default
-- io.stderr). Returns true if it ran.
function M.eval(src, out, err_out)
  err_out = err_out or io.stderr
  local fn, err = M.compile(src)
  if not fn then
    out:flush()
    err_out:write(err, "\n")
    return false
  end
  local res = { xpcall(fn, debug.traceback) }
  if not res[1] then
    out:flush()
    err_out:write(tostring(res[2]), "\n")
    return false
  end
  local n = table.maxn(res)
  if n > 1 then
    local parts = {}
    for i = 2, n do parts[#parts + 1] = render(res[i]) end
    out:write(table.concat(parts, "\t"), "\n")
  end
  return true
end

local function history_path()
  local home = os.getenv("HOME")
  return os.getenv("MOONSHARD_HISTORY") or (home and home .. "/.moonshard_history")
end

-- M.run{ input = io.stdin, out = io.stdout, err = io.stderr } -> number of chunks that failed,
-- whether the session was interactive. Other front ends (moonshard attach) reuse the reader:
--   opts.eval(src) -> ok      runs one complete chunk instead of M.eval (here, in this process)
--   opts.command(line) -> ok  a line starting with ':' outside a multi-line chunk (:ranks ...)
--   opts.banner               the first line of an interactive session
function M.run(opts)
  opts = opts or {}
  local out = opts.out or io.stdout
  local err_out = opts.err or io.stderr
  local eval = opts.eval or function(src) return M.eval(src, out, err_out) end
  local failures = 0
  local interactive = opts.input == nil and C.isatty(0) ~= 0
  local hist = interactive and history_path()
  if interactive then
    C.using_history()
    if hist then C.read_history(hist) end
    out:write(opts.banner or ("moonshard " .. require("moonshard").version .. " (" .. jit.version .. "); Ctrl-D exits"), "\n")
  end
  local input = opts.input or io.stdin
  local function read(prompt)
    if interactive then
      local p = C.readline(prompt)
      if p == nil then return nil end
      local s = ffi.string(p)
      C.free(p)
      return s
    end
    return input:read("*l")
  end
  local buf = nil
  while true do
    local line = read(buf and ">> " or "> ")
    if line == nil then break end
    if interactive and line:match("%S") then C.add_history(line) end
    local src = buf and (buf .. "\n" .. line) or line
    if src:match("^%s*$") then
      buf = nil
    elseif not buf and opts.command and line:match("^%s*:") then
      if not opts.command(line:match("^%s*(.-)%s*$")) then failures = failures + 1 end
      out:flush()
    else
      local fn, err = M.compile(src)
      if not fn and err == "incomplete" then
        buf = src
      else
        buf = nil
        if not eval(src) then failures = failures + 1 end
        out:flush()
      end
    end
  end
  if buf and not eval(buf) then failures = failures + 1 end
  if interactive then
    out:write("\n")
    if hist then C.write_history(hist) end
  end
  return failures, interactive
end

return M
