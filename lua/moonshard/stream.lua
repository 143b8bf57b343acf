-- moonshard.stream: device streams and events (msh_stream, msh_event) as objects.
--
--   local stream = require "moonshard.stream"
--   local copy = assert(stream.new("cuda:0"))         -- a second queue of work on the device
--   local done = assert(stream.event("cuda:0"))
--   assert(stream.copy_async(w_dev, w_pinned, copy))  -- the upload runs on `copy` ...
--   assert(done:record(copy))                         -- ... up to here
--   assert(stream.wait(nil, done))                    -- the current stream waits (not the host)
--   ops.matmul(out, x, w_dev)                         -- compute, after the upload
--   copy:close(); done:close()
--
-- On the CPU everything runs as it is issued: streams are done at once and events complete once
-- recorded, so the same code runs there. Handles are closed explicitly with :close() (a finalizer
-- is only a safety net). Runtime failures return nil, message, code; misuse (an unknown device,
-- a closed handle) raises.
local core = require "moonshard.core"
local tensor = require "moonshard.tensor"

local ffi, C = core.ffi, core.C
local try = core.try

local M = {}
local Stream = {}
Stream.__index = Stream
local Event = {}
Event.__index = Event

local out_stream = ffi.new("msh_stream*[1]")
local out_event = ffi.new("msh_event*[1]")
local out_tensor = ffi.new("msh_tensor*[1]")
local ready = ffi.new("int[1]")
local ms = ffi.new("float[1]")
local shape_buf = ffi.new("int64_t[8]")

local function device_id(dev)
  local ok, kind, idx = pcall(tensor.device_id, dev)
  if not ok then error((tostring(kind):gsub("^[^:]*:%d+: ", "")), 3) end
  return kind, idx
end

local function device_name(kind, idx)
  return kind == C.MSH_CPU and "cpu" or "cuda:" .. idx
end

-- The cdata of a stream object (nil for nil: the current stream); raises on a closed one.
local function stream_ptr(s, level)
  if s == nil then return nil end
  if getmetatable(s) ~= Stream then error("not a stream: " .. tostring(s), level + 1) end
  if not s.ptr then error("stream is closed", level + 1) end
  return s.ptr
end

local function event_ptr(e, level)
  if getmetatable(e) ~= Event then error("not an event: " .. tostring(e), level + 1) end
  if not e.ptr then error("event is closed", level + 1) end
  return e.ptr
end

-- ---------------------------------------------------------------------------------- streams

-- stream.new(device) -> stream | nil, message, code. device: "cpu", "cuda", "cuda:1".
function M.new(device)
  local kind, idx = device_id(device)
  local ok, msg, code = try(C.msh_stream_new(out_stream, kind, idx))
  if not ok then return nil, msg, code end
  return setmetatable({ ptr = ffi.gc(out_stream[0], C.msh_stream_free), kind = kind, index = idx }, Stream)
end

function Stream:device() return device_name(self.kind, self.index) end

-- Waits on the host until the work queued so far has finished.
function Stream:sync() return try(C.msh_stream_sync(stream_ptr(self, 2))) end

-- Work queued on this stream from now on waits for event e (the host does not wait).
function Stream:wait(e) return try(C.msh_stream_wait_event(stream_ptr(self, 2), event_ptr(e, 2))) end

-- Makes this stream the device's current one on this thread: ops issued afterwards go here.
function Stream:use() return try(C.msh_stream_set_current(self.kind, self.index, stream_ptr(self, 2))) end

-- Frees the stream (its queued work still runs); a second close does nothing.
function Stream:close()
  local p = self.ptr
  if not p then return end
  self.ptr = nil
  ffi.gc(p, nil)
  C.msh_stream_free(p)
end

function Stream:__tostring()
  return string.format("stream(%s%s)", self:device(), self.ptr and "" or ", closed")
end

-- stream.set_current(device, s?) -> true | nil, message: s (nil: the device's default stream)
-- becomes the current stream of the device on this thread.
function M.set_current(device, s)
  local kind, idx = device_id(device)
  return try(C.msh_stream_set_current(kind, idx, stream_ptr(s, 2)))
end

-- stream.wait(s?, e): s (nil: the current stream of e's device) waits for e.
function M.wait(s, e) return try(C.msh_stream_wait_event(stream_ptr(s, 2), event_ptr(e, 2))) end

-- ----------------------------------------------------------------------------------- events

-- stream.event(device) -> event | nil, message, code. Not recorded yet (counts as complete).
function M.event(device)
  local kind, idx = device_id(device)
  local ok, msg, code = try(C.msh_event_new(out_event, kind, idx))
  if not ok then return nil, msg, code end
  return setmetatable({ ptr = ffi.gc(out_event[0], C.msh_event_free), kind = kind, index = idx }, Event)
end

function Event:device() return device_name(self.kind, self.index) end

-- Marks the point after the work queued so far on s (nil: the current stream).
function Event:record(s) return try(C.msh_event_record(event_ptr(self, 2), stream_ptr(s, 2))) end

-- true when the point has been reached (or the event never recorded), false if not yet.
function Event:query()
  local ok, msg, code = try(C.msh_event_query(event_ptr(self, 2), ready))
  if not ok then return nil, msg, code end
  return ready[0] ~= 0
end

-- Waits on the host for the point.
function Event:sync() return try(C.msh_event_sync(event_ptr(self, 2))) end

-- Milliseconds from this event's point to later's (both recorded and reached).
function Event:elapsed_ms(later)
  local ok, msg, code = try(C.msh_event_elapsed_ms(event_ptr(self, 2), event_ptr(later, 2), ms))
  if not ok then return nil, msg, code end
  return ms[0]
end

function Event:close()
  local p = self.ptr
  if not p then return end
  self.ptr = nil
  ffi.gc(p, nil)
  C.msh_event_free(p)
end

function Event:__tostring()
  return string.format("event(%s%s)", self:device(), self.ptr and "" or ", closed")
end

-- ------------------------------------------------------------------------------------ copies

-- stream.copy_async(dst, src, s?) -> true | nil, message, code: dst = src queued on s (nil: the
-- current stream). Host memory must stay untouched until the stream passes the copy; it is truly
-- asynchronous only from or to pinned memory (stream.pinned). See msh_tensor_copy_async.
function M.copy_async(dst, src, s) return try(C.msh_tensor_copy_async(dst, src, stream_ptr(s, 2))) end

-- stream.pinned(shape, dtype?) -> a zero-filled CPU tensor in page-locked memory (ordinary memory
-- where pinning is unavailable: t:is_pinned() tells) | nil, message, code.
function M.pinned(shape, dtype)
  if #shape > 8 then error("at most 8 dims", 2) end
  for i = 1, #shape do shape_buf[i - 1] = shape[i] end
  local dt = dtype == nil and C.MSH_F32 or core.dtypes[dtype] or dtype
  if type(dt) == "string" then error("unknown dtype '" .. dt .. "'", 2) end
  local ok, msg, code = try(C.msh_tensor_new_pinned(out_tensor, dt, #shape, shape_buf))
  if not ok then return nil, msg, code end
  return ffi.gc(out_tensor[0], C.msh_tensor_free)
end

-- true when t's memory is page-locked.
function M.is_pinned(t) return C.msh_tensor_is_pinned(t) ~= 0 end

return M
