-- moonshard.follow's call channel on rank 0 (in process: a stand-in process group and store).
local cjson = require "cjson"
local uv = require "luv"
local follow = require "moonshard.follow"

local h = require "helpers"

describe("follow.lead", function()
  it("closes a connection that never said hello once every follower has joined", function()
    local stray, member = uv.new_tcp(), uv.new_tcp()
    local stray_ended = false
    local pg = { rank = 0, world = 2, master_addr = "127.0.0.1", timeout = 10 }
    pg.store = { gather = function(_, _, _, _, value)
      local info = cjson.decode(value)
      -- a client that connects and sends nothing, then the follower with its hello
      stray:connect("127.0.0.1", info.port, function(err)
        assert(not err, err)
        stray:read_start(function(_, data) if not data then stray_ended = true end end)
        member:connect("127.0.0.1", info.port, function(e2)
          assert(not e2, e2)
          member:write(follow.frame(follow.encode { rank = 1, pid = uv.os_getpid(), token = info.token }))
        end)
      end)
      return { value }
    end }
    local group, err = follow.lead({ dist = pg, net = {} }, { timeout = 10 })
    local ended = group and h.wait_until(function() return stray_ended end, 3)
    if group then group:close_conns() end
    for _, c in ipairs { stray, member } do if not c:is_closing() then c:close() end end
    uv.run("nowait")
    assert.truthy(group, err)
    assert.is_true(ended)
  end)

  it("closes a connection whose first frame claims more than a hello's bytes, as soon as it says so", function()
    local stray, member = uv.new_tcp(), uv.new_tcp()
    local pg = { rank = 0, world = 2, master_addr = "127.0.0.1", timeout = 10 }
    pg.store = { gather = function(_, _, _, _, value)
      local info = cjson.decode(value)
      -- a 1 GiB frame's length and a few of its bytes; the follower connects only once that
      -- connection is closed, so the wait ends only if it was closed on the length alone
      stray:connect("127.0.0.1", info.port, function(err)
        assert(not err, err)
        stray:write(string.char(0x40, 0, 0, 0) .. "xxxx")
        stray:read_start(function(_, data)
          if data then return end
          member:connect("127.0.0.1", info.port, function(e2)
            assert(not e2, e2)
            member:write(follow.frame(follow.encode { rank = 1, pid = uv.os_getpid(), token = info.token }))
          end)
        end)
      end)
      return { value }
    end }
    local group, err = follow.lead({ dist = pg, net = {} }, { timeout = 5 })
    if group then group:close_conns() end
    for _, c in ipairs { stray, member } do if not c:is_closing() then c:close() end end
    uv.run("nowait")
    assert.truthy(group, err)
  end)

  it("reads frames up to the limit and refuses a longer one by its length", function()
    local got = {}
    local feed = follow.reader(function(v) got[#got + 1] = v end, function() return 64 end)
    local ok = follow.frame(follow.encode { a = 1 })
    feed(ok:sub(1, 3))
    feed(ok:sub(4) .. ok)
    assert.are.same({ { a = 1 }, { a = 1 } }, got)
    local e = select(2, pcall(feed, string.char(0, 0, 1, 0)))
    assert.are.equal("a frame of 256 bytes, over the 64 allowed", e)
  end)
end)
