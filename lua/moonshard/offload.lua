-- moonshard.offload: streaming stages. They keep each layer's weights off the device and bring
-- them into a ring of device buffers ahead of the layer, behind the stage contract of
-- moonshard.stage (embed, norm, output, acquire, release, close):
--
--   tier "host"    every layer's weights in (pinned) host memory, in the dtype they have on the device
--   tier "disk"    in one file per rank under opts.dir, written once at load and reused while it
--                  matches the checkpoint (a header with a hash of its identity, per-layer offsets and
--                  checksums; a truncated, changed or corrupt file is named and rebuilt, or refused
--                  when the dir is read-only); read with io_uring / O_DIRECT into pinned staging
--   tier "device"  with ZeRO-3 only: the rank's partition resident on its own device
--
-- Layer buffers. A layer's matrices are packed into one flat buffer (each at an offset aligned to
-- 64 bytes and to its dtype's block), so one copy moves a layer and the ring slot's views of it
-- are made once. Small 1-D weights (norms, biases) stay resident on the device, as DeepSpeed's
-- parameter persistence threshold keeps them: the runner reads every attn_norm once at init for
-- the fused norm of tensor parallelism, and they are a rounding error of the bytes.
--
-- ZeRO-3 (opts.zero_comm, the data-parallel communicator of R ranks): the flat buffer is padded to
-- R equal parts and rank r keeps part r in its tier. acquire(l) uploads the rank's part into its
-- place in the ring slot, then all-gathers the slot over the communicator: every rank's host link
-- carries 1/R of the layer. Every rank of the group must acquire the same layers in the same order
-- (the data-parallel ranks run the same number of steps).
--
-- Prefetch: acquire(l) issues the next opts.prefetch layers (in the stage's layer order, wrapping
-- around to the first for the next pass) on a copy stream with an event per slot, so compute waits
-- on the device only; release(l) records when compute is done with the slot before the next
-- upload into it. On the CPU, streams run as they are issued: the same code copies from the tier
-- into the ring synchronously (and disk reads still overlap through io_uring).
local ffi = require "ffi"
local uv = require "luv"
local core = require "moonshard.core"
local tensor = require "moonshard.tensor"
local stream = require "moonshard.stream"
local stage_mod = require "moonshard.stage"

local C = core.C
local try = core.try

local M = {}
local Streaming = {}
Streaming.__index = Streaming

local ALIGN = 4096
M.QUEUE_DEPTH = 64 -- the disk tier's reads of 1 MiB in flight (--queue-depth)
local HEADER_MAGIC = "moonshard-offload 2"

local out_tensor = ffi.new("msh_tensor*[1]")
local out_pool = ffi.new("msh_pin_pool*[1]")
local out_ring = ffi.new("msh_ring*[1]")
local out_reader = ffi.new("msh_reader*[1]")
local out_ticket = ffi.new("uint64_t[1]")
local out_u64 = ffi.new("uint64_t[2]")
local out_int = ffi.new("int[4]")
local out_f64 = ffi.new("double[1]")
local shape_buf = ffi.new("int64_t[8]")

local function round_up(n, a) return math.ceil(n / a) * a end
local function gcd(a, b) while b ~= 0 do a, b = b, a % b end return a end

local function dtype_id(dt) return core.dtypes[dt] end
-- bytes of n elements of dtype dt (whole blocks)
local function nbytes(dt, n)
  local id = dtype_id(dt)
  return math.ceil(n / C.msh_dtype_block_elems(id)) * tonumber(C.msh_dtype_block_bytes(id))
end
-- where a weight of dtype dt may start in a layer buffer: 64 bytes and whole blocks
local function align_of(dt)
  local bb = tonumber(C.msh_dtype_block_bytes(dtype_id(dt)))
  return 64 * bb / gcd(64, bb)
end

local function human(b)
  if b >= 2 ^ 30 then return string.format("%.2f GiB", b / 2 ^ 30) end
  if b >= 2 ^ 20 then return string.format("%.1f MiB", b / 2 ^ 20) end
  return string.format("%d bytes", b)
end

local function fail(s)
  local ok, msg, code = try(s)
  if not ok then error(msg, 0) end
  return ok, code
end

-- A view of bytes [off, off + size) of buf as a (shape, dtype) tensor.
local function view_bytes(buf, off, dt, shape)
  for i = 1, #shape do shape_buf[i - 1] = shape[i] end
  fail(C.msh_tensor_view_bytes(out_tensor, buf, off, dtype_id(dt), #shape, shape_buf))
  return ffi.gc(out_tensor[0], C.msh_tensor_free)
end

-- A layout as one string: each matrix's name, dtype, shape and offset, in order.
local function layout_key(layout)
  local parts = {}
  for i, e in ipairs(layout) do
    parts[i] = string.format("%s:%s:%s:%d", e.name, e.dtype, table.concat(e.shape, "x"), e.offset)
  end
  return table.concat(parts, ";")
end

local function numel_of_shape(shape)
  local n = 1
  for _, d in ipairs(shape) do n = n * d end
  return n
end

local function numel_of(t)
  local n = 1
  for i = 1, t:ndim() do n = n * t:size(i) end
  return n
end

-- M.plan_prefetch(device, slot_bytes, n_layers) -> layers to prefetch ahead: on a GPU as many
-- slots as a quarter of its free memory holds (1 to 4), else 2; never more than the layers less one.
function M.plan_prefetch(device, slot_bytes, n_layers)
  local n = 2
  local kind, index = tensor.device_id(device)
  if kind ~= C.MSH_CPU and slot_bytes > 0 then
    if C.msh_device_mem_info(kind, index, out_u64, out_u64 + 1) == 0 then
      n = math.floor(tonumber(out_u64[0]) / 4 / slot_bytes) - 1
      n = math.max(1, math.min(4, n))
    end
  end
  return math.max(0, math.min(n, n_layers - 1))
end

-- An upper bound of a layer's flat bytes before anything is placed (each matrix at its device
-- dtype, aligned): what the pool, the file and the ring are sized from.
local function estimate(w, kind, dtype, float_dtype)
  local b = 0
  local names = {}
  for k in pairs(w) do names[#names + 1] = k end
  table.sort(names)
  local sig = {}
  for _, k in ipairs(names) do
    local t = w[k]
    local dt = stage_mod.target_dtype(t, kind, dtype, float_dtype)
    local shape = {}
    for i = 1, t:ndim() do shape[i] = t:size(i) end
    sig[#sig + 1] = k .. ":" .. dt .. ":" .. table.concat(shape, "x")
    if t:ndim() >= 2 then b = b + round_up(nbytes(dt, numel_of(t)), align_of(dt)) + align_of(dt) end
  end
  return b, table.concat(sig, ",")
end

-- ------------------------------------------------------------------------------ disk file

local function hash_string(s)
  return tostring(C.msh_hash64(s, #s, 0)):gsub("ULL$", "")
end

local function read_header(path)
  local f = io.open(path, "rb")
  if not f then return nil, "missing" end
  local first = f:read("*l") or ""
  local magic, len = first:match("^(moonshard%-offload %d+) (%d+)$")
  if magic ~= HEADER_MAGIC then
    f:close()
    return nil, "not a moonshard offload file (or one of another version, or written partly)"
  end
  local body = f:read(tonumber(len))
  local size = f:seek("end")
  f:close()
  local ok, h = pcall(require("cjson").decode, body or "")
  if not ok or type(h) ~= "table" then return nil, "its header is malformed" end
  h.file_size = size
  return h
end

-- ------------------------------------------------------------------------------- the stage

-- M.stage(weights, device, opts) -> streaming stage (raises with a clear message; nothing stays
-- allocated then).
--   opts.tier        "host" (default), "disk" or "device" (ZeRO-3 partition resident on the device)
--   opts.dir         the disk tier's folder (one file per rank: moonshard-offload-rank<R>.bin)
--   opts.readonly    the disk tier never writes: a file that does not match is refused
--   opts.rank        the rank naming the file (default 0)
--   opts.identity    a string naming the checkpoint (paths, sizes, mtimes, dtype, slice): the file
--                    is reused only while it matches
--   opts.pin         true: pinned host memory or fail; false: pageable; nil: pinned where the guard
--                    allows, else pageable with a one-line warning
--   opts.prefetch    layers issued ahead of acquire (default: M.plan_prefetch)
--   opts.queue_depth reads in flight for the disk tier (default M.QUEUE_DEPTH: 64, the depth the
--                    disk's ceiling is measured at, moonshard.ceilings.disk)
--   opts.zero_comm   ZeRO-3: the communicator over which layers are partitioned and all-gathered
--   opts.dtype, opts.float_dtype, opts.layers, opts.embed, opts.head, opts.fuse, opts.arch: as
--   moonshard.stage.resident
function M.stage(weights, device, opts)
  opts = opts or {}
  device = device or "cpu"
  local tier = opts.tier or "host"
  if tier ~= "host" and tier ~= "disk" and tier ~= "device" then
    error("unknown offload tier '" .. tostring(tier) .. "' (host, disk or device)", 2)
  end
  if tier == "device" and not opts.zero_comm then error("the device tier needs ZeRO-3 (opts.zero_comm)", 2) end
  local self = setmetatable({
    device = device, tier = tier, streaming = true, views = {}, small = {}, owned = {}, parts = {},
    slots = {}, pending = {}, order = {},
    counters = { bytes = 0, gathered = 0, fetches = 0, wait_s = 0, layer_wait = {}, layer_bytes = {}, layer_fetched = {},
      queued_sum = 0, queued_n = 0 },
  }, Streaming)
  local ok, err = pcall(M.build, self, weights, opts)
  if not ok then
    self:close()
    error(err, 0)
  end
  return self
end

-- Warns once on stderr (a fallback the user allowed).
local function warn(msg) io.stderr:write("moonshard: ", msg, "\n") end

-- Host memory for n bytes of parts: the pinned pool when allowed, else pageable tensors.
local function host_pool(self, bytes, opts, what)
  if opts.pin == false then return nil end
  local ok, msg = try(C.msh_pin_pool_new(out_pool, bytes, 0, -1))
  if ok then return ffi.gc(out_pool[0], C.msh_pin_pool_free) end
  if opts.pin == true then error(string.format("%s: %s", what, msg), 0) end
  warn(string.format("%s: %s; using pageable memory (slower uploads; --pin-memory makes this an error)", what,
    (msg:gsub(" %(offload%.c:%d+%)", ""))))
  self.pageable = true
  return nil
end

local function take(pool, bytes)
  if pool then
    fail(C.msh_pin_pool_take(pool, out_tensor, bytes))
    return ffi.gc(out_tensor[0], C.msh_tensor_free)
  end
  return assert(tensor.new({ bytes }, "i8", "cpu"))
end

function M.build(self, weights, opts)
  local device = self.device
  local kind, index = tensor.device_id(device)
  local dtype, float_dtype = opts.dtype, opts.float_dtype
  -- token embedding, final norm and head: resident (read once per step, not per layer)
  self.globals = stage_mod.resident(weights, device, {
    dtype = dtype, float_dtype = float_dtype, layers = { 1, 0 }, embed = opts.embed, head = opts.head,
    fuse = opts.fuse, arch = opts.arch, plan = false,
  })
  local first, last = 1, #weights.layers
  if opts.layers then first, last = opts.layers[1], opts.layers[2] end
  self.first, self.last = first, last
  local n_layers = last - first + 1
  local comm = opts.zero_comm
  local R = comm and comm:size() or 1
  local rank = comm and comm:rank() or 0
  self.comm, self.R, self.rank = comm, R, rank
  local stacks = opts.fuse ~= false and require("moonshard.models").get(opts.arch).arch.stacks or nil

  -- sizes before anything is placed: each layer's part (an upper bound), the ring slot
  local part_est, sigs, slot_bytes, total = {}, {}, 0, 0
  for l = first, last do
    local b, sig = estimate(weights.layers[l], kind, dtype, float_dtype)
    part_est[l] = round_up(math.ceil(math.max(b, 1) / R), ALIGN)
    sigs[#sigs + 1] = sig
    slot_bytes = math.max(slot_bytes, R * part_est[l])
    total = total + part_est[l]
  end
  self.prefetch = opts.prefetch or M.plan_prefetch(device, slot_bytes, n_layers)
  self.prefetch = math.max(0, math.min(self.prefetch, n_layers - 1))
  local n_slots = self.prefetch + 1

  -- the host tier in host memory that can hold it (MSH_HOST_SHARE, default 0.9, of what the
  -- kernel reports available): else, where the user named an offload dir, the disk tier there
  -- with a one-line warning; else a clear refusal before anything is loaded
  if self.tier == "host" then
    local avail = require("moonshard.memplan").cpu_memory()
    local share = tonumber(os.getenv("MSH_HOST_SHARE") or "") or 0.9
    local need = total + n_layers * ALIGN
    if avail and need > share * avail then
      local what = string.format("the host tier needs %s of host memory, more than the %s it may take (%g of MemAvailable %s)",
        human(need), human(share * avail), share, human(avail))
      if not opts.dir then
        error(what .. ": give --offload-dir DIR to stream from the disk there instead, or --disk-offload", 0)
      end
      warn(what .. ": streaming from the disk in " .. opts.dir .. " instead")
      self.tier = "disk"
    end
  end

  -- the disk tier: the file, checked before anything is loaded
  local rebuild = false
  if self.tier == "disk" then
    local dir = opts.dir
    if not dir or dir == "" then error("the disk tier needs --offload-dir DIR", 0) end
    local ok, msg, code = try(C.msh_dir_space(dir, out_u64, out_int))
    if not ok then
      if code == "ENOENT" then error(string.format("offload dir '%s' does not exist (create it first)", dir), 0) end
      error("offload dir: " .. msg:gsub(" %(offload%.c:%d+%)", ""), 0)
    end
    local free, writable = tonumber(out_u64[0]), out_int[0] == 1
    local path = string.format("%s/moonshard-offload-rank%d.bin", dir, opts.rank or 0)
    self.path = path
    -- the header: identity, sizes, per layer its offset, bytes and checksum (about 100 bytes) and
    -- which of the distinct layouts (the placed matrices' names, dtypes, shapes, offsets) it has
    local header_bytes = round_up(4096 + 128 * n_layers, ALIGN)
    local offsets, at = {}, header_bytes
    for l = first, last do
      offsets[l] = at
      at = at + part_est[l]
    end
    self.file_bytes, self.offsets = at, offsets
    -- what the file's bytes and layouts follow from: the checkpoint, the dtypes, the slice, each
    -- weight's name, target dtype and shape, and the stacks fused (the placement the layouts record)
    local stack_sig = {}
    for name, group in pairs(stacks or {}) do stack_sig[#stack_sig + 1] = name .. "=" .. table.concat(group, "+") end
    table.sort(stack_sig)
    self.identity = hash_string(table.concat({ opts.identity or "", dtype or "", float_dtype or "",
      tostring(opts.fuse), first, last, R, rank, table.concat(sigs, ";"), table.concat(stack_sig, ",") }, "|"))
    local h, why = read_header(path)
    if h and h.identity ~= self.identity then
      why = "made for another checkpoint or slice (its identity does not match)"
    elseif h and h.file_size < (h.total or math.huge) then
      why = string.format("truncated (%d bytes of %d)", h.file_size, h.total)
    elseif h and h.total ~= at then
      why = "of another layout"
    end
    if why == "missing" and not writable then
      error(string.format("offload dir '%s' is not writable: cannot write %s there", dir, path), 0)
    end
    self.header = (not why) and h or nil
    if why and why ~= "missing" then
      if opts.readonly or not writable then
        error(string.format("offload file '%s' is %s; the offload dir is read-only, so it is refused "
          .. "(remove it, or give a writable --offload-dir to rebuild it)", path, why), 0)
      end
      warn(string.format("offload file '%s' is %s: rebuilding it", path, why))
    end
    rebuild = why ~= nil
    if rebuild then
      local f = io.open(path, "rb")
      local have = f and f:seek("end") or 0
      if f then f:close() end
      if free + have < at then
        error(string.format("offload dir '%s' has %s free; the offload file needs %s", dir, human(free + have), human(at)), 0)
      end
    end
    self.staging_pool = host_pool(self, n_slots * slot_bytes + n_slots * ALIGN, opts, "offload staging buffers")
  elseif self.tier == "host" then
    self.pool = host_pool(self, total + n_layers * ALIGN, opts, string.format("the host tier (%d layers)", n_layers))
  end

  -- the ring of layer buffers on the device, its copy stream and events
  fail(C.msh_ring_new(out_ring, n_slots, slot_bytes, kind, index))
  self.ring = ffi.gc(out_ring[0], C.msh_ring_free)
  self.copy = assert(stream.new(device))
  for s = 0, n_slots - 1 do
    self.slots[s] = {
      ready = assert(stream.event(device)), -- the layer is in the slot
      free = assert(stream.event(device)),  -- compute is done with the slot
      staging = self.tier == "disk" and take(self.staging_pool, slot_bytes) or nil,
    }
    self.views[s] = {}
  end

  -- verify a reused file's checksums (a changed byte is caught here, not in the logits)
  if self.tier == "disk" and not rebuild then
    local bad = self:verify()
    if bad then
      if opts.readonly or out_int[0] ~= 1 then
        error(string.format("offload file '%s' is corrupt (%s); the offload dir is read-only, so it is refused", self.path, bad), 0)
      end
      warn(string.format("offload file '%s' is corrupt (%s): rebuilding it", self.path, bad))
      rebuild = true
      self.header = nil
    end
  end

  -- a reused file whose header records each layer's layout: only the layers' vectors (norms,
  -- biases) are placed; the matrices are already in the file, neither read from the checkpoint
  -- nor converted again (quantizing a large model at load takes minutes)
  local reuse = self.tier == "disk" and not rebuild and self:header_layouts()

  -- each layer: placed as the resident stage would, packed, this rank's part kept in the tier
  local pack = (not reuse) and assert(tensor.new({ slot_bytes }, "i8", "cpu")) or nil
  local ok, err = pcall(function()
    if rebuild then fail(C.msh_file_write_at(self.path, 0, nil, 0, 1, self.file_bytes)) end
    local hashes = {}
    for l = first, last do
      local w = weights.layers[l]
      local src = {}
      for _, t in pairs(w) do src[t] = true end
      if reuse then -- the vectors only
        local v = {}
        for k, t in pairs(w) do if t:ndim() == 1 then v[k] = t end end
        w = v
      end
      local placed = stage_mod.place_layer(w, device, dtype, float_dtype, stacks)
      local names = {}
      for k in pairs(placed) do names[#names + 1] = k end
      table.sort(names)
      local layout, off = {}, 0
      for _, k in ipairs(names) do
        local t = placed[k]
        if t:ndim() == 1 then
          self.small[l] = self.small[l] or {}
          self.small[l][k] = t
          if not src[t] then self.owned[#self.owned + 1] = t end
        else
          local dt = t:dtype()
          off = round_up(off, align_of(dt))
          layout[#layout + 1] = { name = k, dtype = dt, shape = t:shape(), offset = off }
          if not self.header or rebuild then
            local v = view_bytes(pack, off, dt, t:shape())
            v:copy_from(t)
            v:free()
          end
          off = off + t:nbytes()
          if not src[t] then t:free() end
        end
      end
      if reuse then
        layout = reuse[l]
        local e = layout[#layout]
        off = e and e.offset + nbytes(e.dtype, numel_of_shape(e.shape)) or 0
      end
      local part = round_up(math.ceil(math.max(off, 1) / R), ALIGN)
      assert(part <= part_est[l], "layer size estimate exceeded") -- the bound above holds by construction
      self.parts[l] = { bytes = part, layout = layout }
      self.counters.layer_bytes[l] = part
      local mine = (not reuse) and pack:narrow(1, rank * part, part) or nil
      if reuse then -- nothing to pack
      elseif self.tier == "disk" then
        if rebuild then
          hashes[l] = tostring(C.msh_hash64(mine:data(), part, 0)):gsub("ULL$", "")
          fail(C.msh_file_write_at(self.path, self.offsets[l], mine, part, 0, 0xffffffffffffffffULL))
        end
      elseif self.tier == "host" then
        local t = take(self.pool, part)
        t:copy_from(mine)
        self.parts[l].src = t
      else -- device
        local t = assert(tensor.new({ part }, "i8", device))
        t:copy_from(mine)
        self.parts[l].src = t
      end
      if mine then mine:free() end
    end
    if rebuild then self:write_header(hashes) end
  end)
  if pack then pack:free() end
  if not ok then error(err, 0) end

  if self.tier == "disk" then
    fail(C.msh_reader_open(out_reader, self.path, opts.queue_depth or M.QUEUE_DEPTH, 0, 1))
    self.reader = ffi.gc(out_reader[0], C.msh_reader_free)
  end
  -- the layer tables acquire returns: the slot's views and the layer's resident small weights
  for s = 0, n_slots - 1 do
    local buf = C.msh_ring_buffer(self.ring, s)
    for l = first, last do
      local p = self.parts[l]
      local w, own = {}, {}
      for _, e in ipairs(p.layout) do
        w[e.name] = view_bytes(buf, e.offset, e.dtype, e.shape)
        own[#own + 1] = w[e.name]
      end
      for k, t in pairs(self.small[l] or {}) do w[k] = t end
      local v = { w = w, own = own, full = buf:narrow(1, 0, R * p.bytes), mine = buf:narrow(1, rank * p.bytes, p.bytes) }
      own[#own + 1], own[#own + 2] = v.full, v.mine
      local staging = self.slots[s].staging
      if staging then
        v.staged = staging:narrow(1, 0, p.bytes)
        own[#own + 1] = v.staged
      end
      self.views[s][l] = v
    end
  end
end

-- The header, written last (a file cut short before it has none and is rebuilt): per layer its
-- offset, bytes, checksum and the index of its layout among the distinct ones (left out where
-- they would not fit the header's room: a reuse then places the layers again).
function Streaming:write_header(hashes)
  local cjson = require "cjson"
  local layers, layouts, keys, index = {}, {}, {}, {}
  for l = self.first, self.last do
    local key = layout_key(self.parts[l].layout)
    if not index[key] then
      layouts[#layouts + 1] = self.parts[l].layout
      keys[#keys + 1] = key
      index[key] = #layouts
    end
    layers[#layers + 1] = { layer = l, offset = self.offsets[l], bytes = self.parts[l].bytes, hash = hashes[l],
      layout = index[key] }
  end
  local h = { identity = self.identity, total = self.file_bytes, layers = layers, layouts = layouts,
    layouts_hash = hash_string(table.concat(keys, "|")) }
  local body = cjson.encode(h)
  if #HEADER_MAGIC + 24 + #body > self.offsets[self.first] then
    for _, e in ipairs(layers) do e.layout = nil end
    h.layouts, h.layouts_hash = nil, nil
    body = cjson.encode(h)
  end
  local text = HEADER_MAGIC .. " " .. #body .. "\n" .. body
  assert(#text <= self.offsets[self.first], "offload header too long")
  local t = assert(tensor.new({ #text }, "i8", "cpu"))
  ffi.copy(t:data(), text, #text)
  fail(C.msh_file_write_at(self.path, 0, t, #text, 0, 0xffffffffffffffffULL))
  t:free()
  self.header = h
end

-- The layouts a valid header records, by layer: nil where it records none, or not for every
-- layer, or not as written above (their hash, their sizes against each layer's bytes). A file
-- without them is still used, its layers placed again to know their layout.
function Streaming:header_layouts()
  local h = self.header
  if type(h) ~= "table" or type(h.layouts) ~= "table" or type(h.layers) ~= "table" then return nil end
  local keys = {}
  for i, lay in ipairs(h.layouts) do
    if type(lay) ~= "table" then return nil end
    local last = -1
    for _, x in ipairs(lay) do
      if type(x) ~= "table" or type(x.name) ~= "string" or type(x.dtype) ~= "string" or not dtype_id(x.dtype)
        or type(x.shape) ~= "table" or #x.shape == 0 or type(x.offset) ~= "number" or x.offset <= last then return nil end
      for _, d in ipairs(x.shape) do if type(d) ~= "number" or d < 1 or d % 1 ~= 0 then return nil end end
      last = x.offset
    end
    keys[i] = layout_key(lay)
  end
  if h.layouts_hash ~= hash_string(table.concat(keys, "|")) then return nil end
  local by = {}
  for _, e in ipairs(h.layers) do
    local lay = type(e) == "table" and h.layouts[e.layout]
    if type(lay) ~= "table" then return nil end
    local x = lay[#lay]
    local need = x and x.offset + nbytes(x.dtype, numel_of_shape(x.shape)) or 0
    if round_up(math.ceil(math.max(need, 1) / self.R), ALIGN) ~= e.bytes then return nil end
    by[e.layer] = lay
  end
  for l = self.first, self.last do if not by[l] then return nil end end
  return by
end

-- Reads every layer of a reused file and compares its checksum: nil, or what is wrong.
function Streaming:verify()
  local ok, msg = try(C.msh_reader_open(out_reader, self.path, M.QUEUE_DEPTH, 0, 1))
  if not ok then return msg end
  local r = ffi.gc(out_reader[0], C.msh_reader_free)
  local by_layer = {}
  for _, e in ipairs(self.header.layers or {}) do by_layer[e.layer] = e end
  local buf = self.slots[0].staging
  local bad
  for l = self.first, self.last do
    local e = by_layer[l]
    if not e or e.offset ~= self.offsets[l] then bad = "layer " .. l .. " missing from its header" break end
    local rok, rmsg = try(C.msh_reader_submit(r, buf, e.offset, e.bytes, out_ticket))
    if rok then rok, rmsg = try(C.msh_reader_wait(r, out_ticket[0])) end
    if not rok then bad = rmsg break end
    local h = tostring(C.msh_hash64(buf:data(), e.bytes, 0)):gsub("ULL$", "")
    if h ~= e.hash then bad = string.format("layer %d's checksum does not match", l - 1) break end
  end
  C.msh_reader_free(ffi.gc(r, nil))
  return bad
end

-- ------------------------------------------------------------------------ acquire / release

local function now() return uv.hrtime() / 1e9 end

-- This rank's part of layer l into slot s's place, then (ZeRO-3) the all-gather of the slot.
function Streaming:upload(s, l, src)
  local v = self.views[s][l]
  local slot = self.slots[s]
  fail(C.msh_stream_wait_event(self.copy.ptr, slot.free.ptr))
  local ok, msg = stream.copy_async(v.mine, src, self.copy)
  if not ok then error(msg, 0) end
  local bytes = self.parts[l].bytes
  local st = self.counters
  st.bytes = st.bytes + bytes
  st.layer_fetched[l] = (st.layer_fetched[l] or 0) + bytes
  if self.comm then
    -- the collective runs on the copy stream (NCCL queues on the current stream)
    local cur = self.device ~= "cpu"
    if cur then assert(self.copy:use()) end
    local gok, gerr = self.comm:all_gather(v.full, v.mine)
    if cur then assert(stream.set_current(self.device, nil)) end
    if not gok then error(string.format("ZeRO-3 all-gather of layer %d: %s", l - 1, gerr), 0) end
    self.counters.gathered = self.counters.gathered + bytes * self.R
  end
  assert(slot.ready:record(self.copy))
end

-- Claims a slot for layer l and starts bringing it in; false when every slot is held.
function Streaming:issue(l)
  if C.msh_ring_claim(self.ring, l, out_int) ~= 0 then
    C.msh_clear_error()
    return false
  end
  local s = out_int[0]
  local p = self.parts[l]
  if self.tier == "disk" then
    local slot = self.slots[s]
    -- the slot's staging buffer may still feed the previous upload from it
    assert(slot.ready:sync())
    fail(C.msh_reader_submit(self.reader, slot.staging, self.offsets[l], p.bytes, out_ticket))
    slot.ticket = out_ticket[0]
    self.pending[#self.pending + 1] = l
  else
    self:upload(s, l, p.src)
  end
  return true
end

-- Disk tier: uploads read layers in issue order: up to layer `upto` (waiting for its read), or
-- with upto nil the leading ones whose reads are done.
function Streaming:finish(upto)
  local pend = self.pending
  if upto then
    local found = false
    for i = 1, #pend do if pend[i] == upto then found = true end end
    if not found then return end
  end
  while #pend > 0 do
    local l = pend[1]
    local s = C.msh_ring_find(self.ring, l)
    local slot = self.slots[s]
    if not upto and C.msh_reader_done(self.reader, slot.ticket) == 0 then return end
    fail(C.msh_reader_wait(self.reader, slot.ticket))
    table.remove(pend, 1)
    self:upload(s, l, self.views[s][l].staged)
    if l == upto then return end
  end
end

-- The layer after l in this stage's order (wrapping to the first: the next pass).
function Streaming:next_layer(l)
  return l == self.last and self.first or l + 1
end

function Streaming:acquire(l)
  local t0 = now()
  local s = C.msh_ring_find(self.ring, l)
  if s < 0 then
    if not self:issue(l) then
      error(string.format("streaming stage: no free ring slot for layer %d (release the layers acquired before)", l - 1), 2)
    end
    s = C.msh_ring_find(self.ring, l)
  end
  if self.tier == "disk" then self:finish(l) end
  -- prefetch the next layers into the free slots
  local nl = l
  for _ = 1, self.prefetch do
    nl = self:next_layer(nl)
    if C.msh_ring_find(self.ring, nl) < 0 and not self:issue(nl) then break end
  end
  local st = self.counters
  if self.tier == "disk" then -- the layer reads queued on the disk once the prefetches are issued
    st.queued_sum, st.queued_n = st.queued_sum + #self.pending, st.queued_n + 1
  end
  -- uploads of reads already done go ahead now, except under ZeRO-3: there every rank must run
  -- its all-gathers at the same points of the program (another collective may come in between)
  if self.tier == "disk" and not self.comm then self:finish(nil) end
  fail(C.msh_stream_wait_event(nil, self.slots[s].ready.ptr))
  local dt = now() - t0
  st.fetches = st.fetches + 1
  st.wait_s = st.wait_s + dt
  st.layer_wait[l] = (st.layer_wait[l] or 0) + dt
  return self.views[s][l].w
end

function Streaming:release(l)
  local s = C.msh_ring_find(self.ring, l)
  if s < 0 then error(string.format("streaming stage: layer %d is not acquired", l - 1), 2) end
  assert(self.slots[s].free:record(nil))
  fail(C.msh_ring_release(self.ring, s))
end

function Streaming:embed() return self.globals and self.globals:embed() end
function Streaming:norm() return self.globals and self.globals:norm() end
function Streaming:output() return self.globals and self.globals:output() end

-- stage:stats() -> { bytes (this rank's parts uploaded), gathered (bytes all-gathered), fetches,
-- wait_s (host time inside acquire), layer_wait[l], layer_bytes[l] (a layer's part),
-- layer_fetched[l] (its part's bytes uploaded, summed over fetches), tier, prefetch, pinned, and for
-- the disk tier: read_bytes, read_wait_s, queue_depth, max_in_flight, uring, direct, and queued_sum /
-- queued_n (layer reads queued on the disk after each acquire's prefetches, summed, and acquires) }
function Streaming:stats()
  local st = {}
  for k, v in pairs(self.counters) do st[k] = v end
  st.tier, st.prefetch, st.pinned, st.zero = self.tier, self.prefetch, not self.pageable, self.R
  if self.reader then
    local ints = ffi.new("int[4]")
    C.msh_reader_stats(self.reader, out_u64, out_f64, ints, ints + 1, ints + 2, ints + 3)
    -- the reader counts from its opening: since reset_stats, as the other counters
    local base = self.read_base or { 0, 0 }
    st.read_bytes, st.read_wait_s = tonumber(out_u64[0]) - base[1], out_f64[0] - base[2]
    st.max_in_flight, st.queue_depth, st.uring, st.direct = ints[0], ints[1], ints[2] == 1, ints[3] == 1
  end
  return st
end

function Streaming:reset_stats()
  local st = self.counters
  st.bytes, st.gathered, st.fetches, st.wait_s, st.layer_wait, st.layer_fetched = 0, 0, 0, 0, {}, {}
  st.queued_sum, st.queued_n = 0, 0
  if self.reader then
    C.msh_reader_stats(self.reader, out_u64, out_f64, nil, nil, nil, nil)
    self.read_base = { tonumber(out_u64[0]), out_f64[0] }
  end
end

-- Frees everything the stage holds (waits for reads and copies in flight first).
function Streaming:close()
  if self.closed then return end
  self.closed = true
  if self.copy then self.copy:sync() end
  if self.reader then C.msh_reader_free(ffi.gc(self.reader, nil)) end
  self.reader = nil
  for _, per in pairs(self.views or {}) do
    for _, v in pairs(per) do
      for _, t in ipairs(v.own) do t:free() end
      v.own, v.w = {}, {}
    end
  end
  self.views = {}
  for _, p in pairs(self.parts or {}) do if p.src then p.src:free() end end
  self.parts = {}
  for _, s in pairs(self.slots or {}) do
    s.ready:close()
    s.free:close()
    if s.staging then s.staging:free() end
  end
  self.slots = {}
  if self.copy then self.copy:close() end
  self.copy = nil
  if self.ring then C.msh_ring_free(ffi.gc(self.ring, nil)) end
  self.ring = nil
  if self.pool then C.msh_pin_pool_free(ffi.gc(self.pool, nil)) end
  if self.staging_pool then C.msh_pin_pool_free(ffi.gc(self.staging_pool, nil)) end
  self.pool, self.staging_pool = nil, nil
  for i = #self.owned, 1, -1 do self.owned[i]:free() end
  self.owned, self.small = {}, {}
  if self.globals then self.globals:close() end
  self.globals = nil
end
Streaming.free = Streaming.close

-- ----------------------------------------------------------------------- command-line flags

-- The flags generate, chat and bench share (moonshard.args entries), named as DeepSpeed's
-- ZeRO-Inference example names them.
M.FLAGS = {
  { "cpu-offload", "flag", "keep every layer's weights in pinned host memory and stream them to the device" },
  { "disk-offload", "flag", "keep every layer's weights in a file under --offload-dir and stream them" },
  { "offload-dir", "string", "folder of the --disk-offload files (one per rank, reused while they match the model); with --cpu-offload, where the layers go when host memory cannot hold them" },
  { "offload-readonly", "flag", "never write the --offload-dir file: refuse one that does not match" },
  { "pin-memory", "flag", "host buffers must be pinned (default: pinned where the limit allows, else pageable with a warning)" },
  { "no-pin-memory", "flag", "host buffers in pageable memory" },
  { "zero", "int", "3: partition every layer over the data-parallel ranks and all-gather it just in time", min = 0, max = 3 },
  { "prefetch", "int", "layers fetched ahead (default: from free device memory, 2 on the CPU)", min = 0 },
  { "queue-depth", "int", "--disk-offload reads of 1 MiB in flight (default 64)", min = 1, max = 4096 },
  { "kv-offload", "flag", "keep the KV cache in pinned host memory, read by the device across the link (batch x context beyond its memory)" },
}

-- Adds the flags to a moonshard.args spec.
function M.add_flags(spec)
  for _, f in ipairs(M.FLAGS) do spec[#spec + 1] = f end
  return spec
end

-- M.load_opts(parsed, into) -> into with moonshard.load's offload options | nil, message
function M.load_opts(o, into)
  into = into or {}
  if o.cpu_offload and o.disk_offload then return nil, "give --cpu-offload or --disk-offload, not both" end
  if o.disk_offload and not o.offload_dir then return nil, "--disk-offload needs --offload-dir DIR" end
  if o.offload_dir and not (o.disk_offload or o.cpu_offload) then
    return nil, "--offload-dir goes with --disk-offload (or --cpu-offload: the disk where host memory falls short)"
  end
  if o.pin_memory and o.no_pin_memory then return nil, "give --pin-memory or --no-pin-memory, not both" end
  if o.zero and o.zero ~= 0 and o.zero ~= 3 then
    return nil, string.format("--zero %d: only ZeRO stage 3 (partitioned weights) exists for inference", o.zero)
  end
  into.offload = o.cpu_offload and "host" or o.disk_offload and "disk" or nil
  into.offload_dir, into.offload_readonly = o.offload_dir, o.offload_readonly
  if o.pin_memory then into.pin = true elseif o.no_pin_memory then into.pin = false end
  into.zero = (o.zero or 0) ~= 0 and o.zero or nil
  into.prefetch, into.queue_depth = o.prefetch, o.queue_depth
  into.kv_offload = o.kv_offload or nil
  return into
end

M.Streaming = Streaming
return M
