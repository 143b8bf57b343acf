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
end)
