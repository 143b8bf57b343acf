-- Shared helpers for the Lua specs.
local host = require "moonshard.host"

local M = {}

M.root = host.root
M.exe = host.exe
M.data = host.root .. "/../shared/data"
M.stories = M.data .. "/models/stories260K"
M.hf = host.root .. "/tests/fixtures/hf-tiny"

local function shell_quote(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end
M.q = shell_quote

-- Runs the moonshard executable with args (a list); returns stdout, stderr, exit code.
-- A command that outlives this many seconds is killed (its exit status is then 124): a hung
-- child fails its spec instead of stalling the suite.
M.run_timeout = 300

function M.run(args, stdin)
  local tmp = os.tmpname()
  local parts = { "timeout", "-k", "10", tostring(M.run_timeout), shell_quote(M.exe) }
  for _, a in ipairs(args) do parts[#parts + 1] = shell_quote(a) end
  local cmd = table.concat(parts, " ") .. " 2>" .. tmp
  if stdin then
    local inf = os.tmpname()
    local f = assert(io.open(inf, "wb"))
    f:write(stdin)
    f:close()
    cmd = cmd .. " <" .. inf
  else
    cmd = cmd .. " </dev/null"
  end
  cmd = cmd .. "; echo \"::exit=$?\""
  local p = assert(io.popen(cmd, "r"))
  local out = p:read("*a")
  p:close()
  local code = tonumber(out:match("::exit=(%d+)%s*$"))
  out = out:gsub("::exit=%d+%s*$", "")
  local f = io.open(tmp, "rb")
  local err = f and f:read("*a") or ""
  if f then f:close() end
  os.remove(tmp)
  return out, err, code
end

function M.read(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("*a")
  f:close()
  return s
end

function M.write(path, s)
  local f = assert(io.open(path, "wb"))
  f:write(s)
  f:close()
end

-- A fresh temporary directory (removed by M.rmdir).
function M.tmpdir()
  local p = os.tmpname()
  os.remove(p)
  assert(os.execute("mkdir -p " .. shell_quote(p)) == 0)
  return p
end

function M.rmdir(p)
  os.execute("rm -rf " .. shell_quote(p))
end

function M.copy_dir(src, dst)
  assert(os.execute("cp -r " .. shell_quote(src) .. " " .. shell_quote(dst)) == 0)
end

-- max |a[i] - b[i]| over two equal-length arrays
function M.max_abs_diff(a, b)
  assert(#a == #b, string.format("lengths differ: %d vs %d", #a, #b))
  local m = 0
  for i = 1, #a do
    local d = math.abs(a[i] - b[i])
    if d ~= d then return math.huge end
    if d > m then m = d end
  end
  return m
end

return M
