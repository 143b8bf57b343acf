-- moonshard.comm: communicators (msh_comm) as cdata with methods. Every call is collective over
-- the communicator's ranks except send and recv; see moonshard.h for the rules.
--
--   local comm = require "moonshard.comm"
--   local l = assert(comm.listen("0.0.0.0", 0))      -- publish l:port() through the rendezvous
--   local c = assert(comm.new_tcp(l, rank, world, { "10.0.0.1:4711", "10.0.0.2:4711" }, 30))
--   assert(c:all_reduce(t))                           -- t = sum over ranks, in place
--   assert(c:all_reduce_add(x, t))                    -- x += sum over ranks of t
--   local tp = assert(c:split(rank // 2, rank))       -- MPI_Comm_split
--
-- Methods return true (or a value) on success and nil, message, code on failure; a failed
-- collective leaves the communicator broken (see moonshard.h).
local core = require "moonshard.core"

local ffi, C = core.ffi, core.C
local try = core.try

local M = {}
local Comm = {}
local Listener = {}

local out_comm = ffi.new("msh_comm*[1]")
local out_listener = ffi.new("msh_tcp_listener*[1]")

M.SUM = C.MSH_REDUCE_SUM
M.MAX = C.MSH_REDUCE_MAX
local ops = { sum = C.MSH_REDUCE_SUM, max = C.MSH_REDUCE_MAX }

local function op_id(op)
  if op == nil then return C.MSH_REDUCE_SUM end
  local id = ops[op] or (type(op) == "number" and op)
  if not id then error("unknown reduce op '" .. tostring(op) .. "'", 3) end
  return id
end

local function owned(c) return ffi.gc(c, C.msh_comm_free) end

-- M.listen(host?, port?) -> listener | nil, message. host "0.0.0.0" (all interfaces), port 0 (any).
function M.listen(host, port)
  local ok, msg, code = try(C.msh_tcp_listen(out_listener, host or "0.0.0.0", port or 0))
  if not ok then return nil, msg, code end
  return ffi.gc(out_listener[0], C.msh_tcp_listener_free)
end

function Listener:port() return C.msh_tcp_listener_port(self) end
function Listener:close()
  ffi.gc(self, nil)
  C.msh_tcp_listener_free(self)
end

-- M.new_tcp(listener, rank, world, addrs, timeout_s) -> comm | nil, message.
-- addrs: "host:port" of every rank, indexed by rank from 1 (addrs[rank + 1] is this rank's own).
function M.new_tcp(listener, rank, world, addrs, timeout)
  local tab = ffi.new("const char *[?]", world)
  local keep = {}
  for r = 0, world - 1 do
    local a = addrs[r + 1]
    if a then
      keep[#keep + 1] = a
      tab[r] = a
    end
  end
  local ok, msg, code = try(C.msh_comm_new_tcp(out_comm, listener, rank, world, tab, timeout or 300))
  if not ok then return nil, msg, code end
  return owned(out_comm[0])
end

M.has_nccl = C.msh_has_nccl() ~= 0
M.NCCL_ID_BYTES = C.MSH_NCCL_ID_BYTES

-- M.nccl_id() -> a fresh NCCL unique id as a hex string | nil, message.
function M.nccl_id()
  local buf = ffi.new("uint8_t[?]", C.MSH_NCCL_ID_BYTES)
  local ok, msg, code = try(C.msh_nccl_unique_id(buf))
  if not ok then return nil, msg, code end
  local hex = {}
  for i = 0, C.MSH_NCCL_ID_BYTES - 1 do hex[i + 1] = string.format("%02x", buf[i]) end
  return table.concat(hex)
end

-- M.new_nccl(rank, world, id_hex, device_index) -> comm | nil, message.
function M.new_nccl(rank, world, id_hex, device_index)
  if type(id_hex) ~= "string" or #id_hex ~= 2 * C.MSH_NCCL_ID_BYTES then
    error("new_nccl: the id must be a hex string of " .. C.MSH_NCCL_ID_BYTES .. " bytes", 2)
  end
  local buf = ffi.new("uint8_t[?]", C.MSH_NCCL_ID_BYTES)
  for i = 0, C.MSH_NCCL_ID_BYTES - 1 do buf[i] = tonumber(id_hex:sub(2 * i + 1, 2 * i + 2), 16) end
  local ok, msg, code = try(C.msh_comm_new_nccl(out_comm, rank, world, buf, device_index or 0))
  if not ok then return nil, msg, code end
  return owned(out_comm[0])
end

-- -------------------------------------------------------------------------------- methods

function Comm:rank() return C.msh_comm_rank(self) end
function Comm:size() return C.msh_comm_size(self) end
function Comm:kind() return C.msh_comm_kind(self) == C.MSH_COMM_NCCL and "nccl" or "tcp" end
-- world rank of rank r of this communicator (r defaults to this rank)
function Comm:world_rank(r) return C.msh_comm_world_rank(self, r or C.msh_comm_rank(self)) end
function Comm:set_timeout(s) C.msh_comm_set_timeout(self, s) end
function Comm:timeout() return C.msh_comm_timeout(self) end

function Comm:device()
  if C.msh_comm_device(self) == C.MSH_CPU then return "cpu" end
  return "cuda:" .. C.msh_comm_device_index(self)
end

function Comm:all_reduce(t, op) return try(C.msh_comm_all_reduce(self, t, op_id(op))) end
-- acc += sum over ranks of t (t's values afterwards unspecified); one kernel on NCCL ranks of
-- one host for small tensors
function Comm:all_reduce_add(acc, t) return try(C.msh_comm_all_reduce_add(self, acc, t)) end
-- whether an all-reduce of a tensor like t can be captured into a CUDA graph
-- (op: "all_reduce", the default, or "all_gather" with t as the input)
function Comm:capturable(t, op)
  return C.msh_comm_capturable(self, op == "all_gather" and C.MSH_COMM_OP_ALL_GATHER or C.MSH_COMM_OP_ALL_REDUCE, t) == 1
end
function Comm:all_gather(out, input) return try(C.msh_comm_all_gather(self, out, input)) end
function Comm:reduce_scatter(out, input, op) return try(C.msh_comm_reduce_scatter(self, out, input, op_id(op))) end
function Comm:broadcast(t, root) return try(C.msh_comm_broadcast(self, t, root or 0)) end
function Comm:send(t, peer) return try(C.msh_comm_send(self, t, peer)) end
function Comm:recv(t, peer) return try(C.msh_comm_recv(self, t, peer)) end
function Comm:barrier() return try(C.msh_comm_barrier(self)) end

-- c:split(color, key?) -> comm, or false for color nil/negative (no group) | nil, message.
function Comm:split(color, key)
  local col = (color == nil or color < 0) and C.MSH_COMM_NO_COLOR or color
  local ok, msg, code = try(C.msh_comm_split(out_comm, self, col, key or self:rank()))
  if not ok then return nil, msg, code end
  if out_comm[0] == nil then return false end
  return owned(out_comm[0])
end

-- c:group(ranks) -> a communicator of the listed ranks (in that order), or false on ranks not
-- listed. Collective over c: every rank passes the same partition's list that holds it (or any
-- list that does not, to join no group).
function Comm:group(ranks)
  local me = self:rank()
  for i, r in ipairs(ranks) do
    if r == me then return self:split(math.min(unpack(ranks)), i) end
  end
  return self:split(nil)
end

local op_names = { "all_reduce", "all_gather", "reduce_scatter", "broadcast", "send", "recv", "barrier" }
local st_calls, st_bytes, st_secs = ffi.new("uint64_t[1]"), ffi.new("uint64_t[1]"), ffi.new("double[1]")

-- c:stats() -> { all_reduce = { calls, bytes, seconds }, all_gather = ..., ... } since the
-- communicator was made or c:reset_stats() (seconds: host time inside the calls).
function Comm:stats()
  local out = {}
  for i, name in ipairs(op_names) do
    C.msh_comm_stats(self, i - 1, st_calls, st_bytes, st_secs)
    out[name] = { calls = tonumber(st_calls[0]), bytes = tonumber(st_bytes[0]), seconds = st_secs[0] }
  end
  return out
end
function Comm:reset_stats() C.msh_comm_reset_stats(self) end

-- c:set_events(capacity) -> true | nil, message. capacity > 0: every successful call is recorded
-- in a ring of that many entries (drained by c:drain_events); 0 turns recording off.
function Comm:set_events(capacity) return try(C.msh_comm_set_events(self, capacity or 0)) end

local EV_MAX = 256
local ev_op, ev_bytes, ev_peer = ffi.new("int[?]", EV_MAX), ffi.new("uint64_t[?]", EV_MAX), ffi.new("int[?]", EV_MAX)
local ev_t, ev_secs, ev_dev = ffi.new("double[?]", EV_MAX), ffi.new("double[?]", EV_MAX), ffi.new("int[?]", EV_MAX)
local ev_n, ev_dropped = ffi.new("int[1]"), ffi.new("uint64_t[1]")

-- c:drain_events(fn, wait?) -> records, dropped. Calls fn(op, bytes, peer, t, seconds, on_device)
-- for every readable record in call order (op: "all_reduce", ...; peer: the peer or root, -1 for
-- none; t: CLOCK_MONOTONIC seconds at the call, as uv.hrtime() / 1e9; seconds: its duration, on
-- the device for NCCL). Records whose device time is not known yet stay for a later call unless
-- wait is true (then it waits for the device). dropped: records lost to a full ring.
function Comm:drain_events(fn, wait)
  local total, dropped = 0, 0
  repeat
    local s = C.msh_comm_drain_events(self, EV_MAX, wait and 1 or 0, ev_op, ev_bytes, ev_peer, ev_t, ev_secs, ev_dev,
      ev_n, ev_dropped)
    if s ~= 0 then core.check(s, 2) end
    local n = ev_n[0]
    dropped = dropped + tonumber(ev_dropped[0])
    for i = 0, n - 1 do
      fn(op_names[ev_op[i] + 1], tonumber(ev_bytes[i]), ev_peer[i], ev_t[i], ev_secs[i], ev_dev[i] ~= 0)
    end
    total = total + n
  until n < EV_MAX
  return total, dropped
end

function Comm:abort() C.msh_comm_abort(self) end

function Comm:free()
  ffi.gc(self, nil)
  C.msh_comm_free(self)
end

function Comm:__tostring()
  return string.format("comm(%s, rank %d of %d, %s)", self:kind(), self:rank(), self:size(), self:device())
end

ffi.metatype("struct msh_comm", { __index = Comm, __tostring = Comm.__tostring })
ffi.metatype("struct msh_tcp_listener", { __index = Listener })

M.Comm = Comm
return M
