-- The distributed runtime on CPU ranks (loopback only): rank identity (torchrun and Slurm
-- variables, node lists), the process-group policy, the launcher (environment, output tags, exit
-- codes, a killed rank, forwarded signals, no process left behind), rendezvous failures, and
-- every collective between real processes on 2, 3 and 4 ranks.
local h = require "helpers"
local dist = require "moonshard.dist"
local groups = require "moonshard.policy.groups"
local launch = require "moonshard.launch"

local q = h.q

local sh, running, pids_in = h.sh, h.running, h.pids_in

describe("dist.identity", function()
  it("reads the torchrun variables", function()
    local id = assert(dist.identity { RANK = "3", WORLD_SIZE = "4", LOCAL_RANK = "1", LOCAL_WORLD_SIZE = "2",
      MASTER_ADDR = "10.1.2.3", MASTER_PORT = "29500" })
    assert.same({ source = "env", rank = 3, world = 4, local_rank = 1, local_world = 2, master_addr = "10.1.2.3",
      master_port = 29500 }, id)
  end)

  it("reads Slurm's variables, the master being the first node of the job", function()
    local id = assert(dist.identity { SLURM_PROCID = "5", SLURM_NTASKS = "7", SLURM_LOCALID = "0",
      SLURM_NODEID = "3", SLURM_TASKS_PER_NODE = "2(x3),1", SLURM_JOB_NODELIST = "node[01-04],other",
      SLURM_JOB_ID = "123456" })
    assert.are.equal("slurm", id.source)
    assert.are.equal(5, id.rank)
    assert.are.equal(7, id.world)
    assert.are.equal(1, id.local_world)
    assert.are.equal("node01", id.master_addr)
    assert.are.equal(15000 + 123456 % 20000, id.master_port)
    local id2 = assert(dist.identity { SLURM_PROCID = "1", SLURM_NTASKS = "2", SLURM_LOCALID = "1",
      SLURM_TASKS_PER_NODE = "2", SLURM_JOB_NODELIST = "gpu7", MASTER_PORT = "4000" })
    assert.are.equal("gpu7", id2.master_addr)
    assert.are.equal(4000, id2.master_port)
    assert.are.equal(2, id2.local_world)
  end)

  it("is a world of one without variables, and names bad ones", function()
    local id = assert(dist.identity {})
    assert.are.equal(1, id.world)
    assert.are.equal(0, id.rank)
    local _, err = dist.identity { RANK = "1" }
    assert.truthy(err:find("RANK and WORLD_SIZE", 1, true))
    _, err = dist.identity { RANK = "2", WORLD_SIZE = "2", MASTER_PORT = "1" }
    assert.truthy(err:find("rank 2 outside a world of 2", 1, true), err)
    _, err = dist.identity { RANK = "x", WORLD_SIZE = "2" }
    assert.truthy(err:find("RANK must be a non-negative integer", 1, true), err)
    _, err = dist.identity { RANK = "0", WORLD_SIZE = "2" }
    assert.truthy(err:find("MASTER_PORT", 1, true), err)
  end)

  it("expands Slurm node lists", function()
    assert.same({ "a", "b" }, dist.expand_nodelist("a,b"))
    assert.same({ "n1", "n2", "n3" }, dist.expand_nodelist("n[1-3]"))
    assert.same({ "n08", "n09", "n10", "x" }, dist.expand_nodelist("n[08-10],x"))
    assert.same({ "r1-n1", "r1-n2", "r2-n1", "r2-n2" }, dist.expand_nodelist("r[1-2]-n[1-2]"))
    assert.same({ "x1y", "x3y", "x4y" }, dist.expand_nodelist("x[1,3-4]y"))
    assert.are.equal("node01", dist.first_node("node[01-04],other"))
    for _, bad in ipairs { "n[1-", "n[a-b]", "", "a,,b", "n]1[" } do
      local list, err = dist.expand_nodelist(bad)
      assert.is_nil(list, bad)
      assert.truthy(err, bad)
    end
    assert.are.equal(2, dist.tasks_on_node("2(x3),1", 2))
    assert.are.equal(1, dist.tasks_on_node("2(x3),1", 3))
    assert.is_nil(dist.tasks_on_node("2(x3),1", 4))
  end)
end)

describe("policy.groups", function()
  it("lays out data x pipeline x tensor in Megatron's order", function()
    local g = assert(groups.grid { world = 8, tp = 2, pp = 2, ranks_per_node = 4 })
    assert.same({ tp = 2, pp = 2, dp = 2 }, g.sizes)
    assert.same({ { 0, 1 }, { 2, 3 }, { 4, 5 }, { 6, 7 } }, g.tp)
    assert.same({ { 0, 2 }, { 1, 3 }, { 4, 6 }, { 5, 7 } }, g.pp)
    assert.same({ { 0, 4 }, { 1, 5 }, { 2, 6 }, { 3, 7 } }, g.dp)
    assert.same({ dp = 1, pp = 1, tp = 0 }, g.coords[6])
    assert.same({ { 0, 1, 2, 3 } }, assert(groups.grid { world = 4, tp = 4 }).tp)
    assert.same({ { 0 }, { 1 }, { 2 } }, assert(groups.grid { world = 3 }).tp)
    assert.same({ 2, 1 }, { groups.find(g.pp, 3) })
  end)

  it("keeps tensor groups inside a node and the world divisible", function()
    local _, err = groups.grid { world = 4, tp = 4, ranks_per_node = 2 }
    assert.truthy(err:find("does not fit in nodes of 2 ranks", 1, true), err)
    _, err = groups.grid { world = 6, tp = 4 }
    assert.truthy(err:find("a world of 6 ranks does not split", 1, true), err)
    _, err = groups.grid { world = 4, tp = 2, hosts = { "a", "b", "b", "b" } }
    assert.truthy(err:find("spans hosts a and b", 1, true), err)
    assert.truthy(groups.grid { world = 4, tp = 4, ranks_per_node = 2, allow_cross_node = true })
    _, err = groups.grid { world = 4, tp = 0 }
    assert.truthy(err:find("tp must be a positive integer", 1, true), err)
  end)

  it("takes a user's table or function, checked", function()
    local g = assert(groups.resolve({ tp = { { 1, 0 }, { 3, 2 } }, pp = { { 0, 2 }, { 1, 3 } }, dp = { { 0 }, { 1 }, { 2 }, { 3 } } },
      { world = 4 }))
    assert.same({ tp = 2, pp = 2, dp = 1 }, g.sizes)
    assert.same({ tp = 0, pp = 1, dp = 0 }, g.coords[3])
    local called
    g = assert(groups.resolve(function(spec)
      called = spec.world
      return groups.grid { world = spec.world, tp = 1, pp = spec.world }
    end, { world = 2, tp = 2 }))
    assert.are.equal(2, called)
    assert.same({ { 0, 1 } }, g.pp)
    local _, err = groups.resolve({ tp = { { 0, 1 } }, pp = { { 0 }, { 1 } }, dp = { { 0 }, { 0 } } }, { world = 2 })
    assert.truthy(err:find("rank 0 is in two 'dp' groups", 1, true), err)
    _, err = groups.resolve({ tp = { { 0 } }, pp = { { 0 } }, dp = { { 0 } } }, { world = 2 })
    assert.truthy(err:find("rank 1 is in no 'tp' group", 1, true), err)
    _, err = groups.resolve(function() return nil, "no way" end, { world = 2 })
    assert.truthy(err:find("groups policy: no way", 1, true), err)
  end)
end)

describe("moonshard launch", function()
  local dir
  before_each(function() dir = h.tmpdir() end)
  after_each(function() h.rmdir(dir) end)

  it("parses its options and stops at the script", function()
    local o, script, rest = launch.parse { "-n", "2", "--master-port=4000", "generate", "--model", "x", "-n", "5" }
    assert.are.equal(2, o.nproc)
    assert.are.equal(4000, o.master_port)
    assert.are.equal("generate", script)
    assert.same({ "--model", "x", "-n", "5" }, rest)
    local _, err = launch.parse { "generate" }
    assert.truthy(err:find("-n N", 1, true), err)
    _, err = launch.parse { "-n", "2", "--node-rank", "1" }
    assert.truthy(err:find("outside 1 nodes", 1, true), err)
    local _, err2, code = h.run { "launch", "--frob", "x" }
    assert.are.equal(2, code)
    assert.truthy(err2:find("unknown option --frob", 1, true), err2)
  end)

  it("picks default rendezvous ports below the ephemeral range, free, and not all the same", function()
    local uv = require "luv"
    local seen, distinct = {}, 0
    for _ = 1, 8 do
      local p = launch.free_port()
      assert.truthy(p >= 20000 and p < 32000, p)
      local t = uv.new_tcp()
      assert.truthy(t:bind("127.0.0.1", p), p) -- still free right after
      t:close()
      if not seen[p] then distinct, seen[p] = distinct + 1, true end
    end
    assert.truthy(distinct >= 4, distinct)
  end)

  it("gives every rank its variables; tags every stream but rank 0's stdout", function()
    h.write(dir .. "/env.lua", [[
      local t = {}
      for _, k in ipairs { "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT" } do
        t[#t + 1] = k .. "=" .. tostring(os.getenv(k))
      end
      print(table.concat(t, " "))
      io.stdout:write("no newline at the end")
      io.stderr:write("err of ", os.getenv("RANK"), "\n")
    ]])
    local out, err, code = h.run { "launch", "-n", "3", dir .. "/env.lua" }
    assert.are.equal(0, code, err)
    local port = out:match("MASTER_PORT=(%d+)")
    assert.truthy(port, out)
    local lines = {}
    for l in out:gmatch("[^\n]+") do lines[l] = true end
    local rank0 = "RANK=0 WORLD_SIZE=3 LOCAL_RANK=0 LOCAL_WORLD_SIZE=3 MASTER_ADDR=127.0.0.1 MASTER_PORT=" .. port
    assert.truthy((out .. "\n"):find(rank0 .. "\nno newline at the end\n", 1, true), out)
    for r = 1, 2 do
      assert.truthy(lines[string.format("[rank %d] RANK=%d WORLD_SIZE=3 LOCAL_RANK=%d LOCAL_WORLD_SIZE=3 "
        .. "MASTER_ADDR=127.0.0.1 MASTER_PORT=%s", r, r, r, port)], out)
      assert.truthy(lines[string.format("[rank %d] no newline at the end", r)], out)
    end
    for r = 0, 2 do assert.truthy(err:find("[rank " .. r .. "] err of " .. r .. "\n", 1, true), err) end
    out = h.run { "launch", "-n", "2", "--tag-output", dir .. "/env.lua" }
    assert.truthy(out:find("[rank 0] RANK=0 ", 1, true), out)
  end)

  it("runs commands from scripts/ like the host does", function()
    local out, err, code = h.run { "launch", "-n", "2", "--tag-output", "generate", "--model", h.stories,
      "--max-tokens", "12", "--temperature", "0", "--threads", "1" }
    assert.are.equal(0, code, err)
    local single = h.run { "generate", "--model", h.stories, "--max-tokens", "12", "--temperature", "0", "--threads", "1" }
    assert.truthy(#single > 20, single)
    for r = 0, 1 do assert.truthy(out:find("[rank " .. r .. "] " .. single, 1, true), out) end
  end)

  it("numbers ranks node by node across launchers (two 'nodes' on this host)", function()
    local port = launch.free_port()
    local cmd = "%s launch -n 2 --nnodes 2 --node-rank %d --master-addr 127.0.0.1 --master-port %d "
      .. "--tag-output %s --timeout 20"
    local out, code = sh(string.format("(" .. cmd .. " >%s 2>&1; echo \"node1=$?\" >>%s) &\n" .. cmd
      .. " 2>&1; echo \"node0=$?\"; wait; cat %s",
      q(h.exe), 1, port, q(h.root .. "/tools/dist_check.lua"), q(dir .. "/n1"), q(dir .. "/n1"),
      q(h.exe), 0, port, q(h.root .. "/tools/dist_check.lua"), q(dir .. "/n1")))
    assert.are.equal(0, code)
    assert.truthy(out:find("node0=0", 1, true) and out:find("node1=0", 1, true), out)
    for r = 0, 3 do
      assert.truthy(out:find(string.format("[rank %d] rank %d of 4 (source env, local %d of 2", r, r, r % 2), 1, true), out)
    end
  end)

  it("exits with the first failing rank's status and stops the others", function()
    h.write(dir .. "/fail.lua", [[
      local uv = require "luv"
      if os.getenv("RANK") == "1" then os.exit(7) end
      uv.sleep(20000)
    ]])
    local t0 = os.time()
    local _, err, code = h.run { "launch", "-n", "3", "--grace", "2", dir .. "/fail.lua" }
    assert.are.equal(7, code)
    assert.truthy(err:find("rank 1 exited with status 7", 1, true), err)
    assert.truthy(os.time() - t0 < 10)
  end)

  local loop_script = [[
    local dist = require "moonshard.dist"
    local tensor = require "moonshard.tensor"
    local uv = require "luv"
    local pg = assert(dist.init { timeout = 10 })
    local f = io.open(arg[1] .. "/pid." .. pg.rank, "w") f:write(uv.os_getpid()) f:close()
    local t = tensor.from({ 1, 2, 3 })
    for _ = 1, 1e6 do
      local ok, err = pg.comm:all_reduce(t)
      if not ok then io.stderr:write(err, "\n") os.exit(1) end
      uv.sleep(5)
    end
  ]]

  local function launch_and(action)
    h.write(dir .. "/loop.lua", loop_script)
    return h.launch_and(dir, 3, dir .. "/loop.lua", action)
  end

  it("stops every rank when one is killed mid-run and names it", function()
    local code, secs, err = launch_and('kill -9 "$(cat "$D/pid.1")"')
    assert.are.equal(128 + 9, code, err)
    assert.truthy(secs <= 30)
    assert.truthy(err:find("rank 1 exited on signal 9 (SIGKILL)", 1, true), err)
    local pids = pids_in(dir, 3)
    assert.are.equal(3, #pids)
    for _, pid in ipairs(pids) do assert.is_false(running(pid), "rank process " .. pid .. " left running") end
  end)

  it("forwards SIGTERM to the ranks", function()
    local code, _, err = launch_and('kill -TERM $L')
    assert.are.equal(128 + 15, code, err)
    assert.truthy(err:find("got SIGTERM", 1, true), err)
    for _, pid in ipairs(pids_in(dir, 3)) do assert.is_false(running(pid)) end
  end)

  it("leaves no rank behind when the launcher itself is killed", function()
    local code = launch_and('kill -9 $L; sleep 0.3')
    assert.are.equal(137, code)
    local pids = pids_in(dir, 3)
    assert.are.equal(3, #pids)
    for _, pid in ipairs(pids) do assert.is_false(running(pid), "orphan " .. pid) end
  end)
end)

describe("rendezvous", function()
  local dir
  before_each(function() dir = h.tmpdir() end)
  after_each(function() h.rmdir(dir) end)

  local init_script = [[
    local uv = require "luv"
    local t0 = uv.hrtime()
    local pg, err = require("moonshard.dist").init { timeout = 1.5 }
    if not pg then
      io.stderr:write(err, string.format(" [took %.2f s]", (uv.hrtime() - t0) / 1e9), "\n")
      os.exit(1)
    end
    print("rank " .. pg.rank .. " of " .. pg.world .. " ready")
    pg:close()
  ]]

  -- Starts one process per env string concurrently; returns their stderr texts and exit codes.
  local function ranks(envs)
    h.write(dir .. "/init.lua", init_script)
    local parts = {}
    for i, env in ipairs(envs) do
      parts[#parts + 1] = string.format("env %s %s %s 2>%s/err.%d >/dev/null </dev/null & P%d=$!", env, q(h.exe),
        q(dir .. "/init.lua"), q(dir), i, i)
    end
    for i = 1, #envs do parts[#parts + 1] = string.format("wait $P%d; echo \"code%d=$?\"", i, i) end
    local out = sh(table.concat(parts, "\n"))
    local errs, codes = {}, {}
    for i = 1, #envs do
      errs[i] = h.read(dir .. "/err." .. i)
      codes[i] = tonumber(out:match("code" .. i .. "=(%d+)"))
    end
    return errs, codes
  end

  local function took(err) return tonumber(err:match("%[took ([%d.]+) s%]")) end

  it("names an unreachable master", function()
    local port = launch.free_port()
    local errs, codes = ranks { "RANK=1 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=" .. port }
    assert.are.equal(1, codes[1])
    assert.truthy(errs[1]:find("rank 1: cannot reach master 127.0.0.1:" .. port .. " within 1.5 s", 1, true), errs[1])
    assert.truthy(took(errs[1]) < 4)
  end)

  it("names the missing rank when one never comes", function()
    local port = launch.free_port()
    local env = "WORLD_SIZE=3 MASTER_ADDR=127.0.0.1 MASTER_PORT=" .. port .. " RANK="
    local errs, codes = ranks { env .. "0", env .. "1" }
    for i = 1, 2 do
      assert.are.equal(1, codes[i])
      assert.truthy(errs[i]:find("rendezvous 'init' timed out after 1.5 s: 2 of 3 ranks arrived; missing rank 2", 1, true),
        errs[i])
      assert.truthy(took(errs[i]) < 5)
    end
  end)

  it("refuses ranks that disagree on the world size, at once", function()
    local port = launch.free_port()
    local env = " MASTER_ADDR=127.0.0.1 MASTER_PORT=" .. port
    local errs, codes = ranks { "RANK=0 WORLD_SIZE=2" .. env, "RANK=1 WORLD_SIZE=3" .. env }
    for i = 1, 2 do
      assert.are.equal(1, codes[i])
      assert.truthy(errs[i]:find("world size mismatch: rank 1 was started with a world of 3 ranks, rank 0 with 2", 1, true),
        errs[i])
      assert.truthy(took(errs[i]) < 1.4)
    end
  end)

  it("refuses two processes with the same rank", function()
    local port = launch.free_port()
    local env = "WORLD_SIZE=3 MASTER_ADDR=127.0.0.1 MASTER_PORT=" .. port .. " RANK="
    local errs = ranks { env .. "0", env .. "1", env .. "1" }
    assert.truthy(errs[1]:find("rank 1 joined rendezvous 'init' twice", 1, true), errs[1])
  end)
end)

describe("collectives between processes", function()
  local dir
  before_each(function() dir = h.tmpdir() end)
  after_each(function() h.rmdir(dir) end)

  -- Every rank draws every rank's input from seeds, so each checks the result on its own.
  local script = [[
    local dist = require "moonshard.dist"
    local tensor = require "moonshard.tensor"
    local pg = assert(dist.init { timeout = 20, tp = tonumber(arg[1]), pp = tonumber(arg[2]) })
    local W, r, c = pg.world, pg.rank, pg.comm
    local function input(rank, n, salt) return tensor.new({ n }):randn(1000 * salt + rank) end
    local function close(a, b, tol)
      assert(#a == #b, "lengths differ")
      for i = 1, #a do
        if math.abs(a[i] - b[i]) > tol * (1 + math.abs(b[i])) then
          error(string.format("element %d: %.9g vs %.9g", i, a[i], b[i]), 2)
        end
      end
    end
    for _, n in ipairs { 1, 5, 1003 } do
      -- all_reduce sum and max
      local t = input(r, n, n)
      assert(c:all_reduce(t))
      local want = {}
      for k = 0, W - 1 do
        for i, v in ipairs(input(k, n, n):values()) do want[i] = (want[i] or 0) + v end
      end
      close(t:values(), want, 1e-5)
      t = input(r, n, n)
      assert(c:all_reduce(t, "max"))
      for k = 0, W - 1 do
        for i, v in ipairs(input(k, n, n):values()) do want[i] = k == 0 and v or math.max(want[i], v) end
      end
      close(t:values(), want, 0)
      -- all_reduce_add: acc += the sum
      local acc, acc_want = input(r, n, n + 5), {}
      for i, v in ipairs(acc:values()) do acc_want[i] = v end
      assert(c:all_reduce_add(acc, input(r, n, n)))
      for k = 0, W - 1 do
        for i, v in ipairs(input(k, n, n):values()) do acc_want[i] = acc_want[i] + v end
      end
      close(acc:values(), acc_want, 1e-5)
      assert(not c:capturable(acc), "a TCP all-reduce is not captured into graphs")
      assert(not c:capturable(acc, "all_gather"), "nor a TCP all-gather")
      -- all_gather
      local out = tensor.new({ W * n })
      assert(c:all_gather(out, input(r, n, n + 1)))
      want = {}
      for k = 0, W - 1 do
        for _, v in ipairs(input(k, n, n + 1):values()) do want[#want + 1] = v end
      end
      close(out:values(), want, 0)
      -- reduce_scatter
      local rs = tensor.new({ n })
      assert(c:reduce_scatter(rs, input(r, W * n, n + 2)))
      want = {}
      for k = 0, W - 1 do
        local v = input(k, W * n, n + 2):values()
        for i = 1, n do want[i] = (want[i] or 0) + v[r * n + i] end
      end
      close(rs:values(), want, 1e-5)
      -- broadcast from the last rank
      local b = input(r, n, n + 3)
      assert(c:broadcast(b, W - 1))
      close(b:values(), input(W - 1, n, n + 3):values(), 0)
      -- send / recv around the ring
      local got = tensor.new({ n })
      if r == 0 then
        assert(c:send(input(r, n, n + 4), 1 % W))
        assert(c:recv(got, W - 1))
      else
        assert(c:recv(got, r - 1))
        assert(c:send(input(r, n, n + 4), (r + 1) % W))
      end
      close(got:values(), input((r + W - 1) % W, n, n + 4):values(), 0)
    end
    assert(c:barrier())
    local st = c:stats()
    assert(st.all_reduce.calls == 9 and st.barrier.calls == 1, "counters")
    assert(st.all_reduce.bytes == 3 * 4 * (1 + 5 + 1003) and st.all_reduce.seconds > 0, "all_reduce bytes")
    assert(st.send.calls == 3 and st.recv.calls == 3, "send/recv counters")
    c:reset_stats()
    assert(c:stats().barrier.calls == 0, "reset")
    -- the grid's groups: tensor groups sum over adjacent ranks
    if pg.tp then
      local x = tensor.from({ r })
      assert(pg.tp:all_reduce(x))
      local sum = 0
      for _, q in ipairs(pg.grid.tp[select(1, require("moonshard.policy.groups").find(pg.grid.tp, r))]) do sum = sum + q end
      assert(x:values()[1] == sum, "tp group sum")
      assert(pg.pp:rank() == pg.coords.pp and pg.tp:rank() == pg.coords.tp, "coords")
      -- a group made from a list
      local g = assert(c:group(r % 2 == 0 and { 0, 2 } or { 1, 3 }))
      assert(g:size() == 2 and g:world_rank(0) == r % 2, "group from a list")
    end
    print("ok " .. r)
    pg:close()
  ]]

  for _, case in ipairs { { 2 }, { 3 }, { 4, 2, 2 } } do
    local W, tp, pp = case[1], case[2], case[3]
    it(string.format("on %d ranks%s", W, tp and string.format(" (grid tp %d x pp %d)", tp, pp) or ""), function()
      h.write(dir .. "/coll.lua", script)
      local args = { "launch", "-n", tostring(W), "--tag-output", dir .. "/coll.lua" }
      if tp then
        args[#args + 1] = tostring(tp)
        args[#args + 1] = tostring(pp)
      end
      local out, err, code = h.run(args)
      assert.are.equal(0, code, err)
      for r = 0, W - 1 do assert.truthy(out:find("[rank " .. r .. "] ok " .. r, 1, true), out .. err) end
    end)
  end
end)

describe("under Slurm", function()
  -- tools/slurm_check.sh starts a one-node cluster (munged, slurmctld, slurmd) when Debian's
  -- slurm-wlm is installed and this runs as root; srun then starts the ranks without the launcher.
  local available = os.execute("command -v slurmctld >/dev/null 2>&1 && command -v munged >/dev/null 2>&1"
    .. " && [ \"$(id -u)\" = 0 ]") == 0
  if not available then
    pending("Slurm (slurm-wlm, munge) not installed or not root: srun check skipped")
    return
  end
  it("srun -n 3 ranks find each other through SLURM_* alone", function()
    local out, code = sh(string.format("MSH_EXE=%s bash %s -n 3 2>&1", q(h.exe), q(h.root .. "/tools/slurm_check.sh")))
    assert.are.equal(0, code, out)
    for r = 0, 2 do
      assert.truthy(out:find("rank " .. r .. " of 3 (source slurm, local " .. r .. " of 3", 1, true), out)
    end
    assert.is_nil(out:find("WRONG", 1, true), out)
  end)

  it("srun -n 2 generate --tp 2 prints the stories260K golden text", function()
    local out, code = sh(string.format("MSH_EXE=%s bash %s -n 2 generate --model %s --max-tokens 200 "
      .. "--temperature 0 --tp 2 2>/dev/null", q(h.exe), q(h.root .. "/tools/slurm_check.sh"), q(h.stories)))
    assert.are.equal(0, code, out)
    assert.are.equal(h.read(h.stories .. "/expected_greedy_200.txt") .. "\n", out)
  end)
end)
