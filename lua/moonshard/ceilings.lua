-- moonshard.ceilings: what a device can do, measured now, and what a model's step must move, so
-- that benchmarks report efficiency against floors of the same run (moonshard bench,
-- moonshard bench-serve).
--
--   local ceil = require "moonshard.ceilings"
--   local bw, rate = ceil.device("cuda")          -- bytes/s read + written, bf16 matmul flop/s
--   local h2d, pinned = ceil.h2d("cuda")          -- pinned host -> device bytes/s, on a copy stream
--   local bytes, params, head = ceil.weights(net) -- what one decode step reads, the matmul params
--   local kv = ceil.kv_bytes_per_position(net)    -- K and V of one position over the layers
--   local rd = ceil.disk(path)                     -- a file's sequential read rate: rd.gbs, rd.direct
local uv = require "luv"
local core = require "moonshard.core"
local tensor = require "moonshard.tensor"
local ops = require "moonshard.ops"

local M = {}

local function median(t)
  table.sort(t)
  local n = #t
  return n % 2 == 1 and t[(n + 1) / 2] or (t[n / 2] + t[n / 2 + 1]) / 2
end

local function syncer(device)
  local kind, index = tensor.device_id(device)
  return function() core.check(core.C.msh_device_sync(kind, index)) end
end

-- M.device(device) -> copy bandwidth (bytes read + written per second), matrix rate (flop/s of
-- an 8192^3 bf16-weight matmul) | nil, message. The median of five timed runs after a warm-up.
function M.device(device)
  local sync = syncer(device)
  local n = 256 * 1024 * 1024 -- 1 GiB of f32
  local a, err = tensor.new({ n }, "f32", device)
  if not a then return nil, err end
  local b
  b, err = tensor.new({ n }, "f32", device)
  if not b then a:free() return nil, err end
  local times = {}
  for i = 1, 6 do
    sync()
    local t0 = uv.hrtime()
    b:copy_from(a)
    sync()
    if i > 1 then times[#times + 1] = (uv.hrtime() - t0) / 1e9 end
  end
  local bw = 2 * n * 4 / median(times)
  a:free()
  b:free()
  local N = 8192
  local x = assert(tensor.new({ N, N }, "f32", device)):randn(1)
  local w = assert(tensor.new({ N, N }, "bf16", device)):randn(2)
  local o = assert(tensor.new({ N, N }, "f32", device))
  times = {}
  for i = 1, 6 do
    sync()
    local t0 = uv.hrtime()
    ops.matmul(o, x, w)
    sync()
    if i > 1 then times[#times + 1] = (uv.hrtime() - t0) / 1e9 end
  end
  local rate = 2 * N * N * N / median(times)
  x:free()
  w:free()
  o:free()
  return bw, rate
end

-- M.h2d(device) -> bytes/s, pinned: the pinned host-to-device ceiling a streaming stage (or a
-- --kv-offload cache) runs against, measured the way the stage copies: straight from a pinned
-- buffer to the device (stream.copy_async: one DMA per copy, no staging), on a stream of its own
-- (the copy engine's queue, as the stage's copy stream), PIECES copies of PIECE bytes queued back
-- to back so that the engine never waits for the host between them, timed by events on that
-- stream around the round. One untimed round first (the first touch of the path and the
-- buffers), then the best of ROUNDS rounds: anything else on the link or the host only makes a
-- round slower, so the fastest is the closest to what the link carries. (tensor:copy_from does
-- not measure this: from host memory it packs the source into the pinned staging buffers with
-- host memcpy, chunk after chunk on the compute stream, which reads well below the link's rate.)
-- `pinned` says whether the host buffer could be pinned (RLIMIT_MEMLOCK).
function M.h2d(device)
  local stream = require "moonshard.stream"
  local PIECE, PIECES, ROUNDS = 16 * 1024 * 1024, 32, 5 -- 512 MiB a round
  local n = PIECE * PIECES
  local host = assert(stream.pinned({ n }, "i8"))
  local dev = assert(tensor.new({ n }, "i8", device))
  local copy = assert(stream.new(device))
  local t0, t1 = assert(stream.event(device)), assert(stream.event(device))
  local src, dst = {}, {}
  for i = 1, PIECES do
    src[i], dst[i] = host:narrow(1, (i - 1) * PIECE, PIECE), dev:narrow(1, (i - 1) * PIECE, PIECE)
  end
  syncer(device)()
  local best
  for round = 0, ROUNDS do
    assert(t0:record(copy))
    for i = 1, PIECES do assert(stream.copy_async(dst[i], src[i], copy)) end
    assert(t1:record(copy))
    assert(t1:sync())
    local s = assert(t0:elapsed_ms(t1)) / 1e3
    if round > 0 and (not best or s < best) then best = s end
  end
  local pinned = stream.is_pinned(host)
  for i = 1, PIECES do src[i]:free(); dst[i]:free() end
  t0:close(); t1:close(); copy:close()
  host:free()
  dev:free()
  return n / best, pinned
end

-- M.weights(net) -> bytes, matmul params, head params: what every decode step of a runner must
-- read (all weights of its layers and head as placed on its device, but the embedding table, of
-- which a step reads one row a token), the parameters of its matrices (2 flops each a token) and
-- of the output head among them.
function M.weights(net)
  local bytes, params, head = 0, 0, 0
  local function count(t, is_matrix)
    bytes = bytes + t:nbytes()
    if is_matrix then params = params + t:numel() end
  end
  if net.stage:output() then -- the last pipeline stage holds the head
    count(net.stage:output(), true)
    count(net.stage:norm())
    head = net.stage:output():numel()
  end
  for l = net.first_layer, net.last_layer do
    for _, t in pairs(net.stage:acquire(l)) do count(t, t:ndim() == 2) end -- norms and biases are vectors
    net.stage:release(l)
  end
  return bytes, params, head
end

-- M.kv_bytes_per_position(net) -> bytes: one position's keys and values over a runner's layers
-- (its cache's dtype, slots or the paged pool), which attention reads once a step per position
function M.kv_bytes_per_position(net)
  local kv = net.kv[net.first_layer]
  local t = kv.K or kv.k_pool
  return (net.last_layer - net.first_layer + 1) * 2 * net.n_kv_heads * net.head_dim * t:nbytes() / t:numel()
end

-- M.disk(path[, max_bytes]) -> { gbs, dd_gbs, reader_gbs, direct, bytes } | nil, message: the
-- sequential read rate of a file's disk over its first max_bytes (default 8 GiB), the best of two
-- readers with nothing else running: coreutils' dd in 64 MiB blocks, and moonshard's io_uring
-- reader at queue depth 64 in 1 MiB requests (what fio's iodepth measures; on some disks many
-- requests in flight read faster than dd's large blocks, on others not). Both use O_DIRECT, so the
-- page cache is bypassed (a file just written sits in it; it is synced first, or its dirty pages
-- would be written back inside the timing). Where O_DIRECT is refused (tmpfs) both read through
-- the page cache and direct is false: that rate is memory's, not the disk's. A file of a few MiB
-- measures the disk's latency more than its rate (M.DISK_MIN_BYTES: the least a rate is stated for).
M.DISK_MIN_BYTES = 256 * 1024 * 1024
local DISK_BLOCK = 64 * 1024 * 1024

local function dd_rate(q, count)
  local out
  for _, flag in ipairs { "iflag=direct", "" } do
    local p = io.popen(string.format("LC_ALL=C dd if=%s of=/dev/null bs=%d count=%d %s 2>&1", q, DISK_BLOCK, count, flag))
    out = p and p:read("*a") or ""
    if p then p:close() end
    local bytes, secs = out:match("(%d+) bytes.-copied, ([%d%.e%-]+) s")
    bytes, secs = tonumber(bytes), tonumber(secs)
    if bytes and bytes > 0 and secs and secs > 0 then return bytes / secs, flag ~= "", bytes end
  end
  return nil, (out:gsub("%s+$", ""))
end

local function reader_rate(path, bytes)
  local ffi = require "ffi"
  local out_reader, ticket = ffi.new("msh_reader*[1]"), ffi.new("uint64_t[1]")
  local ok, msg = core.try(core.C.msh_reader_open(out_reader, path, require("moonshard.offload").QUEUE_DEPTH, 1024 * 1024, 1))
  if not ok then return nil, msg end
  local r = ffi.gc(out_reader[0], core.C.msh_reader_free)
  local bufs, tickets, err = {}, {}, nil
  local n = math.ceil(bytes / DISK_BLOCK)
  for i = 1, math.min(n, 4) do bufs[i] = assert(tensor.new({ DISK_BLOCK }, "i8", "cpu")) end
  local t0 = uv.hrtime()
  for i = 1, n + #bufs do
    local k = (i - 1) % #bufs + 1
    if tickets[k] and not err then
      ok, msg = core.try(core.C.msh_reader_wait(r, tickets[k]))
      if not ok then err = msg end
    end
    tickets[k] = nil
    if i <= n and not err then
      local off = (i - 1) * DISK_BLOCK
      ok, msg = core.try(core.C.msh_reader_submit(r, bufs[k], off, math.min(DISK_BLOCK, bytes - off), ticket))
      if ok then tickets[k] = ticket[0] else err = msg end
    end
  end
  local secs = (uv.hrtime() - t0) / 1e9
  local direct = ffi.new("int[1]")
  core.C.msh_reader_stats(r, nil, nil, nil, nil, nil, direct)
  core.C.msh_reader_free(ffi.gc(r, nil))
  for _, b in ipairs(bufs) do b:free() end
  if err then return nil, err end
  return bytes / secs, direct[0] == 1
end

function M.disk(path, max_bytes)
  local f = io.open(path, "rb")
  if not f then return nil, string.format("cannot read '%s'", path) end
  local size = f:seek("end")
  f:close()
  local bytes = math.min(size, max_bytes or 8 * 1024 ^ 3)
  if bytes <= 0 then return nil, string.format("'%s' is empty", path) end
  local q = "'" .. path:gsub("'", "'\\''") .. "'"
  os.execute("sync -- " .. q .. " 2>/dev/null")
  local dd, dd_direct = dd_rate(q, math.ceil(bytes / DISK_BLOCK))
  local rd, rd_direct = reader_rate(path, bytes)
  if not dd and not rd then
    return nil, string.format("reading '%s' failed: dd: %s; reader: %s", path, tostring(dd_direct), tostring(rd_direct))
  end
  local direct = (dd and dd_direct) or (rd and rd_direct) or false
  if direct then -- a buffered read beside a direct one measured the page cache: left out
    if dd and not dd_direct then dd = nil end
    if rd and not rd_direct then rd = nil end
  end
  return {
    gbs = math.max(dd or 0, rd or 0) / 1e9, dd_gbs = dd and dd / 1e9, reader_gbs = rd and rd / 1e9,
    direct = direct, bytes = bytes,
  }
end

M.median = median
return M
