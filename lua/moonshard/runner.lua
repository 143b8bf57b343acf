-- moonshard.runner: runs a model's steps. The model file (moonshard.models.<arch>) holds the
-- math of one pass; the runner owns everything around it: the activation buffers and the KV
-- cache (arenas closed by runner:close()), host uploads of token ids and positions, CUDA graph
-- capture and replay of decode steps, batches of sequences in KV cache slots, the pipeline's
-- send/recv between stages, telemetry hooks, and logits.
--
-- The engine's shape (DESIGN.md): request -> scheduler -> step plan -> runner -> model.
--
--   runner:step(batch) is the one entry a scheduler drives. A batch is a list of sequences,
--   each { slot = KV slot (0-based), pos = tokens already in that slot's cache, tokens = ids
--   to compute now (a prompt, a prompt's chunk or one decode token) }; sequences have their own
--   lengths and positions. It returns the logits (n, V) of each sequence's last token, in the
--   batch's order (a view valid until the next call). Decode tokens of any number of sequences
--   run as one pass with positions per sequence (replayed from a CUDA graph per batch size and
--   context bucket); sequences of other lengths run in groups of adjacent slots and equal
--   length. What a scheduler with continuous batching, chunked prefill and a paged KV cache
--   (the serving engine) adds below this interface: block tables in place of slots, and
--   attention over ragged rows (varlen) in place of the grouping, so that a step of any mix is
--   one pass. Nothing above the runner changes then.
--
--   runner:forward(ids, pos0?, opts?) and runner:forward_batch(tokens, pos0?, slot0?) are the
--   single-sequence and equal-length forms the commands and tests use (moonshard.Model).
--
-- Activations live in buffers sized at construction for up to `chunk` tokens of each of up to
-- `batch` sequences; views of them are made once per shape (a step context, below) and freed
-- with the runner. A step allocates nothing.
--
-- A step context `c` is what the model file sees: views x, h, o, q, att, qkv, g, gu (and k, v,
-- u where q/k/v or gate/up are not stacked) of R = B x T rows, their per-head forms, the
-- positions, the layers' caches c.kv[l], and (through its metatable) the runner's constants:
-- eps, scale, inv_freq, rope_style, tp (the tensor-parallel communicator or nil), stage, model.
local ops = require "moonshard.ops"
local tensor = require "moonshard.tensor"
local rope = require "moonshard.rope"
local arena = require "moonshard.arena"
local core = require "moonshard.core"
local ffi = require "ffi"
local C = core.C

local M = {}
local Runner = {}
Runner.__index = Runner

local REQUIRED = { "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "vocab_size", "max_seq" }

-- Checks a description; returns true or nil, message.
function M.validate(desc)
  for _, k in ipairs(REQUIRED) do
    local v = desc[k]
    if type(v) ~= "number" or v <= 0 or v % 1 ~= 0 then
      return nil, string.format("model description: '%s' must be a positive integer (got %s)", k, tostring(v))
    end
  end
  if desc.n_heads % desc.n_kv_heads ~= 0 then
    return nil, string.format("model description: n_heads (%d) is not a multiple of n_kv_heads (%d)",
      desc.n_heads, desc.n_kv_heads)
  end
  local hd = desc.head_dim or desc.dim / desc.n_heads
  if hd % 1 ~= 0 or hd % 2 ~= 0 then
    return nil, string.format("model description: head size %s must be an even integer", tostring(hd))
  end
  return true
end

-- The context a model runs at: the requested one (at most the model's), else the model's. An
-- attention window (sliding_window) shorter than the context is refused when asked for, and
-- bounds the default: within the window, windowed and full attention agree.
function M.context(desc, max_seq)
  local win = desc.sliding_window
  if win and max_seq and max_seq > win then
    return nil, string.format("a context of %d exceeds the model's sliding attention window of %d positions, "
      .. "which moonshard does not implement (use --max-seq %d or less)", max_seq, win, win)
  end
  local n = math.min(max_seq or desc.max_seq, desc.max_seq)
  if win and n > win then n = win end
  return n
end

-- M.new(desc, opts) -> runner (raises on failure; nothing stays allocated then)
--   opts.device    "cpu" (default) or "cuda[:i]": where activations and the KV cache live
--   opts.max_seq   context length (default: the model's; at most the model's)
--   opts.chunk     tokens per forward pass (prefill is split into chunks of this size)
--   opts.kv_dtype  "f32" (default), "f16" or "bf16"
--   opts.stage     a stage owning the weights (default: resident on opts.device, closed with
--                  the runner)
--   opts.batch     sequences (KV cache slots) a step may run at once (default 1)
--   opts.graphs    false: no CUDA graphs
--   opts.tp_comm   sums row-parallel outputs (desc already sliced for this rank)
--   opts.pp_comm   links the pipeline stages, this one running layers opts.layers = { first, last }
--   opts.kv_blocks a paged KV cache (runner:step with block tables, below): each layer's K and V
--                  are a pool of kv_blocks blocks of opts.block_size (default 16) positions, in
--                  place of the batch x max_seq slots (true: as many blocks as those slots hold)
--   opts.kv_offload the KV cache (either form) in pinned host memory, read and written by the
--                  device's kernels across the link (moonshard.kv_offload); opts.pin as
--                  moonshard.offload's (true: pinned or fail; nil: else where it would be, warned)
function M.new(desc, opts)
  opts = opts or {}
  assert(M.validate(desc))
  local model = assert(require("moonshard.models").get(desc.arch))
  local self = setmetatable({}, Runner)
  self.desc, self.model = desc, model
  self.device = opts.device or "cpu"
  self.dim, self.n_layers, self.n_heads, self.n_kv_heads = desc.dim, desc.n_layers, desc.n_heads, desc.n_kv_heads
  self.head_dim = desc.head_dim or desc.dim / desc.n_heads
  self.hidden_dim, self.vocab_size = desc.hidden_dim, desc.vocab_size
  self.norm_eps = desc.norm_eps or 1e-5
  self.max_seq = assert(M.context(desc, opts.max_seq))
  self.chunk = math.min(opts.chunk or 256, self.max_seq)
  self.batch = opts.batch or 1
  assert(type(self.batch) == "number" and self.batch >= 1 and self.batch % 1 == 0,
    "opts.batch must be a positive integer")
  self.tp_comm, self.pp_comm = opts.tp_comm, opts.pp_comm
  self.pp_rank = self.pp_comm and C.msh_comm_rank(self.pp_comm) or 0
  self.pp_size = self.pp_comm and C.msh_comm_size(self.pp_comm) or 1
  self.first_layer = opts.layers and opts.layers[1] or 1
  self.last_layer = opts.layers and opts.layers[2] or desc.n_layers
  self.own_stage = not opts.stage
  self.stage = opts.stage or require("moonshard.stage").resident(desc.weights, self.device, {
    layers = { self.first_layer, self.last_layer }, arch = desc.arch,
    embed = self.pp_rank == 0, head = self.pp_rank == self.pp_size - 1,
    plan = { desc = desc, max_seq = self.max_seq, kv_dtype = opts.kv_dtype, chunk = opts.chunk, batch = opts.batch,
      kv_offload = opts.kv_offload,
      kv_blocks = opts.kv_blocks, block_size = opts.block_size },
  })
  self.act = arena.new(self.device) -- activation buffers, host staging and every view of them
  self.cache = arena.new(self.device) -- the KV cache
  local ok, err = pcall(M.init, self, desc, opts)
  if not ok then
    self:close()
    error(err, 0)
  end
  return self
end

-- The buffers and constants (M.new's second half; a failure leaves them to runner:close()).
function M.init(self, desc, opts)
  local a = self.act
  local function buf(shape, dt) return assert(a:tensor(shape, dt)) end
  -- the attention norms, read a layer early by the fused sum and norm of tensor parallelism
  -- (next_norm[l]: layer l + 1's); and which projections the layers run stacked (qkv, gu) or
  -- one by one (q_k_v, g_u)
  local forms, norms = {}, {}
  for l = self.first_layer, self.last_layer do
    local w = self.stage:acquire(l)
    norms[l] = w.attn_norm
    forms[w.wqkv and "qkv" or "q_k_v"] = true
    forms[w.w_gu and "gu" or "g_u"] = true
    self.stage:release(l)
  end
  self.attn_norms, self.next_norm = norms, {}
  for l = self.first_layer, self.last_layer - 1 do self.next_norm[l] = norms[l + 1] end

  local r = desc.rope or {}
  local inv = rope.inv_freq(r, self.head_dim)
  local inv_host = a:keep(tensor.from(inv, { #inv }, "f32"))
  self.inv_freq = self.device == "cpu" and inv_host or buf({ #inv }, "f32")
  if self.device ~= "cpu" then self.inv_freq:copy_from(inv_host) end

  local Tm, Bm = self.chunk * self.batch, self.batch
  local D, H, KVH, hd, F = self.dim, self.n_heads, self.n_kv_heads, self.head_dim, self.hidden_dim
  self.buf = {
    x = buf { Tm, D }, h = buf { Tm, D }, o = buf { Tm, D },
    q = buf { Tm, H * hd }, att = buf { Tm, H * hd }, g = buf { Tm, F },
    -- the separate projections' k, v and up outputs, the stacked ones' outputs: only those the
    -- layers use (memplan counts the same)
    k = forms.q_k_v and buf { Tm, KVH * hd } or nil, v = forms.q_k_v and buf { Tm, KVH * hd } or nil,
    u = forms.g_u and buf { Tm, F } or nil,
    qkv = forms.qkv and buf { Tm, (H + 2 * KVH) * hd } or nil, gu = forms.gu and buf { Tm, 2 * F } or nil,
    ids = buf({ Tm }, "i32"), pos = buf({ Tm }, "i32"),
    h_last = buf { 1, D }, logits = buf { 1, self.vocab_size },
    -- batches: each sequence's last row, its norm, the logits, its first position
    bx_last = buf { Bm, D }, bh_last = buf { Bm, D }, blogits = buf { Bm, self.vocab_size },
    starts = buf({ Bm }, "i32"),
  }
  -- a vocabulary-parallel head: this rank's columns of the logits, and the gather of every rank's
  if self.tp_comm and desc.vocab_local then
    local Vl = desc.vocab_local
    self.vocab_local, self.tp_size = Vl, C.msh_comm_size(self.tp_comm)
    self.buf.logits_l = buf { 1, Vl }
    self.buf.blogits_l = buf { Bm, Vl }
    self.buf.gather = buf { self.tp_size * Bm * Vl }
  end
  -- token ids and positions are written on the host, then moved when the model is on a device
  if self.device ~= "cpu" then
    self.host_ids = assert(a:keep(tensor.new({ Tm }, "i32", "cpu")))
    self.host_pos = assert(a:keep(tensor.new({ Tm }, "i32", "cpu")))
    self.host_starts = assert(a:keep(tensor.new({ Bm }, "i32", "cpu")))
  else
    self.host_ids, self.host_pos, self.host_starts = self.buf.ids, self.buf.pos, self.buf.starts
  end
  self.ids_ptr = ffi.cast("int32_t*", self.host_ids:data())
  self.pos_ptr = ffi.cast("int32_t*", self.host_pos:data())
  self.starts_ptr = ffi.cast("int32_t*", self.host_starts:data())

  -- the KV cache: K, V (batch, max_seq, KVH, hd) per layer, one slot per sequence; k, v: slot 0,
  -- which forward uses. Paged: K, V (kv_blocks, block_size, KVH, hd) per layer (M.init_paged).
  self.kv = {}
  local kvdt, S, cache = opts.kv_dtype or "f32", self.max_seq, self.cache
  local function slot0(t)
    local row = cache:keep(t:narrow(1, 0, 1))
    return cache:keep(row:reshape { S, KVH, hd })
  end
  if opts.kv_offload then
    -- every layer's K and V from one pinned pool, seen by the device (or, refused with a warning
    -- the user allowed, the cache stays in the arena made for it)
    local shape = { Bm, S, KVH, hd }
    if opts.kv_blocks then
      local nb, bs = M.paged_dims(self, opts)
      shape = { nb, bs, KVH, hd }
    end
    local sizes, kvo = {}, require "moonshard.kv_offload"
    for i = 1, 2 * (self.last_layer - self.first_layer + 1) do sizes[i] = kvo.nbytes(shape, kvdt) end
    local host = kvo.arena(self.device, sizes, { pin = opts.pin })
    if host then
      cache:close()
      cache = host
      self.cache = host
    end
  end
  if opts.kv_blocks then
    M.init_paged(self, opts, kvdt)
  else
    for l = self.first_layer, self.last_layer do
      local K = assert(cache:tensor({ Bm, S, KVH, hd }, kvdt))
      local V = assert(cache:tensor({ Bm, S, KVH, hd }, kvdt))
      self.kv[l] = { K = K, V = V, k = slot0(K), v = slot0(V) }
    end
  end
  self.kv_host = cache.info and cache:info() or nil -- where --kv-offload put the cache

  -- the constants every step context reads (its metatable's __index)
  self.const = {
    eps = self.norm_eps, scale = 1 / math.sqrt(hd), inv_freq = self.inv_freq,
    rope_style = (r.style == "half") and ops.ROPE_HALF or ops.ROPE_INTERLEAVED,
    tp = self.tp_comm, tp_size = self.tp_size, vocab_local = self.vocab_local, buf = self.buf,
    batch = self.batch, device = self.device, stage = self.stage, model = self.model,
    first_layer = self.first_layer, last_layer = self.last_layer, next_norm = self.next_norm,
    embed = self.pp_rank == 0,
  }
  self.const_mt = { __index = self.const }
  self.views = {}
  self.batch_ctxs = {} -- [slot0][B][T]: step contexts of forward_batch
  self.pos = 0 -- tokens in the cache (slot 0)
  self.slot_pos = {} -- tokens in the cache of slots 1 .. batch - 1
  self.pos_list = {} -- forward_batch's positions (reused)
  -- decode steps replay CUDA graphs on a GPU unless opts.graphs == false
  self.device_kind, self.device_index = tensor.device_id(self.device)
  -- (tensor-parallel ranks capture their all-reduces with the step when the communicator can:
  -- the one-shot kernel of NCCL ranks on one host; pipeline stages wait on their peers eagerly)
  self.use_graphs = self.device ~= "cpu" and opts.graphs ~= false and C.msh_has_cuda() == 1
    and (not self.tp_comm or self:tp_capturable(1)) and not self.pp_comm
  self.graphs = {}
  self.batch_graphs = {} -- [slot0][B][context bucket]: batched decode steps
end

-- Frees the graphs, the KV cache, the activation buffers and their views, and the stage when
-- the runner made it. The runner is unusable afterwards; closing twice does nothing.
function Runner:close()
  if self.closed then return end
  self.closed = true
  local function free_graphs(t)
    for k, g in pairs(t) do
      if type(g) == "table" then free_graphs(g) else C.msh_graph_free(ffi.gc(g, nil)) end
      t[k] = nil
    end
  end
  free_graphs(self.graphs or {})
  free_graphs(self.batch_graphs or {})
  free_graphs(self.paged_graphs or {})
  for _, row in pairs(self.paged_ctxs or {}) do
    for _, c in pairs(row) do c.arena:close() end
  end
  self.paged_count = 0
  self.views, self.batch_ctxs, self.paged_ctxs, self.kv = {}, {}, {}, {}
  self.cache:close()
  self.act:close()
  if self.own_stage and self.stage then self.stage:close() end
  self.stage = nil
end

-- Whether the tensor-parallel all-reduces of a step of R rows can be captured into a CUDA graph
-- (MSH_TP_GRAPHS=1 also captures NCCL's own kernels). Asked once per R: the buffers are fixed.
local function tp_capturable(self, R)
  local tp = self.tp_comm
  if not tp then return true end
  if os.getenv("MSH_TP_GRAPHS") == "1" and C.msh_comm_kind(tp) == C.MSH_COMM_NCCL then return true end
  local o = self.buf.o:narrow(1, 0, R)
  local ok = C.msh_comm_capturable(tp, C.MSH_COMM_OP_ALL_REDUCE, o) == 1
  o:free()
  if not ok or not self.vocab_local then return ok end
  local l = R == 1 and self.buf.logits_l or self.buf.blogits_l:narrow(1, 0, R)
  ok = C.msh_comm_capturable(tp, C.MSH_COMM_OP_ALL_GATHER, l) == 1
  if R ~= 1 then l:free() end
  return ok
end

function Runner:tp_capturable(R)
  local known = self.tp_capturable_rows
  if not known then
    known = {}
    self.tp_capturable_rows = known
  end
  if known[R] == nil then known[R] = tp_capturable(self, R) end
  return known[R]
end

-- The views of T rows of the activation buffers, made through arena a (their owner).
local function make_views(self, T, a)
  local c
  local b, H, KVH, hd = self.buf, self.n_heads, self.n_kv_heads, self.head_dim
  local function keep(t) return t and a:keep(t) end
  local function rows(t) return t and keep(t:narrow(1, 0, T)) end
  c = setmetatable({
    R = T, T = T, B = 1,
    x = rows(b.x), h = rows(b.h), o = rows(b.o),
    q = rows(b.q), k = rows(b.k), v = rows(b.v), att = rows(b.att),
    g = rows(b.g), u = rows(b.u), ids = rows(b.ids), pos = rows(b.pos),
    qkv = rows(b.qkv), gu = rows(b.gu),
    kv = self.kv, logits = b.logits, h_last = b.h_last, x_last = keep(b.x:narrow(1, T - 1, 1)), nlog = 1,
  }, self.const_mt)
  c.qr = keep(c.q:reshape { T, H, hd }) -- queries by head, for the projections and rope
  c.k3 = c.k and keep(c.k:reshape { T, KVH, hd })
  c.v3 = c.v and keep(c.v:reshape { T, KVH, hd })
  c.qa, c.atta = c.qr, keep(c.att:reshape { T, H, hd }) -- attention's queries and output
  c.kr, c.vr, c.starts = c.k3, c.v3, c.pos -- the rows stored into the cache, from positions
  if self.device ~= "cpu" then
    c.host_ids = keep(self.host_ids:narrow(1, 0, T))
    c.host_pos = keep(self.host_pos:narrow(1, 0, T))
  end
  return c
end

-- The step context of one sequence's pass of T tokens in slot 0 (made once per T).
function Runner:views_for(T)
  local c = self.views[T]
  if c then return c end
  c = make_views(self, T, self.act)
  self.views[T] = c
  return c
end

-- The step context of B sequences of T tokens in slots slot0 .. slot0 + B - 1 (made once per
-- (slot0, B, T)): the activations of B * T rows in their 4-D forms, the slots' caches, the
-- sequences' first positions (the rows' own when T = 1) and logits.
function Runner:batch_ctx(B, T, slot0)
  local by_slot = self.batch_ctxs[slot0]
  if not by_slot then by_slot = {}; self.batch_ctxs[slot0] = by_slot end
  local by_b = by_slot[B]
  if not by_b then by_b = {}; by_slot[B] = by_b end
  local c = by_b[T]
  if c then return c end
  local R, D, H, KVH, hd = B * T, self.dim, self.n_heads, self.n_kv_heads, self.head_dim
  local a, v, b = self.act, self:views_for(B * T), self.buf
  local function keep(t) return t and a:keep(t) end
  c = setmetatable({}, self.const_mt)
  for k, x in pairs(v) do c[k] = x end
  c.R, c.T, c.B, c.nlog = R, T, B, B
  c.qa, c.atta = keep(v.q:reshape { B, T, H, hd }), keep(v.att:reshape { B, T, H, hd })
  c.kr = v.k and keep(v.k:reshape { B, T, KVH, hd })
  c.vr = v.v and keep(v.v:reshape { B, T, KVH, hd })
  c.starts = T == 1 and v.pos or keep(b.starts:narrow(1, 0, B))
  c.h_last, c.logits = keep(b.bh_last:narrow(1, 0, B)), keep(b.blogits:narrow(1, 0, B))
  if T == 1 then
    c.x_last = v.x
  else
    c.x_last = keep(b.bx_last:narrow(1, 0, B))
    c.x_rows = keep(v.x:view({ B, D }, { T * D, 1 }, (T - 1) * D)) -- row T - 1 of each sequence
    c.host_starts = keep(self.host_starts:narrow(1, 0, B))
  end
  c.kv = {}
  for l = self.first_layer, self.last_layer do
    local kv = self.kv[l]
    c.kv[l] = { k = keep(kv.K:narrow(1, slot0, B)), v = keep(kv.V:narrow(1, slot0, B)) }
  end
  by_b[T] = c
  return c
end

-- Moves the T token ids and positions pos0 .. pos0+T-1 to the device's buffers.
function Runner:upload(T, pos0)
  local c = self:views_for(T)
  local pos_ptr = self.pos_ptr
  for i = 0, T - 1 do pos_ptr[i] = pos0 + i end
  if c.host_ids then
    c.ids:copy_from(c.host_ids)
    c.pos:copy_from(c.host_pos)
  end
  return c
end

local function comm_check(s)
  if s ~= 0 then error((core.errmsg(s)), 3) end
end

-- One pass of the model over a step context: positions from pos0 (or, with dyn_len, read on
-- the device when the ops run, attention planned for up to dyn_len positions: the form a CUDA
-- graph captures and replays); all_logits_out: every row's logits too. A pipeline stage
-- receives x from the one before and sends it on (unless a schedule moves activations itself:
-- pp_external); every stage gets the last one's logits, so each samples the same token.
function Runner:run(c, pos0, dyn_len, all_logits_out)
  c.pos0, c.dyn_len, c.normed = pos0, dyn_len, false
  local pp, pp_rank, pp_size = self.pp_comm, self.pp_rank, self.pp_size
  local hooks = self.hooks -- optional: begin(runner, rows) once the input is here, finish(runner) before it leaves
  if self.pp_external then pp = nil end
  if pp_rank > 0 and pp then comm_check(C.msh_comm_recv(pp, c.x, pp_rank - 1)) end
  if hooks then hooks.begin(self, c.R) end
  local model = self.model
  model.forward(c)
  if pp_rank < pp_size - 1 then
    if hooks then hooks.finish(self) end
    if pp then comm_check(C.msh_comm_send(pp, c.x, pp_rank + 1)) end
  else
    if all_logits_out then model.logits(c, all_logits_out, c.x, c.h, c.R) end
    if c.x_rows then c.x_last:copy_from(c.x_rows) end -- each sequence's last row
    if c.last_rows then ops.embedding(c.x_last, c.x, c.last_rows) end -- (ragged rows: by index)
    model.logits(c, c.logits, c.x_last, c.h_last, c.nlog)
    if hooks then hooks.finish(self) end
  end
  if pp then
    if all_logits_out then comm_check(C.msh_comm_broadcast(pp, all_logits_out, pp_size - 1)) end
    comm_check(C.msh_comm_broadcast(pp, c.logits, pp_size - 1))
  end
end

-- Context-length buckets of the decode graphs: one graph per bucket, replayed at every position
-- inside it (attention is planned for the bucket's length).
local function bucket_for(n, max_seq)
  local b = 256
  while b < n do b = b * 2 end
  return math.min(b, max_seq)
end

-- A decode step of context c through the CUDA graph in graphs[len]: recorded on the bucket's
-- first step (run eagerly first, with positions from the device, to size the scratch), replayed
-- after.
function Runner:graph_step(c, graphs, len, pos0)
  local g = graphs[len]
  if g then
    local hooks = self.hooks
    if hooks then hooks.begin(self, c.R) end
    local s = C.msh_graph_launch(g)
    if s ~= 0 then core.check(s) end
    if hooks then hooks.finish(self) end
    return
  end
  self:run(c, pos0, len)
  local kind, index = self.device_kind, self.device_index
  if not core.try(C.msh_graph_begin(kind, index)) then
    self.use_graphs = false -- no graphs on this device: stay eager
    return
  end
  local cok, cerr = pcall(self.run, self, c, pos0, len)
  local out = ffi.new("msh_graph*[1]")
  local s = C.msh_graph_end(kind, index, out)
  if not cok then error(cerr, 0) end
  core.check(s)
  graphs[len] = ffi.gc(out[0], C.msh_graph_free)
end

-- Whether n tokens (an id, or a list of ids) fit the context at pos0 and the vocabulary; or
-- nil, message naming the first that does not.
local function check_tokens(self, ids, n, pos0)
  if pos0 + n > self.max_seq then
    return nil, string.format("context full: %d tokens at position %d exceed the context of %d", n, pos0, self.max_seq)
  end
  local V = self.vocab_size
  for i = 1, n do
    local id = type(ids) == "number" and ids or ids[i]
    if type(id) ~= "number" or id < 0 or id >= V or id % 1 ~= 0 then
      return nil, string.format("token id %s outside the vocabulary [0, %d)", tostring(id), V)
    end
  end
  return true
end

-- runner:forward(ids, pos0?, opts?) -> logits of the last token (1, V), or of every token (T, V)
-- with opts.all_logits (a new tensor, the caller's to free). ids: a Lua array of token ids or a
-- single id. pos0 defaults to the number of tokens already in the cache. Returns nil, message
-- when the context is full.
function Runner:forward(ids, pos0, opts)
  local n = type(ids) == "number" and 1 or #ids
  pos0 = pos0 or self.pos
  if n == 0 then return nil, "forward: no tokens" end
  local ok, err = check_tokens(self, ids, n, pos0)
  if not ok then return nil, err end
  local V = self.vocab_size
  local all = opts and opts.all_logits and assert(tensor.new({ n, V }, "f32", self.device))
  local done = 0
  while done < n do
    local T = math.min(self.chunk, n - done)
    if type(ids) == "number" then
      self.ids_ptr[0] = ids
    else
      for i = 0, T - 1 do self.ids_ptr[i] = ids[done + i + 1] end
    end
    local c = self:upload(T, pos0 + done)
    if T == 1 and not all and self.use_graphs then
      self:graph_step(c, self.graphs, bucket_for(pos0 + done + 1, self.max_seq), pos0 + done)
    else
      local part = all and all:narrow(1, done, T)
      self:run(c, pos0 + done, nil, part)
      if part then part:free() end
    end
    done = done + T
  end
  self.pos = pos0 + n
  return all or self.buf.logits
end

-- Tokens in the cache of a slot.
function Runner:slot_position(slot)
  if slot == 0 then return self.pos end
  return self.slot_pos[slot] or 0
end

local function set_slot_position(self, slot, n)
  if slot == 0 then self.pos = n else self.slot_pos[slot] = n end
end

-- runner:forward_batch(tokens, pos0?, slot0?) -> logits (B, V) f32 of each sequence's last token,
-- on the runner's device (a view, valid until the next call), or nil, message.
--   tokens: B arrays of T token ids each (the same T for all), B <= opts.batch.
--   pos0: the first position of every sequence (a number), or an array of B numbers (sequences
--     of different lengths decode together: positions read on the device per sequence); default:
--     each slot's tokens in the cache.
--   slot0: the first KV cache slot (0-based, default 0); sequence b uses slot slot0 + b - 1.
--     Slot 0 is the cache runner:forward uses.
-- Prompts longer than opts.chunk go in chunks. Decode steps (T = 1) replay CUDA graphs on a GPU.
function Runner:forward_batch(tokens, pos0, slot0)
  slot0 = slot0 or 0
  local B = type(tokens) == "table" and #tokens or 0
  if B == 0 then return nil, "forward_batch: no sequences" end
  if slot0 < 0 or slot0 % 1 ~= 0 or slot0 + B > self.batch then
    return nil, string.format("forward_batch: slots [%s, %s) outside the model's %d (opts.batch)",
      tostring(slot0), tostring(slot0 + B), self.batch)
  end
  local T = #tokens[1]
  if T == 0 then return nil, "forward_batch: no tokens" end
  local V, pos, uniform, max_pos = self.vocab_size, self.pos_list, true, 0
  for b = 1, B do
    local seq = tokens[b]
    if type(seq) ~= "table" or #seq ~= T then
      return nil, string.format("forward_batch: sequence %d has %s tokens, sequence 1 has %d (equal lengths only)",
        b, type(seq) == "table" and tostring(#seq) or "no", T)
    end
    for i = 1, T do
      local id = seq[i]
      if type(id) ~= "number" or id < 0 or id >= V or id % 1 ~= 0 then
        return nil, string.format("forward_batch: token id %s of sequence %d outside the vocabulary [0, %d)",
          tostring(id), b, V)
      end
    end
    local p
    if type(pos0) == "number" then p = pos0
    elseif type(pos0) == "table" then p = pos0[b]
    else p = self:slot_position(slot0 + b - 1) end
    if type(p) ~= "number" or p < 0 or p % 1 ~= 0 then
      return nil, string.format("forward_batch: position %s of sequence %d is not a position", tostring(p), b)
    end
    if p + T > self.max_seq then
      return nil, string.format("context full: %d tokens at position %d exceed the context of %d (sequence %d)",
        T, p, self.max_seq, b)
    end
    pos[b] = p
    if p ~= pos[1] then uniform = false end
    if p > max_pos then max_pos = p end
  end
  local ids_ptr, pos_ptr, starts_ptr = self.ids_ptr, self.pos_ptr, self.starts_ptr
  local done, c = 0, nil
  while done < T do
    local Tc = math.min(self.chunk, T - done)
    c = self:batch_ctx(B, Tc, slot0)
    for b = 0, B - 1 do
      local seq, p, r = tokens[b + 1], pos[b + 1] + done, b * Tc
      for i = 0, Tc - 1 do
        ids_ptr[r + i] = seq[done + i + 1]
        pos_ptr[r + i] = p + i
      end
      starts_ptr[b] = p
    end
    if c.host_ids then
      c.ids:copy_from(c.host_ids)
      c.pos:copy_from(c.host_pos)
    end
    if Tc == 1 and self.use_graphs and self:tp_capturable(B) then
      local by_slot = self.batch_graphs[slot0]
      if not by_slot then by_slot = {}; self.batch_graphs[slot0] = by_slot end
      local graphs = by_slot[B]
      if not graphs then graphs = {}; by_slot[B] = graphs end
      self:graph_step(c, graphs, bucket_for(max_pos + done + 1, self.max_seq), nil)
    elseif uniform then
      self:run(c, pos[1] + done)
    else
      if c.host_starts and self.device ~= "cpu" then c.starts:copy_from(c.host_starts) end
      self:run(c, nil, bucket_for(max_pos + done + Tc, self.max_seq))
    end
    done = done + Tc
  end
  for b = 1, B do set_slot_position(self, slot0 + b - 1, pos[b] + T) end
  return c.logits
end

-- runner:step(batch) -> logits (n, V) of each sequence's last token in the batch's order, or
-- nil, message. batch: a list of { slot, pos, tokens } (see the top of this file). Sequences
-- run in groups of adjacent slots with equal token counts (one pass each); decode groups take
-- their positions per sequence.
function Runner:step(batch)
  if self.paged then return self:step_paged(batch) end
  local n = #batch
  if n == 0 then return nil, "step: no sequences" end
  if n > self.batch then
    return nil, string.format("step: %d sequences for %d KV slots (opts.batch)", n, self.batch)
  end
  local seen = {}
  for i, s in ipairs(batch) do
    if type(s) ~= "table" or type(s.tokens) ~= "table" or #s.tokens == 0 then
      return nil, string.format("step: sequence %d has no tokens", i)
    end
    local slot = s.slot
    if type(slot) ~= "number" or slot < 0 or slot >= self.batch or slot % 1 ~= 0 then
      return nil, string.format("step: sequence %d: slot %s outside [0, %d)", i, tostring(slot), self.batch)
    end
    if seen[slot] then return nil, string.format("step: slot %d appears twice", slot) end
    seen[slot] = true
  end
  -- groups: sequences sorted by slot, cut where the slot is not the next or the length differs
  local order = {}
  for i = 1, n do order[i] = i end
  table.sort(order, function(x, y) return batch[x].slot < batch[y].slot end)
  local out = self.step_logits
  if not out then
    out = assert(self.act:tensor({ self.batch, self.vocab_size }, "f32"))
    self.step_logits = out
  end
  local i = 1
  while i <= n do
    local first = batch[order[i]]
    local j = i
    while j < n do
      local nx = batch[order[j + 1]]
      if nx.slot ~= batch[order[j]].slot + 1 or #nx.tokens ~= #first.tokens then break end
      j = j + 1
    end
    local toks, pos = {}, {}
    for k = i, j do
      toks[#toks + 1] = batch[order[k]].tokens
      pos[#pos + 1] = batch[order[k]].pos
    end
    local logits, err = self:forward_batch(toks, pos, first.slot)
    if not logits then return nil, err end
    for k = i, j do
      local dst, src = out:narrow(1, order[k] - 1, 1), logits:narrow(1, k - i, 1)
      dst:copy_from(src)
      dst:free()
      src:free()
    end
    i = j + 1
  end
  local view = self.step_views and self.step_views[n]
  if not view then
    self.step_views = self.step_views or {}
    view = self.act:keep(out:narrow(1, 0, n))
    self.step_views[n] = view
  end
  return view
end

-- ------------------------------------------------------------------------ the paged KV cache
-- With opts.kv_blocks each layer's cache is a pool of blocks, K and V (num_blocks, block_size,
-- KVH, hd), and runner:step takes sequences as { blocks = { block ids (0-based) ... }, pos,
-- tokens }: position p of a sequence lives at row p % block_size of blocks[p // block_size + 1].
-- A step's rows sit back to back (R = the sum of the sequences' token counts, at most
-- batch x chunk) and run as ONE pass whatever the mix of prompt chunks and decodes: the new K/V
-- rows go to the pool by a slot mapping (msh_op_kv_write) and attention reads through block
-- tables (msh_op_paged_attention, varlen). Steps of decodes only replay a CUDA graph per batch
-- size and context bucket. The device arrays of a step (i32): slots (R), q_start (B + 1),
-- ctx_len (B), last_rows (B: each sequence's last row, whose logits the step returns),
-- block_table (B, max_blocks).

-- The pool's blocks and block size (checked).
function M.paged_dims(self, opts)
  local bs = opts.block_size or 16
  local nb = opts.kv_blocks == true and self.batch * math.ceil(self.max_seq / bs) or opts.kv_blocks
  for name, v in pairs { kv_blocks = nb, block_size = bs } do
    assert(type(v) == "number" and v >= 1 and v % 1 == 0, "opts." .. name .. " must be a positive integer")
  end
  return nb, bs
end

-- Allocates the pools and the step arrays (M.init's paged branch).
function M.init_paged(self, opts, kvdt)
  local nb, bs = M.paged_dims(self, opts)
  local a, cache, Tm, Bm = self.act, self.cache, self.chunk * self.batch, self.batch
  local KVH, hd = self.n_kv_heads, self.head_dim
  local mb = math.ceil(self.max_seq / bs)
  self.paged = { num_blocks = nb, block_size = bs, max_blocks = mb }
  for l = self.first_layer, self.last_layer do
    self.kv[l] = { k_pool = assert(cache:tensor({ nb, bs, KVH, hd }, kvdt)),
                   v_pool = assert(cache:tensor({ nb, bs, KVH, hd }, kvdt)) }
  end
  local b = self.buf
  -- k, v rows of the step before they go to the pool (the fused projections store them here)
  b.kst, b.vst = assert(a:tensor { Tm, KVH, hd }), assert(a:tensor { Tm, KVH, hd })
  local arrays = { slots = Tm, q_start = Bm + 1, ctx_len = Bm, last_rows = Bm, block_table = Bm * mb }
  self.pg_dev, self.pg_host, self.pg_ptr = {}, {}, {}
  for name, n in pairs(arrays) do
    local d = assert(a:tensor({ n }, "i32"))
    local h = self.device == "cpu" and d or assert(a:keep(tensor.new({ n }, "i32", "cpu")))
    self.pg_dev[name], self.pg_host[name], self.pg_ptr[name] = d, h, ffi.cast("int32_t*", h:data())
  end
  self.paged_ctxs = {} -- [R][B]
  self.paged_graphs = {} -- [B][context bucket]
end

-- Step contexts kept at most (a server meets many (rows, sequences) shapes: each made once and
-- kept while used, the least recently used one freed beyond this many).
M.PAGED_CONTEXTS = 128

local function drop_paged_ctx(self, c)
  self.paged_ctxs[c.R][c.B] = nil
  self.paged_count = self.paged_count - 1
  c.arena:close()
end

-- The step context of R rows of B sequences: its views live in an arena of its own.
function Runner:paged_ctx(R, B)
  local by_r = self.paged_ctxs[R]
  if not by_r then by_r = {}; self.paged_ctxs[R] = by_r end
  self.paged_clock = (self.paged_clock or 0) + 1
  local c = by_r[B]
  if c then c.used = self.paged_clock return c end
  if (self.paged_count or 0) >= M.PAGED_CONTEXTS then
    local old
    for _, row in pairs(self.paged_ctxs) do
      for _, x in pairs(row) do if not old or x.used < old.used then old = x end end
    end
    drop_paged_ctx(self, old)
  end
  self.paged_count = (self.paged_count or 0) + 1
  local a = arena.new(self.device)
  local b, v, S = self.buf, make_views(self, R, a), self.max_seq
  local KVH, hd, mb = self.n_kv_heads, self.head_dim, self.paged.max_blocks
  local function keep(t) return t and a:keep(t) end
  c = setmetatable({}, self.const_mt)
  for k, x in pairs(v) do c[k] = x end
  c.R, c.B, c.T, c.nlog, c.paged, c.arena, c.used = R, B, nil, B, true, a, self.paged_clock
  c.x_rows = nil
  c.kr, c.vr = keep(b.kst:narrow(1, 0, R)), keep(b.vst:narrow(1, 0, R))
  -- the fused projections store k, v at row pos[r] of sequence r's cache: R one-row "caches" of
  -- S positions that all alias one staging row (stride 0) gather them in kr, vr
  local k4 = keep(c.kr:view({ R, S, KVH, hd }, { KVH * hd, 0, hd, 1 }, 0))
  local v4 = keep(c.vr:view({ R, S, KVH, hd }, { KVH * hd, 0, hd, 1 }, 0))
  local d = self.pg_dev
  c.slots = keep(d.slots:narrow(1, 0, R))
  c.q_start, c.ctx_len = keep(d.q_start:narrow(1, 0, B + 1)), keep(d.ctx_len:narrow(1, 0, B))
  c.block_table = keep(keep(d.block_table:narrow(1, 0, B * mb)):reshape { B, mb })
  c.h_last, c.logits = keep(b.bh_last:narrow(1, 0, B)), keep(b.blogits:narrow(1, 0, B))
  if R == B then
    c.x_last = v.x
  else
    c.x_last = keep(b.bx_last:narrow(1, 0, B))
    c.last_rows = keep(d.last_rows:narrow(1, 0, B))
  end
  c.kv = {}
  for l = self.first_layer, self.last_layer do
    local kv = self.kv[l]
    c.kv[l] = { k = k4, v = v4, k_pool = kv.k_pool, v_pool = kv.v_pool }
  end
  by_r[B] = c
  return c
end

-- Checks a paged step's sequences and writes its host arrays; returns R, max context or nil,
-- message.
local function paged_plan(self, batch)
  local B = #batch
  if B == 0 then return nil, "step: no sequences" end
  if B > self.batch then
    return nil, string.format("step: %d sequences for a batch of %d (opts.batch)", B, self.batch)
  end
  local pg, V = self.paged, self.vocab_size
  local bs, nb, mb = pg.block_size, pg.num_blocks, pg.max_blocks
  local p = self.pg_ptr
  local ids, pos, slots, qs, cl, last, bt = self.ids_ptr, self.pos_ptr, p.slots, p.q_start, p.ctx_len, p.last_rows,
    p.block_table
  local R, max_ctx, Tm = 0, 0, self.chunk * self.batch
  qs[0] = 0
  for b = 1, B do
    local s = batch[b]
    local toks, blocks, p0 = type(s) == "table" and s.tokens, type(s) == "table" and s.blocks, type(s) == "table" and s.pos
    local n = type(toks) == "table" and #toks or 0
    if n == 0 then return nil, string.format("step: sequence %d has no tokens", b) end
    if type(blocks) ~= "table" then return nil, string.format("step: sequence %d has no block table (blocks)", b) end
    if type(p0) ~= "number" or p0 < 0 or p0 % 1 ~= 0 then
      return nil, string.format("step: sequence %d: position %s is not a position", b, tostring(p0))
    end
    local ctx = p0 + n
    if ctx > self.max_seq then
      return nil, string.format("context full: %d tokens at position %d exceed the context of %d (sequence %d)", n, p0,
        self.max_seq, b)
    end
    local need = math.ceil(ctx / bs)
    if #blocks < need then
      return nil, string.format("step: sequence %d: %d blocks hold %d positions, not %d", b, #blocks, #blocks * bs, ctx)
    end
    if R + n > Tm then
      return nil, string.format("step: %d rows exceed the step's %d (batch x chunk)", R + n, Tm)
    end
    local row0 = (b - 1) * mb
    for j = 1, need do
      local id = blocks[j]
      if type(id) ~= "number" or id < 0 or id >= nb or id % 1 ~= 0 then
        return nil, string.format("step: sequence %d: block %s (index %d) outside the pool [0, %d)", b, tostring(id), j, nb)
      end
      bt[row0 + j - 1] = id
    end
    for j = need, mb - 1 do bt[row0 + j] = 0 end
    for i = 1, n do
      local id, q = toks[i], p0 + i - 1
      if type(id) ~= "number" or id < 0 or id >= V or id % 1 ~= 0 then
        return nil, string.format("step: token id %s of sequence %d outside the vocabulary [0, %d)", tostring(id), b, V)
      end
      local r = R + i - 1
      ids[r], pos[r] = id, q
      slots[r] = blocks[math.floor(q / bs) + 1] * bs + q % bs
    end
    R = R + n
    qs[b], cl[b - 1], last[b - 1] = R, ctx, R - 1
    if ctx > max_ctx then max_ctx = ctx end
  end
  return R, max_ctx
end

-- Moves a step's host arrays to the device (the used part of each).
local function paged_upload(self, c, R, B)
  if self.device == "cpu" then return end
  local h, d, mb = self.pg_host, self.pg_dev, self.paged.max_blocks
  local function up(name, n)
    local dst, src = d[name]:narrow(1, 0, n), h[name]:narrow(1, 0, n)
    dst:copy_from(src)
    dst:free(); src:free()
  end
  c.ids:copy_from(c.host_ids)
  c.pos:copy_from(c.host_pos)
  up("slots", R); up("q_start", B + 1); up("ctx_len", B); up("block_table", B * mb)
  if c.last_rows then up("last_rows", B) end
end

-- runner:step(batch) in paged mode; all_out: every row's logits too (R, V).
function Runner:step_paged(batch, all_out)
  local R, max_ctx = paged_plan(self, batch)
  if not R then return nil, max_ctx end
  local B = #batch
  local c = self:paged_ctx(R, B)
  paged_upload(self, c, R, B)
  local len = bucket_for(max_ctx, self.max_seq)
  if R == B and not all_out and self.use_graphs and self:tp_capturable(B) then
    local graphs = self.paged_graphs[B]
    if not graphs then graphs = {}; self.paged_graphs[B] = graphs end
    self:graph_step(c, graphs, len, nil)
  else
    self:run(c, nil, len, all_out)
  end
  return c.logits
end

-- runner:forward_blocks(blocks, ids, pos0, opts?) -> logits of the last token (1, V) (a view,
-- valid until the next pass), or of every token (T, V) with opts.all_logits (a new tensor, the
-- caller's to free); nil, message on bad input. One sequence's tokens at positions pos0 .. over
-- its block table, in chunks of opts.chunk (the paged form of runner:forward_slot: the serving
-- engine scores prompts with every position's logits).
function Runner:forward_blocks(blocks, ids, pos0, opts)
  if not self.paged then return nil, "forward_blocks: the model's KV cache is not paged (load it with kv_blocks)" end
  local n = type(ids) == "table" and #ids or 0
  if n == 0 then return nil, "forward_blocks: no tokens" end
  local all = opts and opts.all_logits and assert(tensor.new({ n, self.vocab_size }, "f32", self.device))
  local done, logits, err = 0, nil, nil
  local seq = { blocks = blocks }
  while done < n do
    local T = math.min(self.chunk, n - done)
    seq.pos, seq.tokens = pos0 + done, { unpack(ids, done + 1, done + T) }
    local part = all and all:narrow(1, done, T)
    logits, err = self:step_paged({ seq }, part)
    if part then part:free() end
    if not logits then
      if all then all:free() end
      return nil, err
    end
    done = done + T
  end
  if all then return all end
  local v = self.paged_last
  if not v then v = self.act:keep(self.buf.blogits:narrow(1, 0, 1)); self.paged_last = v end
  return v
end

-- Records this runner's work in a telemetry recorder (moonshard.telemetry): every collective of
-- its tensor- and pipeline-parallel communicators, and its stage's busy and idle time per pass.
function Runner:observe(tel)
  tel:watch(self.tp_comm, "tp")
  tel:watch(self.pp_comm, "pp")
  self.hooks = tel:stage_hooks(self.device, self.pp_rank)
end

-- Forgets the cache (the next forward starts at position 0), of every slot.
function Runner:reset()
  self.pos = 0
  self.slot_pos = {}
end

-- M.build(desc, opts) -> runner | nil, message: places a (possibly sliced) description's
-- weights on opts.device in a resident stage and makes the runner over them, the one way every
-- command assembles a model. opts as M.new plus the stage's: opts.dtype, opts.float_dtype,
-- opts.fuse, opts.embed / opts.head (a pipeline stage's ends). On failure nothing stays on the
-- device and the message says why.
function M.build(desc, opts)
  local device = opts.device or "cpu"
  local ok, res = pcall(function()
    local max_seq = assert(M.context(desc, opts.max_seq))
    local stage
    if opts.offload or opts.zero_comm then
      -- a streaming stage (moonshard.offload): layers in host memory, on disk or ZeRO-3 partitions
      stage = require("moonshard.stage").streaming(desc.weights, device, {
        tier = opts.offload or "device", dir = opts.offload_dir, readonly = opts.offload_readonly,
        rank = opts.rank, identity = opts.identity, pin = opts.pin, prefetch = opts.prefetch,
        queue_depth = opts.queue_depth, zero_comm = opts.zero_comm,
        dtype = opts.dtype, float_dtype = opts.float_dtype, arch = desc.arch,
        layers = opts.layers, embed = opts.embed, head = opts.head, fuse = opts.fuse,
      })
    else
      stage = require("moonshard.stage").resident(desc.weights, device, {
        dtype = opts.dtype, float_dtype = opts.float_dtype, arch = desc.arch,
        layers = opts.layers, embed = opts.embed, head = opts.head, fuse = opts.fuse,
        -- the memory check before placing anything counts the model's cache and buffers too
        plan = { desc = desc, max_seq = max_seq, kv_dtype = opts.kv_dtype, chunk = opts.chunk, batch = opts.batch,
          kv_offload = opts.kv_offload,
          kv_blocks = opts.kv_blocks, block_size = opts.block_size },
      })
    end
    local o = {}
    for k, v in pairs(opts) do o[k] = v end
    o.stage, o.device = stage, device
    local rok, r = pcall(M.new, desc, o)
    if not rok then
      stage:close() -- the weights placed before the runner's buffers failed
      error(r, 0)
    end
    r.own_stage = true
    -- no CUDA graphs over a streaming stage for now: its uploads, all-gathers and ring slots
    -- change per replay (the ring's fixed addresses make capturing them possible later)
    if stage.streaming then r.use_graphs = false end
    return r
  end)
  if not ok then return nil, (tostring(res):gsub("^[^:]*:%d+: ", "")) end
  return res
end


-- runner:copy_kv(src, dst, first_pos, n_pos) -> true | nil, message: copies the K/V rows of
-- positions first_pos .. first_pos + n_pos - 1 of slot src into the same positions of slot dst,
-- in every layer this runner holds (the serving engine's prefix cache: a cached run of blocks
-- computed in one slot reused by a sequence in another). The slots' positions are unchanged.
function Runner:copy_kv(src, dst, first_pos, n_pos)
  local function is_slot(s) return type(s) == "number" and s >= 0 and s < self.batch and s % 1 == 0 end
  if not is_slot(src) or not is_slot(dst) then
    return nil, string.format("copy_kv: slots %s, %s outside [0, %d)", tostring(src), tostring(dst), self.batch)
  end
  if type(first_pos) ~= "number" or type(n_pos) ~= "number" or first_pos < 0 or n_pos < 0
    or first_pos % 1 ~= 0 or n_pos % 1 ~= 0 or first_pos + n_pos > self.max_seq then
    return nil, string.format("copy_kv: positions [%s, %s + %s) outside the context of %d", tostring(first_pos),
      tostring(first_pos), tostring(n_pos), self.max_seq)
  end
  if n_pos == 0 or src == dst then return true end
  for l = self.first_layer, self.last_layer do
    local kv = self.kv[l]
    for _, t in ipairs { kv.K, kv.V } do
      local a, b = t:narrow(1, src, 1), t:narrow(1, dst, 1)
      local ra, rb = a:narrow(2, first_pos, n_pos), b:narrow(2, first_pos, n_pos)
      rb:copy_from(ra)
      ra:free(); rb:free(); a:free(); b:free()
    end
  end
  return true
end

-- runner:forward_slot(slot, ids, pos0, opts?) -> logits of the last token (1, V) (a view, valid
-- until the next pass), or of every token (T, V) with opts.all_logits (a new tensor, the
-- caller's to free); nil, message on bad input. One sequence's tokens at positions pos0 .. in
-- KV slot `slot` (runner:forward's form for any slot: what the serving engine scores prompts
-- with, every position's logits, while other slots hold running sequences).
function Runner:forward_slot(slot, ids, pos0, opts)
  if type(slot) ~= "number" or slot < 0 or slot >= self.batch or slot % 1 ~= 0 then
    return nil, string.format("forward_slot: slot %s outside [0, %d)", tostring(slot), self.batch)
  end
  local n = type(ids) == "table" and #ids or 0
  if n == 0 then return nil, "forward_slot: no tokens" end
  if type(pos0) ~= "number" or pos0 < 0 or pos0 % 1 ~= 0 then
    return nil, string.format("forward_slot: position %s is not a position", tostring(pos0))
  end
  local ok, err = check_tokens(self, ids, n, pos0)
  if not ok then return nil, err end
  local V = self.vocab_size
  local all = opts and opts.all_logits and assert(tensor.new({ n, V }, "f32", self.device))
  local ids_ptr, pos_ptr, starts_ptr = self.ids_ptr, self.pos_ptr, self.starts_ptr
  local done, c = 0, nil
  while done < n do
    local T = math.min(self.chunk, n - done)
    c = self:batch_ctx(1, T, slot)
    for i = 0, T - 1 do
      ids_ptr[i] = ids[done + i + 1]
      pos_ptr[i] = pos0 + done + i
    end
    starts_ptr[0] = pos0 + done
    if c.host_ids then
      c.ids:copy_from(c.host_ids)
      c.pos:copy_from(c.host_pos)
    end
    local part = all and all:narrow(1, done, T)
    self:run(c, pos0 + done, nil, part)
    if part then part:free() end
    done = done + T
  end
  set_slot_position(self, slot, pos0 + n)
  return all or c.logits
end


-- runner:forward_hidden(tokens, pos, slot0, on_rows) -> true | nil, message: a pass over B
-- sequences of T token ids each (tokens[b], equal lengths) in KV slots slot0 .. slot0 + B - 1,
-- sequence b from position pos[b], that computes no logits: on the last pipeline stage,
-- on_rows(x, B, Tc, done) is called after each chunk with x (B * Tc, D), the final hidden states
-- (before the final norm) of tokens done .. done + Tc - 1 of every sequence (row b * Tc + i;
-- a view valid during the call). The scoring pass (moonshard.score) takes the rows it needs
-- from it and runs runner:head_rows over those alone. Every rank of a tensor / pipeline group
-- makes the same call.
function Runner:forward_hidden(tokens, pos, slot0, on_rows)
  local B = type(tokens) == "table" and #tokens or 0
  if B == 0 then return nil, "forward_hidden: no sequences" end
  if slot0 < 0 or slot0 + B > self.batch then
    return nil, string.format("forward_hidden: slots [%d, %d) outside the model's %d (opts.batch)", slot0, slot0 + B, self.batch)
  end
  local T, V = #tokens[1], self.vocab_size
  if T == 0 then return nil, "forward_hidden: no tokens" end
  local uniform, max_pos = true, 0
  for b = 1, B do
    local seq, p = tokens[b], pos[b]
    if #seq ~= T then return nil, "forward_hidden: sequences of unequal lengths" end
    if p + T > self.max_seq then
      return nil, string.format("context full: %d tokens at position %d exceed the context of %d", T, p, self.max_seq)
    end
    for i = 1, T do
      local id = seq[i]
      if type(id) ~= "number" or id < 0 or id >= V or id % 1 ~= 0 then
        return nil, string.format("token id %s outside the vocabulary [0, %d)", tostring(id), V)
      end
    end
    if p ~= pos[1] then uniform = false end
    if p > max_pos then max_pos = p end
  end
  local pp, pp_rank, pp_size = self.pp_comm, self.pp_rank, self.pp_size
  local ids_ptr, pos_ptr, starts_ptr = self.ids_ptr, self.pos_ptr, self.starts_ptr
  local done = 0
  while done < T do
    local Tc = math.min(self.chunk, T - done)
    local c = self:batch_ctx(B, Tc, slot0)
    for b = 0, B - 1 do
      local seq, p, r = tokens[b + 1], pos[b + 1] + done, b * Tc
      for i = 0, Tc - 1 do
        ids_ptr[r + i] = seq[done + i + 1]
        pos_ptr[r + i] = p + i
      end
      starts_ptr[b] = p
    end
    if c.host_ids then
      c.ids:copy_from(c.host_ids)
      c.pos:copy_from(c.host_pos)
      if not uniform and c.host_starts then c.starts:copy_from(c.host_starts) end
    end
    c.pos0 = uniform and pos[1] + done or nil
    c.dyn_len = not uniform and bucket_for(max_pos + done + Tc, self.max_seq) or nil
    c.normed = false
    if pp_rank > 0 and pp then comm_check(C.msh_comm_recv(pp, c.x, pp_rank - 1)) end
    local hooks = self.hooks
    if hooks then hooks.begin(self, c.R) end
    self.model.forward(c)
    if hooks then hooks.finish(self) end
    if pp_rank < pp_size - 1 then
      if pp then comm_check(C.msh_comm_send(pp, c.x, pp_rank + 1)) end
    else
      on_rows(c.x, B, Tc, done)
    end
    done = done + Tc
  end
  for b = 1, B do set_slot_position(self, slot0 + b - 1, pos[b] + T) end
  return true
end

-- runner:head_rows(logits, x, h) : logits (R, V) = the final norm and output head over the R
-- rows of x (R, D), h (R, D) scratch (the last pipeline stage; every tensor-parallel rank of it).
function Runner:head_rows(logits, x, h)
  self.model.logits(self.const, logits, x, h, x:size(1))
end

-- runner:last_stage() -> whether this rank computes the logits (the last pipeline stage).
function Runner:last_stage() return self.pp_rank == self.pp_size - 1 end

return M
