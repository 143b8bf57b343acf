-- Shared helpers for the Lua specs.
local host = require "moonshard.host"

local M = {}

M.root = host.root
M.exe = host.exe
M.data = host.root .. "/../shared/data"
M.stories = M.data .. "/models/stories260K"
M.hf = host.root .. "/tests/fixtures/hf-tiny"
M.arch = host.root .. "/tests/fixtures/arch" -- Qwen2, Qwen3, Mistral (tools/make_arch_fixtures.py)

local function shell_quote(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end
M.q = shell_quote

-- Runs the moonshard executable with args (a list); returns stdout, stderr, exit code.
-- A command that outlives this many seconds is killed (its exit status is then 124): a hung
-- child fails its spec instead of stalling the suite.
M.run_timeout = 300

-- env: a table of variables set for the command.
function M.run(args, stdin, env)
  local tmp = os.tmpname()
  local parts = { "timeout", "-k", "10", tostring(M.run_timeout), shell_quote(M.exe) }
  if env then
    local names = {}
    for k in pairs(env) do names[#names + 1] = k end
    table.sort(names)
    for i = #names, 1, -1 do table.insert(parts, 1, names[i] .. "=" .. shell_quote(env[names[i]])) end
    table.insert(parts, 1, "env")
  end
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

-- Runs a shell script; returns its stdout and exit status.
function M.sh(script)
  local p = assert(io.popen(script .. "\necho \"::exit=$?\"", "r"))
  local out = p:read("*a")
  p:close()
  local code = tonumber(out:match("::exit=(%d+)%s*$"))
  return out:gsub("::exit=%d+%s*$", ""), code
end

-- A process is gone when /proc has no entry for it or it is a zombie awaiting its reaper.
function M.running(pid)
  local f = io.open("/proc/" .. pid .. "/stat", "r")
  if not f then return false end
  local s = f:read("*a") or ""
  f:close()
  local state = s:match("^%d+ %b() (%a)")
  return state ~= nil and state ~= "Z" and state ~= "X"
end

function M.pids_in(dir, n)
  local pids = {}
  for r = 0, n - 1 do
    local f = io.open(dir .. "/pid." .. r, "r")
    if f then
      pids[#pids + 1] = tonumber(f:read("*a"))
      f:close()
    end
  end
  return pids
end

-- Starts `moonshard launch -n n --grace 3 SCRIPT DIR` in the background (each rank writes its pid
-- to DIR/pid.<rank>), waits for the n pid files, runs `action` (shell, with $L the launcher's pid
-- and $D the directory), then waits for the launcher. Returns its exit status, the seconds from
-- the action to its exit, and its stderr.
function M.launch_and(dir, n, script, action)
  local files = {}
  for r = 0, n - 1 do files[#files + 1] = string.format('[ ! -s "$D/pid.%d" ]', r) end
  local sh_script = string.format([[
    D=%s
    %s launch -n %d --grace 3 %s "$D" >"$D/out" 2>"$D/err" &
    L=$!
    i=0
    while %s; do
      i=$((i+1)); [ $i -gt 1200 ] && break; sleep 0.05
    done
    start=$(date +%%s)
    %s
    wait $L
    code=$?
    echo "code=$code seconds=$(( $(date +%%s) - start ))"
  ]], shell_quote(dir), shell_quote(M.exe), n, shell_quote(script),
    table.concat(files, " || "), action)
  local out = M.sh(sh_script)
  return tonumber(out:match("code=(%d+)")), tonumber(out:match("seconds=(%d+)")), M.read(dir .. "/err")
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
-- The Hugging Face fixtures' reference tensor `name` (token ids, transformers' logits) from
-- reference.safetensors: its values (a Lua array) and shape.
function M.reference(name, file)
  local moonshard, ffi = require "moonshard", require "ffi"
  local C, check = moonshard.C, moonshard.core.check
  local st, idx, t = ffi.new("msh_safetensors*[1]"), ffi.new("int[1]"), ffi.new("msh_tensor*[1]")
  check(C.msh_safetensors_open(st, file or (M.hf .. "/reference.safetensors")))
  local ok, err = pcall(function()
    check(C.msh_safetensors_find(st[0], name, idx))
    check(C.msh_safetensors_tensor(st[0], idx[0], t))
  end)
  local v, shape
  if ok then v, shape = t[0]:values(), t[0]:shape() end
  C.msh_tensor_free(t[0])
  C.msh_safetensors_free(st[0])
  if not ok then error(err, 2) end
  return v, shape
end

-- The largest difference from transformers' logits of a test checkpoint run on tp x pp CPU ranks
-- (tests/lua/parallel_logits.lua under `moonshard launch`; NAME as that script takes it, head
-- "replicated" or nil); fails the spec when the run fails.
function M.parallel_diff(name, tp, pp, head)
  local out, err, code = M.run { "launch", "-n", tostring(tp * pp), M.root .. "/tests/lua/parallel_logits.lua",
    name, tostring(tp), tostring(pp), "-", "-", head }
  assert(code == 0, err)
  local diff = tonumber(out:match("max_abs_diff (%S+)"))
  assert(diff, out .. err)
  return diff
end

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

-- Runs the libuv loop until cond() holds or `secs` pass; returns cond(). The timeout counts from
-- now: libuv's clock stands still while nothing runs the loop (a model's load, a synchronous spec),
-- and a timer started on the stale clock would fire at once. A 20 ms tick wakes the loop to look
-- again when no I/O would.
function M.wait_until(cond, secs)
  local uv = require "luv"
  local t, expired = uv.new_timer(), false
  uv.update_time()
  t:start(math.floor(secs * 1000), 0, function() expired = true end)
  local tick = uv.new_timer()
  tick:start(20, 20, function() end)
  while not cond() and not expired do uv.run("once") end
  tick:close()
  t:close()
  uv.run("nowait")
  return cond()
end

-- M.nan_stories(dir) -> dir: stories260K with every weight of the output norm set to NaN, written
-- into dir (llama2.c layout: a header of 7 int32, then the tensors in order; rms_final_weight
-- follows the layers' tensors), so that every logit is NaN
function M.nan_stories(dir)
  local bin = M.read(M.stories .. "/stories260K.bin")
  local hdr = require("ffi").cast("const int32_t*", bin)
  local dim, hidden, L, H, KVH, V = hdr[0], hdr[1], hdr[2], hdr[3], hdr[4], math.abs(hdr[5])
  local hd = dim / H
  local floats = V * dim + L * dim + L * dim * dim + 2 * L * dim * KVH * hd + L * dim * dim + L * dim
    + 3 * L * dim * hidden
  local off = 28 + floats * 4 -- rms_final_weight
  local nan = string.char(0x00, 0x00, 0xc0, 0x7f)
  bin = bin:sub(1, off) .. string.rep(nan, dim) .. bin:sub(off + dim * 4 + 1)
  M.write(dir .. "/model.bin", bin)
  M.write(dir .. "/tok512.bin", M.read(M.stories .. "/tok512.bin"))
  return dir
end

return M
