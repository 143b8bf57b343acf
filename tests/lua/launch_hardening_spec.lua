-- launch and rendezvous limits (issue 17): a run timeout, a collective timeout naming the stalled
-- rank, a cap on local ranks, no empty log folders, and a clear message when the rendezvous port
-- is answered by another service.
local h = require "helpers"
local uv = require "luv"

local function run(args, limit)
  local saved = h.run_timeout
  h.run_timeout = limit or 60
  local out, err, code = h.run(args)
  h.run_timeout = saved
  return out, err, code
end

describe("moonshard launch limits", function()
  local dir
  before_each(function() dir = h.tmpdir() end)
  after_each(function() h.rmdir(dir) end)

  it("--timeout S stops a run that does not end, naming the ranks still running", function()
    h.write(dir .. "/spin.lua", "while true do end")
    local t0 = uv.hrtime()
    local _, err, code = run({ "launch", "-n", "2", "--grace", "1", "--timeout", "1", "--log-dir", dir .. "/logs",
      dir .. "/spin.lua" }, 30)
    assert.are.equal(124, code, err)
    assert.truthy(err:find("timed out after 1 s", 1, true), err)
    assert.truthy(err:find("ranks 0, 1 still running", 1, true), err)
    assert.is_true((uv.hrtime() - t0) / 1e9 < 15)
  end)

  it("--collective-timeout S fails a collective waiting for a stalled rank, naming it", function()
    h.write(dir .. "/stall.lua", [[
      local pg = assert(require("moonshard.dist").init {})
      if pg.rank == 1 then while true do require("luv").sleep(50) end end
      assert(pg.comm:all_reduce(require("moonshard.tensor").from { 1, 2 }))
    ]])
    local _, err, code = run({ "launch", "-n", "2", "--grace", "1", "--collective-timeout", "1", "--log-dir",
      dir .. "/logs", dir .. "/stall.lua" }, 60)
    assert.are.equal(1, code, err)
    assert.truthy(err:find("timed out after 1 s waiting for rank 1", 1, true), err)
  end)

  it("bad time limits are refused", function()
    for _, a in ipairs { { "--timeout", "nan" }, { "--timeout", "-1" }, { "--collective-timeout", "0" },
                         { "--collective-timeout", "inf" } } do
      local _, err, code = run { "launch", "-n", "1", a[1], a[2], "x.lua" }
      assert.are.equal(2, code, err)
      assert.truthy(err:find(a[1], 1, true), err)
    end
  end)

  it("-n 1000 is refused with the limit", function()
    local _, err, code = run { "launch", "-n", "1000", "x.lua" }
    assert.are.equal(2, code, err)
    assert.truthy(err:find("at most 256", 1, true), err)
  end)

  it("leaves no empty log folder behind", function()
    h.write(dir .. "/ok.lua", "print('hi')")
    local out, code = h.sh("cd " .. h.q(dir) .. " && env -u MSH_LOG_DIR " .. h.q(h.exe) .. " launch -n 2 ok.lua 2>/dev/null")
    assert.are.equal(0, code, out)
    assert.is_nil(uv.fs_stat(dir .. "/logs"))
  end)
end)

describe("the rendezvous", function()
  it("a frame reader names what another service sent", function()
    local store = require "moonshard.store"
    local why
    local feed = store.reader(function() error("no message expected") end, function(w) why = w end)
    feed("HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    assert.truthy(why and why:find('"HTTP/1.1 400 Bad Request"', 1, true), why)
    assert.falsy(why:find("1213486160", 1, true), why)
    why = nil
    feed = store.reader(function() error("no message expected") end, function(w) why = w end)
    feed("\0\0\0\2{}")
    assert.truthy(why and why:find("malformed", 1, true), why)
  end)

  it("a port answered by something else gives a clear message", function()
    local dir = h.tmpdir()
    -- a server that answers every connection with an HTTP error, as a web server would
    h.write(dir .. "/http.lua", [[
      local uv = require "luv"
      local s = uv.new_tcp()
      assert(s:bind("127.0.0.1", 0))
      s:listen(8, function()
        local c = uv.new_tcp()
        s:accept(c)
        c:read_start(function(_, data)
          if data then c:write("HTTP/1.1 400 Bad Request\r\n\r\n") end
        end)
      end)
      local f = io.open(arg[1], "w") f:write(s:getsockname().port) f:close()
      local t = uv.new_timer() t:start(20000, 0, function() os.exit(0) end)
    ]])
    local out, code = h.sh(string.format([[
      %s %s %s &
      S=$!
      i=0; while [ ! -s %s ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done
      RANK=1 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=$(cat %s) timeout 30 %s -e \
        'local pg, err = require("moonshard.dist").init { timeout = 5 } print(err) os.exit(pg and 0 or 1)' 2>&1
      rc=$?
      kill $S
      (exit $rc)]], h.q(h.exe), h.q(dir .. "/http.lua"), h.q(dir .. "/port"), h.q(dir .. "/port"), h.q(dir .. "/port"),
      h.q(h.exe)))
    h.rmdir(dir)
    assert.are.equal(1, code, out)
    assert.truthy(out:find("something other than a moonshard store", 1, true), out)
    assert.truthy(out:find("HTTP/1.1 400", 1, true), out)
  end)
end)
