-- moonshard.http: an HTTP/1.1 server and client on the rank's libuv loop (luv TCP). Messages are
-- parsed by http_parser through msh_http (core/src/http.c); status lines, headers, fixed-length,
-- chunked and server-sent-event bodies are written here.
--
--   local http = require "moonshard.http"
--   local srv = assert(http.server { host = "127.0.0.1", port = 8000, handler = function(req, res)
--     -- req: method, target, path, query (table), headers (lower-case names), body, version
--     if req.path == "/health" then return res:send(200, { ["Content-Type"] = "text/plain" }, "ok\n") end
--     res:stream(200, { ["Content-Type"] = "text/event-stream" })   -- chunked
--     res:write("data: 1\n\n"); res:finish()
--     res:on_close(function() ... end)  -- the client went away before the response ended
--   end })
--   srv.port, srv:close()
--
--   http.request("http://127.0.0.1:8000/v1/models", { method = "GET" }, {
--     on_head = function(status, headers) end, on_data = function(bytes) end,
--     on_done = function(err) end })
--
-- One request of a connection is answered at a time; pipelined requests wait their turn. A
-- malformed request, or one over a limit, gets 400, 413 or 431 (JSON naming http_parser's error)
-- and the connection closes. Handler errors become 500 without ending the server.
local core = require "moonshard.core"
local uv = require "luv"
local cjson = require "cjson"

local ffi, C = core.ffi, core.C

local M = {}

M.LIMITS = { max_head = 16 * 1024, max_body = 4 * 1024 * 1024, max_headers = 64 }

M.REASONS = {
  [100] = "Continue", [200] = "OK", [204] = "No Content", [400] = "Bad Request", [401] = "Unauthorized",
  [404] = "Not Found", [405] = "Method Not Allowed", [408] = "Request Timeout", [413] = "Payload Too Large",
  [415] = "Unsupported Media Type", [429] = "Too Many Requests", [431] = "Request Header Fields Too Large",
  [500] = "Internal Server Error", [503] = "Service Unavailable",
}

-- ------------------------------------------------------------------------------- the parser

local Parser = {}
Parser.__index = Parser

-- out-params, allocated once (the loop is single-threaded)
local used_p, state_p, len_p = ffi.new("size_t[1]"), ffi.new("int[1]"), ffi.new("size_t[1]")
local name_pp, value_pp, vlen_p = ffi.new("const char*[1]"), ffi.new("const char*[1]"), ffi.new("size_t[1]")

-- M.parser("request" | "response", limits?) -> parser
function M.parser(kind, limits)
  limits = limits or M.LIMITS
  local out = ffi.new("msh_http*[1]")
  core.check(C.msh_http_new(out, kind == "response" and C.MSH_HTTP_RESPONSE or C.MSH_HTTP_REQUEST,
    limits.max_head or M.LIMITS.max_head, limits.max_body or M.LIMITS.max_body,
    limits.max_headers or M.LIMITS.max_headers), 2)
  return setmetatable({ h = ffi.gc(out[0], C.msh_http_free) }, Parser)
end

-- parser:feed(bytes) -> state (0 head incomplete, 1 body pending, 2 complete), bytes used
--   | nil, message, http status (400, 413, 431), error name
-- "" means the peer closed.
function Parser:feed(data)
  local s = C.msh_http_feed(self.h, data, #data, used_p, state_p)
  if s ~= 0 then
    local msg = core.errmsg(s)
    return nil, msg, C.msh_http_error_status(self.h), ffi.string(C.msh_http_error_name(self.h))
  end
  return state_p[0], tonumber(used_p[0])
end

function Parser:next() core.check(C.msh_http_next(self.h), 2) end
function Parser:reset() C.msh_http_reset(self.h) end
function Parser:close()
  if self.h then
    C.msh_http_free(ffi.gc(self.h, nil))
    self.h = nil
  end
end

-- The message's head: method, target, headers (names lower-cased; repeated ones joined by ", "),
-- status (responses), keep_alive, version.
function Parser:head()
  local h = self.h
  local headers = {}
  for i = 0, C.msh_http_header_count(h) - 1 do
    C.msh_http_header(h, i, name_pp, len_p, value_pp, vlen_p)
    local name = ffi.string(name_pp[0], len_p[0]):lower()
    local value = ffi.string(value_pp[0], vlen_p[0])
    headers[name] = headers[name] and (headers[name] .. ", " .. value) or value
  end
  local url = C.msh_http_url(h, len_p)
  return {
    method = ffi.string(C.msh_http_method(h)), target = ffi.string(url, len_p[0]), headers = headers,
    status = C.msh_http_status_code(h), keep_alive = C.msh_http_keep_alive(h) == 1,
    version = C.msh_http_version(h),
  }
end

-- The body held so far; consume = true drops it from the parser (streamed responses).
function Parser:body(consume)
  local p = C.msh_http_body(self.h, len_p)
  local n = tonumber(len_p[0])
  local s = ffi.string(p, n)
  if consume and n > 0 then core.check(C.msh_http_body_consume(self.h, n), 2) end
  return s
end

-- ------------------------------------------------------------------------------- helpers

local function unescape(s)
  s = s:gsub("+", " ")
  return (s:gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end))
end

-- "/a/b?x=1&y=2" -> "/a/b", { x = "1", y = "2" }
function M.split_target(target)
  local path, q = target:match("^([^?#]*)%??([^#]*)")
  local query = {}
  for k, v in (q or ""):gmatch("([^&=]+)=?([^&]*)") do query[unescape(k)] = unescape(v) end
  return path or target, query
end

local function head_text(status, headers, extra)
  local parts = { string.format("HTTP/1.1 %d %s\r\n", status, M.REASONS[status] or "Unknown") }
  local names = {}
  for k in pairs(headers or {}) do names[#names + 1] = k end
  table.sort(names)
  for _, k in ipairs(names) do parts[#parts + 1] = k .. ": " .. tostring(headers[k]) .. "\r\n" end
  for _, l in ipairs(extra or {}) do parts[#parts + 1] = l .. "\r\n" end
  parts[#parts + 1] = "\r\n"
  return table.concat(parts)
end

-- ------------------------------------------------------------------------------- responses

local Response = {}
Response.__index = Response

local function conn_write(conn, data)
  if conn.closed then return false end
  local ok = conn.tcp:write(data)
  return ok ~= nil
end

-- res:send(status, headers, body): a whole response with Content-Length. To a HEAD request
-- the head alone goes out, its Content-Length the body's.
function Response:send(status, headers, body)
  if self.started then error("http: response already started", 2) end
  self.started, self.status = true, status
  body = body or ""
  local extra = { "Content-Length: " .. #body }
  if not self.keep_alive then extra[#extra + 1] = "Connection: close" end
  if self.req and self.req.method == "HEAD" then body = "" end
  conn_write(self.conn, head_text(status, headers, extra) .. body)
  self:_done()
end

-- res:json(status, value, headers?)
function Response:json(status, value, headers)
  local h = { ["Content-Type"] = "application/json" }
  for k, v in pairs(headers or {}) do h[k] = v end
  self:send(status, h, cjson.encode(value))
end

-- res:stream(status, headers): starts a chunked response; res:write(s) sends a chunk,
-- res:finish() ends it. Writes after the client left return false. To a HEAD request the head
-- alone goes out and the response is finished at once (res.finished): writes return false.
function Response:stream(status, headers)
  if self.started then error("http: response already started", 2) end
  self.started, self.status, self.chunked = true, status, true
  local extra = { "Transfer-Encoding: chunked" }
  if not self.keep_alive then extra[#extra + 1] = "Connection: close" end
  local ok = conn_write(self.conn, head_text(status, headers, extra))
  if self.req and self.req.method == "HEAD" then
    self.head_only = true
    self:_done()
  end
  return ok
end

function Response:write(s)
  if self.head_only then return false end
  if not self.chunked or self.finished then error("http: write outside a streamed response", 2) end
  if s == "" then return not self.conn.closed end
  return conn_write(self.conn, string.format("%x\r\n", #s) .. s .. "\r\n")
end

function Response:finish()
  if not self.chunked then error("http: finish outside a streamed response", 2) end
  if self.finished then return end
  conn_write(self.conn, "0\r\n\r\n")
  self:_done()
end

-- res:on_close(fn): fn() runs if the client disconnects before the response is finished.
function Response:on_close(fn) self.close_fns[#self.close_fns + 1] = fn end

-- true once the client has gone
function Response:closed() return self.conn.closed end

function Response:_done()
  self.finished = true
  local conn = self.conn
  if conn.server.on_response then conn.server.on_response(self) end
  conn.busy = nil
  if not self.keep_alive then
    conn:close_after_write()
  else
    local t = uv.new_timer() -- the next pipelined request, after this call returns
    t:start(0, 0, function()
      t:close()
      conn:resume()
    end)
  end
end

-- ------------------------------------------------------------------------------- the server

local Conn = {}
Conn.__index = Conn

function Conn:close()
  if self.closed then return end
  self.closed = true
  self.server.conns[self] = nil
  if not self.tcp:is_closing() then self.tcp:close() end
  if self.parser then self.parser:close() end
  local res = self.busy
  self.busy = nil
  if res and not res.finished then
    for _, fn in ipairs(res.close_fns) do
      local ok, err = pcall(fn)
      if not ok and self.server.log then self.server.log("on_close: " .. tostring(err)) end
    end
  end
end

-- closes once the bytes written so far are sent
function Conn:close_after_write()
  if self.closed then return end
  self.draining = true
  self.tcp:shutdown(function() self:close() end)
end

-- answers a request the parser refused and closes the connection
function Conn:refuse(status, msg, name)
  if self.closed or self.draining then return end
  local body = cjson.encode { error = { message = msg, type = "invalid_request_error", param = cjson.null,
    code = name } }
  conn_write(self, head_text(status, { ["Content-Type"] = "application/json" },
    { "Content-Length: " .. #body, "Connection: close" }) .. body)
  self:close_after_write()
end

-- parses what is buffered, dispatching at most one request
function Conn:resume()
  if self.closed or self.draining or self.busy then return end
  local srv = self.server
  while true do
    local state, used, status, name = self.parser:feed(self.buf)
    if not state then
      return self:refuse(status ~= 0 and status or 400, "malformed request: " .. tostring(used):gsub(" %(http%.c:%d+%)$", ""),
        name)
    end
    self.buf = self.buf:sub(used + 1)
    if state == 1 and not self.continued then
      local head = self.parser:head()
      if (head.headers.expect or ""):lower() == "100-continue" then
        self.continued = true
        conn_write(self, "HTTP/1.1 100 Continue\r\n\r\n")
      end
    end
    if state ~= 2 then return end
    self.continued = nil
    local req = self.parser:head()
    req.body = self.parser:body()
    req.path, req.query = M.split_target(req.target)
    req.remote = self.remote
    self.parser:next()
    local res = setmetatable({ conn = self, keep_alive = req.keep_alive and not srv.closing, close_fns = {},
      req = req }, Response)
    self.busy = res
    local ok, err = xpcall(srv.handler, debug.traceback, req, res)
    if not ok then
      if srv.log then srv.log("handler error: " .. tostring(err)) end
      if not res.started then
        res:json(500, { error = { message = "internal error", type = "server_error", param = cjson.null, code = cjson.null } })
      elseif res.chunked and not res.finished then
        res:finish()
      end
    end
    if self.busy or self.closed or self.draining then return end
    -- answered at once: go on with the bytes already here on the next turn (see _done)
    return
  end
end

local function on_connection(srv)
  local tcp = uv.new_tcp()
  local ok, err = srv.tcp:accept(tcp)
  if not ok then
    tcp:close()
    if srv.log then srv.log("accept: " .. tostring(err)) end
    return
  end
  tcp:nodelay(true)
  local conn = setmetatable({ tcp = tcp, server = srv, buf = "", parser = M.parser("request", srv.limits) }, Conn)
  local peer = tcp:getpeername()
  conn.remote = peer and (peer.ip .. ":" .. peer.port)
  srv.conns[conn] = true
  tcp:read_start(function(rerr, data)
    if rerr or not data then
      -- EOF or a reset: a request being answered is abandoned (its on_close handlers run)
      conn:close()
      return
    end
    conn.buf = conn.buf .. data
    conn:resume()
  end)
end

-- M.server { host = "127.0.0.1", port = 0, handler = fn(req, res), limits = M.LIMITS, log = fn(msg),
--            on_response = fn(res) } -> server (server.port: the bound port) | nil, message
function M.server(opts)
  if type(opts.handler) ~= "function" then error("http.server: a handler function is required", 2) end
  local host = opts.host or "127.0.0.1"
  local tcp = uv.new_tcp()
  local srv = { tcp = tcp, host = host, handler = opts.handler, limits = opts.limits or M.LIMITS, log = opts.log,
    on_response = opts.on_response, conns = {} }
  local ok, err = tcp:bind(host, opts.port or 0)
  if ok then
    ok, err = tcp:listen(opts.backlog or 512, function(lerr)
      if not lerr then on_connection(srv) end
    end)
  end
  if not ok then
    tcp:close()
    return nil, string.format("cannot listen on %s:%s: %s", host, tostring(opts.port or 0), tostring(err))
  end
  srv.port = tcp:getsockname().port
  function srv.close(self)
    self.closing = true
    if not self.tcp:is_closing() then self.tcp:close() end
    for c in pairs(self.conns) do c:close() end
  end
  return srv
end

-- ------------------------------------------------------------------------------- the client

-- M.parse_url("http://127.0.0.1:8000/v1") -> host, port, path | nil, message (http only)
function M.parse_url(url)
  local host, port, path = url:match("^http://([^/:]+):?(%d*)(.*)$")
  if not host then return nil, string.format("'%s' is not an http:// URL", url) end
  if host:match("^%[") then return nil, "IPv6 literals are not supported: " .. url end
  return host, tonumber(port) or 80, path ~= "" and path or "/"
end

-- M.request(url, { method, headers, body, limits }, { on_head(status, headers), on_data(bytes),
-- on_done(err) }) -> a handle with :close() (aborts; on_done gets "aborted"). One request a
-- connection (Connection: close). on_done(nil) after the whole response.
function M.request(url, opts, cb)
  local host, port, path = M.parse_url(url)
  local done = false
  local tcp
  local function finish(err)
    if done then return end
    done = true
    if tcp and not tcp:is_closing() then tcp:close() end
    if cb.on_done then cb.on_done(err) end
  end
  if not host then
    local t = uv.new_timer()
    t:start(0, 0, function() t:close() finish(port) end)
    return { close = function() end }
  end
  local addr = uv.getaddrinfo(host, nil, { family = "inet", socktype = "stream" })
  if not addr or not addr[1] then
    local t = uv.new_timer()
    t:start(0, 0, function() t:close() finish("cannot resolve " .. host) end)
    return { close = function() end }
  end
  tcp = uv.new_tcp()
  local parser = M.parser("response", opts.limits or { max_head = 64 * 1024, max_body = 64 * 1024 * 1024, max_headers = 256 })
  local headed = false
  local body = opts.body or ""
  local headers = { Host = host .. ":" .. port, Connection = "close", ["Content-Length"] = #body }
  for k, v in pairs(opts.headers or {}) do headers[k] = v end
  local lines = { string.format("%s %s HTTP/1.1\r\n", opts.method or (opts.body and "POST" or "GET"), path) }
  for k, v in pairs(headers) do lines[#lines + 1] = k .. ": " .. tostring(v) .. "\r\n" end
  lines[#lines + 1] = "\r\n"
  local function handle(data)
    local state, used, status = parser:feed(data)
    if not state then return finish("bad response: " .. tostring(used) .. " (" .. tostring(status) .. ")") end
    if state >= 1 and not headed then
      headed = true
      local h = parser:head()
      if cb.on_head then cb.on_head(h.status, h.headers) end
    end
    local b = parser:body(true)
    if b ~= "" and cb.on_data then cb.on_data(b) end
    if state == 2 then finish(nil) end
  end
  tcp:connect(addr[1].addr, port, function(cerr)
    if cerr then return finish("cannot connect to " .. host .. ":" .. port .. ": " .. cerr) end
    tcp:nodelay(true)
    tcp:write(table.concat(lines) .. body)
    tcp:read_start(function(rerr, data)
      if done then return end
      if rerr then return finish(rerr) end
      if not data then
        handle("")
        return finish(done and nil or "connection closed before the response ended")
      end
      handle(data)
    end)
  end)
  return { close = function() finish("aborted") end }
end

return M
