-- moonshard.store: the rendezvous key-value store. Rank 0 serves it over TCP on its libuv loop;
-- every rank (rank 0 too) talks to it through a client. It is for setup only (addresses, NCCL
-- ids, topology): collectives never need it.
--
-- Wire format: frames of a 4-byte big-endian length and a JSON object. Requests carry an `id`
-- and an `op`; replies carry the same `id` and either `ok = true` (with `value`) or `err`.
--   set     key, value          stores a string
--   get     key, wait           the value; with wait > 0 seconds, waits for a set
--   add     key, n              adds n to a counter, returns the new value
--   gather  name, rank, world, value, timeout
--           waits until every rank of the world has joined `name`, then returns every rank's
--           value (a list in rank order). Also the barrier (values empty).
-- A world-size mismatch, a rank outside the world, a rank joining twice, a rank disconnecting
-- while others wait for it, or a gather timing out fail the whole rendezvous: every waiting and
-- later request gets the same message, so all ranks stop quickly with one clear reason.
--
-- The client is synchronous: it runs the loop (uv.run "once") until its reply arrives, so it is
-- meant for a script's setup phase, not for use inside a loop callback.
local uv = require "luv"
local cjson = require "cjson"
local bit = require "bit"

local M = {}

-- ------------------------------------------------------------------------------- framing

local function frame(obj)
  local s = cjson.encode(obj)
  local n = #s
  return string.char(bit.band(bit.rshift(n, 24), 255), bit.band(bit.rshift(n, 16), 255),
    bit.band(bit.rshift(n, 8), 255), bit.band(n, 255)) .. s
end

-- Frames larger than this are refused: the store's messages are small JSON objects.
M.MAX_FRAME = 64 * 1024 * 1024

-- What a peer sent when its bytes are not a frame of ours, for the message: the start of its text
-- when it is printable ("HTTP/1.1 400 ..."), else its first bytes in hex.
local function peek(buf)
  local head = buf:sub(1, 24)
  if head:match("^[%w%p ]+$") or head:match("^[%w%p ]+[\r\n]") then
    return string.format("it sent %q", (head:gsub("[\r\n].*$", "")))
  end
  return "it sent bytes " .. (head:sub(1, 8):gsub(".", function(c) return string.format("%02x", c:byte()) end))
end
M.peek = peek

-- M.reader(on_msg, on_bad) -> feed(data): calls on_msg(obj) for each complete frame of the stream
-- (obj a table with a numeric id), or on_bad(why) once and ignores the rest when the stream is not
-- made of our frames (another service on the port, a corrupt stream).
local function reader(on_msg, on_bad)
  local buf, bad = "", false
  return function(data)
    if bad then return end
    buf = buf .. data
    while #buf >= 4 do
      local a, b, c, d = buf:byte(1, 4)
      local n = ((a * 256 + b) * 256 + c) * 256 + d
      if n > M.MAX_FRAME then
        bad = true
        local what = peek(buf)
        if what:match("^it sent bytes") then what = string.format("a frame of %d bytes; %s", n, what) end
        return on_bad(what)
      end
      if #buf < 4 + n then break end
      local ok, obj = pcall(cjson.decode, buf:sub(5, 4 + n))
      local raw = buf
      buf = buf:sub(5 + n)
      if not ok or type(obj) ~= "table" or type(obj.id) ~= "number" then
        bad = true
        return on_bad("malformed frame (" .. peek(raw) .. ")")
      end
      on_msg(obj)
    end
  end
end
M.reader = reader

local function now_s() return uv.hrtime() / 1e9 end

-- Runs the loop until done() is true or deadline (seconds, uv.hrtime clock) passes.
local function run_until(done, deadline)
  if done() then return true end
  local timer = uv.new_timer()
  local ms = math.max(0, math.floor((deadline - now_s()) * 1000)) + 1
  timer:start(ms, 0, function() end) -- wakes the loop at the deadline
  while not done() and now_s() < deadline do uv.run("once") end
  timer:close()
  return done()
end
M.run_until = run_until

-- Resolves a host name to an IPv4 address (numeric addresses pass through).
local function resolve(host)
  if host:match("^%d+%.%d+%.%d+%.%d+$") then return host end
  local res, err = uv.getaddrinfo(host, nil, { family = "inet", socktype = "stream" })
  if not res or not res[1] then return nil, err or "no address" end
  return res[1].addr
end
M.resolve = resolve

local function ranks_text(list)
  return (#list == 1 and "rank " or "ranks ") .. table.concat(list, ", ")
end
M.ranks_text = ranks_text

-- -------------------------------------------------------------------------------- server

local Server = {}
Server.__index = Server

-- M.serve(host, port, opts) -> server | nil, message
--   opts.world: the world size (rank 0's); every gather must agree with it
function M.serve(host, port, opts)
  local self = setmetatable({
    world = assert(opts and opts.world, "serve: opts.world is required"),
    kv = {}, key_waiters = {}, gathers = {}, clients = {}, pending_writes = 0, failed = nil,
  }, Server)
  local ip, rerr = resolve(host)
  if not ip then return nil, string.format("cannot resolve '%s': %s", host, tostring(rerr)) end
  local tcp = uv.new_tcp()
  local ok, err = tcp:bind(ip, port)
  if ok then ok, err = tcp:listen(128, function(lerr) if not lerr then self:accept() end end) end
  if not ok then
    tcp:close()
    return nil, string.format("cannot serve the rendezvous on %s:%d: %s", host, port, tostring(err))
  end
  self.tcp = tcp
  self.port = tcp:getsockname().port
  return self
end

function Server:accept()
  local c = uv.new_tcp()
  if not self.tcp:accept(c) then
    c:close()
    return
  end
  if self.unrefed then c:unref() end
  local client = { tcp = c, waits = {} }
  self.clients[client] = true
  local feed = reader(function(msg) self:handle(client, msg) end, function() self:drop(client) end)
  c:read_start(function(err, data)
    if err or not data then return self:drop(client) end
    feed(data)
  end)
end

-- A client went away: a rank that others still wait for breaks the rendezvous.
function Server:drop(client)
  if not self.clients[client] then return end
  self.clients[client] = nil
  if not client.tcp:is_closing() then client.tcp:close() end
  for name in pairs(client.waits) do
    local g = self.gathers[name]
    if g and not g.done then
      self:fail(string.format("rendezvous '%s': rank %s disconnected before every rank arrived",
        name, tostring(client.rank)))
      return
    end
  end
end

function Server:send(client, obj)
  if not self.clients[client] or client.tcp:is_closing() then return end
  self.pending_writes = self.pending_writes + 1
  local ok = pcall(client.tcp.write, client.tcp, frame(obj), function()
    self.pending_writes = self.pending_writes - 1
  end)
  if not ok then self.pending_writes = self.pending_writes - 1 end
end

function Server:reply(client, id, value) self:send(client, { id = id, ok = true, value = value }) end
function Server:reply_err(client, id, msg) self:send(client, { id = id, err = msg }) end

-- Fails the rendezvous: every waiting request and every later one gets msg.
function Server:fail(msg)
  if self.failed then return end
  self.failed = msg
  for _, g in pairs(self.gathers) do
    if g.timer and not g.timer:is_closing() then g.timer:close() end
    if not g.done then
      for _, w in pairs(g.waiters) do self:reply_err(w.client, w.id, msg) end
      g.waiters = {}
    end
  end
  for _, list in pairs(self.key_waiters) do
    for _, w in ipairs(list) do
      if w.timer and not w.timer:is_closing() then w.timer:close() end
      self:reply_err(w.client, w.id, msg)
    end
  end
  self.key_waiters = {}
end

function Server:handle(client, m)
  local id, op = m.id, m.op
  if self.failed then return self:reply_err(client, id, self.failed) end
  -- a request from outside is checked before it touches the tables
  if type(op) ~= "string" then return self:reply_err(client, id, "a request without an op") end
  if (op == "set" or op == "get" or op == "add") and type(m.key) ~= "string" then
    return self:reply_err(client, id, "op '" .. op .. "' needs a string key")
  end
  if m.wait ~= nil and type(m.wait) ~= "number" then return self:reply_err(client, id, "wait must be a number") end
  if m.n ~= nil and type(m.n) ~= "number" then return self:reply_err(client, id, "n must be a number") end
  if m.timeout ~= nil and (type(m.timeout) ~= "number" or m.timeout ~= m.timeout) then
    return self:reply_err(client, id, "timeout must be a number")
  end
  if op == "set" then
    self.kv[m.key] = m.value
    local list = self.key_waiters[m.key]
    self.key_waiters[m.key] = nil
    for _, w in ipairs(list or {}) do
      if not w.timer:is_closing() then w.timer:close() end
      self:reply(w.client, w.id, m.value)
    end
    return self:reply(client, id, true)
  elseif op == "get" then
    local v = self.kv[m.key]
    if v ~= nil or not (m.wait and m.wait > 0 and m.wait < 1e6) then return self:reply(client, id, v) end
    local w = { client = client, id = id, timer = uv.new_timer() }
    if self.unrefed then w.timer:unref() end
    local list = self.key_waiters[m.key] or {}
    self.key_waiters[m.key] = list
    list[#list + 1] = w
    w.timer:start(math.floor(m.wait * 1000), 0, function()
      w.timer:close()
      for i, x in ipairs(list) do if x == w then table.remove(list, i) break end end
      self:reply_err(client, id, string.format("timed out after %g s waiting for key '%s'", m.wait, tostring(m.key)))
    end)
  elseif op == "add" then
    local v = (tonumber(self.kv[m.key]) or 0) + (tonumber(m.n) or 1)
    self.kv[m.key] = v
    return self:reply(client, id, v)
  elseif op == "gather" then
    return self:gather(client, m)
  else
    return self:reply_err(client, id, "unknown op '" .. tostring(op) .. "'")
  end
end

function Server:gather(client, m)
  local name, rank, world = tostring(m.name), tonumber(m.rank), tonumber(m.world)
  if world ~= self.world then
    self:fail(string.format("world size mismatch: rank %s was started with a world of %s ranks, rank 0 with %d",
      tostring(rank), tostring(world), self.world))
    return self:reply_err(client, m.id, self.failed)
  end
  if not rank or rank < 0 or rank >= world or rank % 1 ~= 0 then
    self:fail(string.format("rank %s outside a world of %d ranks", tostring(m.rank), world))
    return self:reply_err(client, m.id, self.failed)
  end
  client.rank = rank
  local g = self.gathers[name]
  if not g then
    g = { values = {}, waiters = {}, count = 0 }
    self.gathers[name] = g
    local timeout = math.min(math.max(tonumber(m.timeout) or 300, 0), 1e6)
    g.timer = uv.new_timer()
    if self.unrefed then g.timer:unref() end
    g.timer:start(math.floor(timeout * 1000), 0, function()
      local missing = {}
      for r = 0, world - 1 do
        if g.values[r] == nil then missing[#missing + 1] = r end
      end
      self:fail(string.format("rendezvous '%s' timed out after %g s: %d of %d ranks arrived; missing %s",
        name, timeout, g.count, world, ranks_text(missing)))
    end)
  end
  if g.done or g.values[rank] ~= nil then
    self:fail(string.format("rank %d joined rendezvous '%s' twice (two processes with the same rank?)", rank, name))
    return self:reply_err(client, m.id, self.failed)
  end
  g.values[rank] = m.value == nil and "" or m.value
  g.waiters[rank] = { client = client, id = m.id }
  client.waits[name] = true
  g.count = g.count + 1
  if g.count < world then return end
  g.done = true
  g.timer:close()
  local list = {}
  for r = 0, world - 1 do list[r + 1] = g.values[r] end
  for _, w in pairs(g.waiters) do
    w.client.waits[name] = nil
    self:reply(w.client, w.id, list)
  end
  g.waiters, g.values = {}, {}
end

-- Runs the loop until every reply written so far has reached the kernel (or timeout seconds).
-- Rank 0 calls it before blocking in C, so that the others get their replies meanwhile.
function Server:drain(timeout)
  return run_until(function() return self.pending_writes <= 0 end, now_s() + (timeout or 5))
end

-- Lets the loop end while the store is still open (it keeps serving while the loop runs).
function Server:unref()
  self.unrefed = true
  self.tcp:unref()
  for c in pairs(self.clients) do c.tcp:unref() end
  for _, g in pairs(self.gathers) do if g.timer and not g.timer:is_closing() then g.timer:unref() end end
end

function Server:close()
  for c in pairs(self.clients) do
    if not c.tcp:is_closing() then c.tcp:close() end
  end
  self.clients = {}
  for _, g in pairs(self.gathers) do
    if g.timer and not g.timer:is_closing() then g.timer:close() end
  end
  for _, list in pairs(self.key_waiters) do
    for _, w in ipairs(list) do if not w.timer:is_closing() then w.timer:close() end end
  end
  if self.tcp and not self.tcp:is_closing() then self.tcp:close() end
end

-- -------------------------------------------------------------------------------- client

local Client = {}
Client.__index = Client

-- M.connect(host, port, timeout) -> client | nil, message. Retries until timeout seconds pass.
function M.connect(host, port, timeout)
  timeout = timeout or 30
  local deadline = now_s() + timeout
  local ip, rerr = resolve(host)
  if not ip then return nil, string.format("cannot resolve master address '%s': %s", host, tostring(rerr)) end
  local last = "timed out"
  while true do
    local tcp = uv.new_tcp()
    local result
    local ok, err = pcall(tcp.connect, tcp, ip, port, function(cerr) result = cerr or false end)
    if not ok then
      tcp:close()
      return nil, string.format("cannot reach master %s:%d: %s", host, port, tostring(err))
    end
    run_until(function() return result ~= nil end, deadline)
    if result == false then
      local self = setmetatable({ tcp = tcp, host = host, port = port, next_id = 0, replies = {} }, Client)
      self.feed = reader(function(msg) self.replies[msg.id] = msg end, function(why)
        self.broken = string.format("the rendezvous port %s:%d is answered by something other than a moonshard "
          .. "store: %s (is another service listening there? pick another --master-port)", host, port, why)
      end)
      tcp:read_start(function(rerr2, data)
        if rerr2 or not data then
          self.broken = "lost the connection to the master " .. host .. ":" .. port .. (rerr2 and (": " .. rerr2) or "")
          if not tcp:is_closing() then tcp:close() end
          return
        end
        self.feed(data)
      end)
      return self
    end
    if not tcp:is_closing() then tcp:close() end
    if result ~= nil then last = tostring(result) end
    if now_s() >= deadline then break end
    local waited = false
    local t = uv.new_timer()
    t:start(100, 0, function() waited = true end)
    run_until(function() return waited end, deadline)
    t:close()
    if now_s() >= deadline then break end
  end
  return nil, string.format("cannot reach master %s:%d within %g s (%s)", host, port, timeout, last)
end

-- The local IP address of the connection (the interface that reaches the master).
function Client:local_ip()
  local name = self.tcp:getsockname()
  return name and name.ip
end

-- client:request(obj, timeout) -> value | nil, message
function Client:request(obj, timeout)
  if self.broken then return nil, self.broken end
  self.next_id = self.next_id + 1
  local id = self.next_id
  obj.id = id
  local ok, err = pcall(self.tcp.write, self.tcp, frame(obj))
  if not ok then return nil, "rendezvous: " .. tostring(err) end
  local deadline = now_s() + (timeout or 30)
  run_until(function() return self.replies[id] ~= nil or self.broken ~= nil end, deadline)
  local r = self.replies[id]
  self.replies[id] = nil
  if not r then
    if self.broken then return nil, self.broken end
    return nil, string.format("no answer from the master %s:%d within %g s (%s)", self.host, self.port,
      timeout or 30, obj.op)
  end
  if r.err then return nil, r.err end
  if r.value == cjson.null then return nil end
  return r.value
end

function Client:set(key, value) return self:request({ op = "set", key = key, value = value }, 30) end

-- client:get(key, wait?) -> value | nil (absent) | nil, message
function Client:get(key, wait)
  return self:request({ op = "get", key = key, wait = wait }, (wait or 0) + 10)
end

function Client:add(key, n) return self:request({ op = "add", key = key, n = n or 1 }, 30) end

-- client:gather(name, rank, world, value, timeout) -> list of every rank's value | nil, message.
-- The server fails it after timeout seconds; the client waits a little longer for that answer.
function Client:gather(name, rank, world, value, timeout)
  timeout = timeout or 300
  return self:request({ op = "gather", name = name, rank = rank, world = world, value = value or "",
    timeout = timeout }, timeout + 5)
end

function Client:barrier(name, rank, world, timeout)
  local ok, err = self:gather(name, rank, world, "", timeout)
  if not ok then return nil, err end
  return true
end

function Client:unref() self.tcp:unref() end

function Client:close()
  if not self.tcp:is_closing() then self.tcp:close() end
end

M.Server, M.Client = Server, Client
return M
