-- A REPL inside live ranks (moonshard.live, moonshard attach): a `moonshard serve` child under 32
-- concurrent requests (queue and KV read live, FCFS switched to shortest-prompt-first and back,
-- a runaway chunk interrupted while the server answers, errors and disconnects, what cannot
-- change live refused, TCP with a token, a second user refused), `:all` across the ranks of a
-- `moonshard launch -n 2` tensor-parallel job, and `moonshard attach` itself with piped input.
local h = require "helpers"
local cjson = require "cjson"
local uv = require "luv"
local attach = require "moonshard.attach"
local bit = require "bit"

local spin = h.wait_until

-- an output stream that keeps what is written
local function sink()
  local parts = {}
  return { write = function(self, ...) for _, s in ipairs { ... } do parts[#parts + 1] = tostring(s) end return self end,
    flush = function() end, text = function() return table.concat(parts) end }
end

-- POST /v1/completions on the loop; done(status, json) when the whole response is in
local function fire(port, obj, done)
  local body = cjson.encode(obj)
  local c, buf = uv.new_tcp(), ""
  c:connect("127.0.0.1", port, function(err)
    assert(not err, err)
    c:write(string.format("POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
      .. "Content-Length: %d\r\nConnection: close\r\n\r\n%s", #body, body))
    c:read_start(function(_, data)
      if data then buf = buf .. data end
      local head, rest = buf:match("^(.-)\r\n\r\n(.*)$")
      local len = head and tonumber(head:match("[Cc]ontent%-[Ll]ength: (%d+)"))
      if (len and #rest >= len) or not data then
        c:read_stop()
        if not c:is_closing() then c:close() end
        local ok, j = pcall(cjson.decode, rest or "")
        done(tonumber((head or ""):match("^HTTP/1%.1 (%d+)")), ok and j or nil)
      end
    end)
  end)
end

local function http_status(port, path)
  local out = h.sh(string.format("curl -s -o /dev/null -w '%%{http_code}' --max-time 5 http://127.0.0.1:%d%s", port, path))
  return tonumber(out)
end

local function values(r)
  assert(r and r.ok, r and r.err)
  return r.values
end

describe("moonshard attach to a serving process", function()
  local dir, pid, port, s, log, tcp_port
  setup(function()
    dir = h.tmpdir()
    log = dir .. "/serve.log"
    local out = h.sh(string.format("(MSH_LOG_DIR=%s exec timeout -k 5 120 %s serve --model %s --port 0 --max-batch 1 --quiet "
      .. "--repl tcp:127.0.0.1:0 >/dev/null 2>%s </dev/null) & echo $!", h.q(dir), h.q(h.exe), h.q(h.stories), h.q(log)))
    pid = assert(tonumber(out:match("%d+")))
    for _ = 1, 300 do
      local text = h.read(log) or ""
      port = tonumber(text:match("listening on http://127%.0%.0%.1:(%d+)"))
      tcp_port = tonumber(text:match("REPL on tcp:127%.0%.0%.1:(%d+)"))
      if (port and tcp_port) or not h.running(pid) then break end
      uv.sleep(50)
    end
    assert(port and tcp_port, "serve did not start: " .. tostring(h.read(log)))
    s = assert(attach.connect(assert(attach.find(dir))))
  end)
  teardown(function()
    if s then s:close() end
    if pid then
      h.sh("kill " .. pid .. " 2>/dev/null")
      for _ = 1, 100 do
        if not h.running(pid) then break end
        uv.sleep(20)
      end
    end
    h.rmdir(dir)
  end)

  it("listens on a 0600 socket in the run folder, named on stderr and in rank0.repl.json", function()
    local sock = dir .. "/rank0.repl.sock"
    assert.truthy(h.read(log):find("REPL on unix:" .. sock, 1, true))
    local st = assert(uv.fs_stat(sock))
    assert.equal("socket", st.type)
    assert.equal(tonumber("600", 8), bit.band(st.mode, tonumber("777", 8)))
    local info = cjson.decode(h.read(dir .. "/rank0.repl.json"))
    assert.equal(sock, info.socket)
    assert.equal(s.info.pid, info.pid)
    assert.truthy(h.running(info.pid))
    assert.equal(0, s.info.rank)
  end)

  it("reads the queue and the KV use under 32 concurrent requests, and switches FCFS to shortest-prompt-first", function()
    -- 32 prompts of distinct lengths, sent longest first
    local prompts = {}
    for k = 32, 1, -1 do prompts[#prompts + 1] = "Once upon a time" .. string.rep(" there was a cat", k) end
    local function round()
      -- pause stepping so the whole burst is queued before the first step (the engine's idle
      -- handle, closed and made again by a statement between two steps)
      values(s:eval("engine:detach()"))
      local order, n = {}, 0
      for _, p in ipairs(prompts) do
        fire(port, { prompt = p, max_tokens = 4, temperature = 0 }, function(status, j)
          assert.equal(200, status)
          order[#order + 1] = j.usage.prompt_tokens
          n = n + 1
        end)
      end
      assert.truthy(spin(function() return tonumber(values(s:eval("#scheduler.waiting"))) == 32 end, 20))
      local arrival = values(s:eval([[
        local t = {} for i, r in ipairs(scheduler.waiting) do t[i] = r.prompt_len end return table.concat(t, " ")]]))
      local arrived = {}
      for x in arrival:gmatch("%d+") do arrived[#arrived + 1] = tonumber(x) end
      return arrived, order, function() return n == 32 end
    end

    -- FCFS: the queue and the KV blocks, one step taken by hand, then completions in arrival order
    local arrived, order, done = round()
    local st = values(s:eval("local s = engine:stats() return s.waiting, s.running, s.kv_blocks_used, s.kv_blocks_total"))
    assert.truthy(st:match("^32\t0\t0\t%d+$"), st)
    values(s:eval("engine:step()"))
    local after = values(s:eval("engine:stats().waiting, engine:stats().running, engine:stats().kv_blocks_used"))
    local w, r, used = after:match("^(%d+)\t(%d+)\t(%d+)$")
    assert.equal(31, tonumber(w))
    assert.equal(1, tonumber(r))
    assert.truthy(tonumber(used) > 0, after)
    values(s:eval("engine:attach(uv)"))
    assert.truthy(spin(done, 30))
    assert.same(arrived, order)
    local sorted = {}
    for i, x in ipairs(arrived) do sorted[i] = x end
    table.sort(sorted)
    assert.are_not.same(sorted, order) -- the burst did not arrive shortest first

    -- shortest prompt first, live: the next round completes in prompt-length order
    local res = s:eval("scheduler:use('spf')")
    assert.truthy(res.ok, res.err)
    assert.truthy(table.concat(res.notes, "\n"):find("fcfs -> spf", 1, true))
    arrived, order, done = round()
    values(s:eval("engine:attach(uv)"))
    assert.truthy(spin(done, 30))
    table.sort(arrived)
    assert.same(arrived, order)

    -- :undo brings FCFS back; an assignment of a table is checked and also undoable
    local c = attach.client(s, sink(), sink())
    assert.truthy(c.command(":undo"))
    assert.equal('"fcfs"', values(s:eval("scheduler.policy.name")))
    res = s:eval("scheduler.policy = { name = 'newest', compare = function(a, b) return a.arrival > b.arrival end }")
    assert.truthy(table.concat(res.notes, "\n"):find("fcfs -> newest", 1, true))
    res = s:eval("scheduler.policy = 'no such policy'")
    assert.truthy(table.concat(res.notes, "\n"):find("refused: unknown scheduling policy", 1, true))
    assert.equal('"newest"', values(s:eval("scheduler.policy.name")))
    values(s:eval("scheduler:undo()"))
    assert.equal('"fcfs"', values(s:eval("scheduler.policy.name")))
  end)

  it("refuses what cannot change live, with the reason", function()
    local res = s:eval("engine.max_batch = 64")
    assert.truthy(table.concat(res.notes, "\n"):find("refused: engine.max_batch cannot change live", 1, true))
    assert.equal("1", values(s:eval("engine.max_batch")))
    res = s:eval("scheduler.num_blocks = 1")
    assert.truthy(table.concat(res.notes, "\n"):find("refused: scheduler.num_blocks", 1, true))
  end)

  it("interrupts a runaway chunk; errors and disconnects leave the rank serving", function()
    values(s:call { op = "budget", seconds = 0.5 })
    local t0 = uv.hrtime()
    local res = s:eval("while true do end")
    assert.is_false(res.ok)
    assert.truthy(res.err:find("interrupted: the chunk ran past its budget of 0.5 s", 1, true), res.err)
    assert.truthy((uv.hrtime() - t0) / 1e9 < 5)
    res = s:eval("local n = 0 while true do pcall(function() while true do n = n + 1 end end) end")
    assert.is_false(res.ok)
    assert.equal(200, http_status(port, "/health"))
    local done = false
    fire(port, { prompt = "Once upon a time", max_tokens = 4, temperature = 0 }, function(status) done = status == 200 end)
    assert.truthy(spin(function() return done end, 10))
    -- a traceback, and the session goes on with its own globals
    res = s:eval("x = 41 local function f() error('boom') end f()")
    assert.is_false(res.ok)
    assert.truthy(res.err:find("boom", 1, true) and res.err:find("stack traceback", 1, true), res.err)
    assert.equal("42", values(s:eval("x + 1")))
    assert.equal('"nil"', values(s:eval("tostring(rawget(_G, 'x'))"))) -- the rank's globals are untouched
    res = s:eval("print('a', 1) print('b') return 7")
    assert.equal("a\t1\nb\n", res.out)
    -- a client that goes away in the middle of a runaway chunk
    local c = uv.new_pipe(false)
    c:connect(dir .. "/rank0.repl.sock", function()
      c:write(cjson.encode { id = 1, op = "eval", src = "while true do end" } .. "\n", function() c:close() end)
    end)
    spin(function() return c:is_closing() end, 5)
    uv.sleep(200)
    assert.equal(200, http_status(port, "/health"))
    assert.equal("2", values(s:eval("1 + 1")))
  end)

  it("takes TCP sessions only with the token, on loopback", function()
    local token = h.read(dir .. "/rank0.repl.token"):match("%x+")
    local bad, err = attach.connect { kind = "tcp", host = "127.0.0.1", port = tcp_port, token = "wrong" }
    assert.is_nil(bad)
    assert.truthy(tostring(err):find("refused", 1, true), err)
    local t = assert(attach.connect { kind = "tcp", host = "127.0.0.1", port = tcp_port, token = token })
    assert.equal("3", values(t:eval("1 + 2")))
    t:close()
    local st = assert(uv.fs_stat(dir .. "/rank0.repl.token"))
    assert.equal(tonumber("600", 8), bit.band(st.mode, tonumber("777", 8)))
  end)

  it("refuses a second user: the socket's mode, then the peer's uid", function()
    if uv.os_get_passwd().uid ~= 0 then
      pending("needs root to run a client as another uid (the 0600 mode is checked above)")
      return
    end
    local sock = dir .. "/rank0.repl.sock"
    local function as_nobody()
      return h.sh(string.format("setpriv --reuid=65534 --regid=65534 --clear-groups %s attach %s -e '1 + 1' 2>&1",
        h.q(h.exe), h.q(sock)))
    end
    h.sh("chmod 755 " .. h.q(dir))
    local out, code = as_nobody()
    assert.equal(1, code)
    assert.truthy(out:find("EACCES", 1, true) or out:lower():find("permission denied", 1, true), out)
    -- the file's mode opened to everyone: SO_PEERCRED still refuses the uid
    h.sh("chmod 666 " .. h.q(sock))
    out, code = as_nobody()
    assert.equal(1, code)
    assert.truthy(out:find("refused: uid 65534 does not own this rank", 1, true), out)
    h.sh("chmod 600 " .. h.q(sock) .. "; chmod 700 " .. h.q(dir))
    assert.equal("2", values(s:eval("1 + 1")))
  end)

  it("runs `moonshard attach` with piped input: multi-line chunks, tracebacks, :commands", function()
    local out, err, code = h.run({ "attach", dir }, "for i = 1, 2 do\n  print(i)\nend\nerror('x')\n:ranks\n1 + 1\n")
    assert.equal("1\n2\n", out:sub(1, 4))
    assert.truthy(out:find("attached", 1, true))
    assert.truthy(out:find("\n2\n$"), out)
    assert.truthy(err:find("x", 1, true) and err:find("stack traceback", 1, true), err)
    assert.equal(1, code) -- a piped session with a failed chunk
    out, err, code = h.run({ "attach", dir, "-e", ":watch engine:stats().waiting 0.05 3" })
    assert.equal(0, code, err)
    local n = 0
    for _ in out:gmatch("every 0%.05s: engine:stats%(%)%.waiting") do n = n + 1 end
    assert.equal(3, n)
  end)
end)

describe("moonshard attach to a launched tensor-parallel job", function()
  it(":ranks and :all across `launch -n 2` ranks of a --tp 2 model; the driver's policy only on rank 0", function()
    local dir = h.tmpdir()
    local out = h.sh(string.format("(exec timeout -k 5 90 %s launch -n 2 --log-dir %s %s %s 2 >%s/out 2>%s/err </dev/null) & echo $!",
      h.q(h.exe), h.q(dir), h.q(h.root .. "/tests/lua/live_rank.lua"), h.q(h.stories), h.q(dir), h.q(dir)))
    local lpid = assert(tonumber(out:match("%d+")))
    local ok = spin(function()
      return #attach.ranks(dir) == 2 and uv.fs_stat(dir .. "/rank0.repl.json") and uv.fs_stat(dir .. "/rank1.repl.json")
    end, 30)
    assert.truthy(ok, h.read(dir .. "/err"))
    local desc = cjson.decode(h.read(dir .. "/launch.json"))
    assert.equal(2, #desc.ranks)

    local s = assert(attach.connect(assert(attach.find(dir, 1))))
    assert.equal(1, s.info.rank)
    local o, e = sink(), sink()
    local c = attach.client(s, o, e)
    assert.truthy(c.command(":ranks"))
    assert.truthy(o:text():find("\n0 +%d+ +running"), o:text())
    assert.truthy(o:text():find("\n1 +%d+ +attached"), o:text())
    o = sink()
    c = attach.client(s, o, e)
    assert.truthy(c.command(":all pg.rank, pg.coords.tp, pg.world"))
    local text = o:text()
    assert.truthy(text:find("^rank 0 +| rank 1\n"), text)
    assert.truthy(text:find("\n0  0  2 +| 1  1  2\n"), text)
    -- the scheduler is the driver's: a change on rank 1 is refused, on rank 0 it is taken
    local res = s:eval("scheduler:use('spf')")
    assert.truthy(table.concat(res.notes, "\n"):find("refused: the scheduler runs on rank 0", 1, true))
    assert.equal('"fcfs"', values(s:eval("scheduler.policy.name")))
    local s0 = assert(attach.connect(assert(attach.find(dir, 0))))
    res = s0:eval("scheduler:use('spf')")
    assert.truthy(table.concat(res.notes, "\n"):find("fcfs -> spf", 1, true))
    -- both ranks stop; the launcher removes the REPL files and its descriptor
    o = sink()
    c = attach.client(s, o, e)
    assert.truthy(c.command(":all live.stop = true"))
    c.close()
    s:close()
    s0:close()
    local code = select(2, h.sh("wait_for() { i=0; while kill -0 " .. lpid .. " 2>/dev/null; do i=$((i+1)); [ $i -gt 200 ] && exit 1; sleep 0.05; done; }; wait_for"))
    assert.equal(0, code)
    assert.is_nil(uv.fs_stat(dir .. "/rank0.repl.sock"))
    assert.is_nil(uv.fs_stat(dir .. "/launch.json"))
    h.rmdir(dir)
  end)
end)

describe("moonshard attach to an eval run", function()
  it("answers between scoring batches, with the run's progress in scope", function()
    local dir = h.tmpdir()
    local out = h.sh(string.format("(MSH_LOG_DIR=%s exec timeout -k 5 120 %s eval --model %s --tasks arc_easy --limit 400 "
      .. "--batch-size 1 >%s/out 2>%s/err </dev/null) & echo $!", h.q(dir), h.q(h.exe), h.q(h.stories), h.q(dir), h.q(dir)))
    local pid = assert(tonumber(out:match("%d+")))
    assert.truthy(spin(function() return uv.fs_stat(dir .. "/rank0.repl.json") end, 30), h.read(dir .. "/err"))
    local s = assert(attach.connect(assert(attach.find(dir, 0))))
    local first = values(s:eval("progress.task, progress.done, model ~= nil, runner ~= nil"))
    local task, done = first:match('^"([%w_]+)"%s+(%d+)%s+true%s+true')
    assert.are.equal("arc_easy", task, first)
    -- the next answer comes after more batches were scored
    assert.truthy(spin(function()
      local d = tonumber(values(s:eval("progress.done")):match("%d+"))
      return d and d > tonumber(done)
    end, 30))
    s:close()
    h.sh("kill " .. pid .. " 2>/dev/null")
    h.rmdir(dir)
  end)
end)
