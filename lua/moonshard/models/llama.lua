-- moonshard.models.llama: the Llama architecture (Llama 1/2/3, Mistral, SmolLM2, TinyLlama, ...)
-- composed from core ops.
--
-- A model is built from a description that every loader produces:
--   desc = {
--     dim, n_layers, n_heads, n_kv_heads, head_dim, hidden_dim, vocab_size, norm_eps, max_seq,
--     rope = { theta, style = "interleaved" | "half", rotary_dim?, scaling? },
--     weights = { embed (V, D), norm (D), output (V, D),
--                 layers = { { attn_norm, wq, wk, wv, wo, ffn_norm, w_gate, w_up, w_down }, ... } },
--   }
-- Weights are reached through a stage (moonshard.stage): a layer asks for its weights right
-- before it runs, so placement (resident, streamed, partitioned) is the stage's business.
--
-- Per forward pass nothing is allocated: activations live in buffers sized at construction for
-- up to `chunk` tokens (of each of up to `batch` sequences), and views of them are made once per
-- distinct token count.
--
-- Several sequences run together through model:forward_batch: each owns a slot of the KV cache
-- (B, max_seq, KVH, hd), their rows stacked sequence by sequence (row b * T + t), so every
-- projection is one matmul over B * T rows and attention reads each sequence's own cache.
local ops = require "moonshard.ops"
local tensor = require "moonshard.tensor"
local rope = require "moonshard.rope"
local stage_mod = require "moonshard.stage"

local core = require "moonshard.core"
local ffi = require "ffi"
local C = core.C

local M = {}
local Llama = {}
Llama.__index = Llama

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

-- M.new(desc, opts) -> model
--   opts.device    "cpu" (default) or "cuda[:i]": where activations and the KV cache live
--   opts.max_seq   context length (default: the model's; at most the model's)
--   opts.chunk     tokens per forward pass (prefill is split into chunks of this size)
--   opts.kv_dtype  "f32" (default), "f16" or "bf16"
--   opts.stage     a stage owning the weights (default: resident on opts.device)
--   opts.batch     sequences (KV cache slots) model:forward_batch may run at once (default 1)
function M.new(desc, opts)
  opts = opts or {}
  assert(M.validate(desc))
  local self = setmetatable({}, Llama)
  self.desc = desc
  self.device = opts.device or "cpu"
  self.dim = desc.dim
  self.n_layers = desc.n_layers
  self.n_heads = desc.n_heads
  self.n_kv_heads = desc.n_kv_heads
  self.head_dim = desc.head_dim or desc.dim / desc.n_heads
  self.hidden_dim = desc.hidden_dim
  self.vocab_size = desc.vocab_size
  self.norm_eps = desc.norm_eps or 1e-5
  self.max_seq = math.min(opts.max_seq or desc.max_seq, desc.max_seq)
  self.chunk = math.min(opts.chunk or 256, self.max_seq)
  self.batch = opts.batch or 1
  assert(type(self.batch) == "number" and self.batch >= 1 and self.batch % 1 == 0,
    "opts.batch must be a positive integer")
  self.scale = 1 / math.sqrt(self.head_dim)
  -- distributed: opts.tp_comm sums row-parallel outputs (desc already sliced for this rank);
  -- opts.pp_comm links the pipeline stages, this one running layers opts.layers = { first, last }
  self.tp_comm, self.pp_comm = opts.tp_comm, opts.pp_comm
  self.pp_rank = self.pp_comm and C.msh_comm_rank(self.pp_comm) or 0
  self.pp_size = self.pp_comm and C.msh_comm_size(self.pp_comm) or 1
  self.first_layer = opts.layers and opts.layers[1] or 1
  self.last_layer = opts.layers and opts.layers[2] or desc.n_layers
  local own_stage = not opts.stage
  self.stage = opts.stage or stage_mod.resident(desc.weights, self.device, {
    layers = { self.first_layer, self.last_layer },
    embed = self.pp_rank == 0, head = self.pp_rank == self.pp_size - 1,
    plan = { desc = desc, max_seq = opts.max_seq, kv_dtype = opts.kv_dtype, chunk = opts.chunk, batch = opts.batch },
  })
  -- the attention norms, read a layer early by the fused sum and norm of tensor parallelism; and
  -- which projections the layers run stacked (qkv, gu) or one by one (q_k_v, g_u)
  self.attn_norms = {}
  local forms = {}
  for l = self.first_layer, self.last_layer do
    local w = self.stage:acquire(l)
    self.attn_norms[l] = w.attn_norm
    forms[w.wqkv and "qkv" or "q_k_v"] = true
    forms[w.w_gu and "gu" or "g_u"] = true
    self.stage:release(l)
  end

  local r = desc.rope or {}
  self.rope_style = (r.style == "half") and ops.ROPE_HALF or ops.ROPE_INTERLEAVED
  local inv = rope.inv_freq(r, self.head_dim)
  self.inv_freq = tensor.from(inv, { #inv }, "f32"):to("f32", self.device)

  local dev, Tm, Bm = self.device, self.chunk * self.batch, self.batch
  local D, H, KVH, hd, F = self.dim, self.n_heads, self.n_kv_heads, self.head_dim, self.hidden_dim
  -- an allocation that fails frees what was made before it (and a stage made here): nothing
  -- stays on the device
  local made = { self.inv_freq }
  local function buf(shape, dt)
    local t, err = tensor.new(shape, dt or "f32", dev)
    if not t then
      for i = #made, 1, -1 do made[i]:free() end
      if own_stage and self.stage.free then self.stage:free() end
      collectgarbage() -- views of the freed buffers
      error(err, 0)
    end
    made[#made + 1] = t
    return t
  end
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
    -- forward_batch: each sequence's last row, its norm, the logits, its first position
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
  if dev ~= "cpu" then
    self.host_ids = assert(tensor.new({ Tm }, "i32", "cpu"))
    self.host_pos = assert(tensor.new({ Tm }, "i32", "cpu"))
    self.host_starts = assert(tensor.new({ Bm }, "i32", "cpu"))
  else
    self.host_ids, self.host_pos, self.host_starts = self.buf.ids, self.buf.pos, self.buf.starts
  end
  self.ids_ptr = ffi.cast("int32_t*", self.host_ids:data())
  self.pos_ptr = ffi.cast("int32_t*", self.host_pos:data())
  self.starts_ptr = ffi.cast("int32_t*", self.host_starts:data())

  self.kv = {}
  local kvdt = opts.kv_dtype or "f32"
  for l = self.first_layer, self.last_layer do
    -- K, V (batch, max_seq, KVH, hd): one slot per sequence; k, v: slot 0, which forward uses
    local K, V = buf({ Bm, self.max_seq, KVH, hd }, kvdt), buf({ Bm, self.max_seq, KVH, hd }, kvdt)
    local function slot0(t) return t:narrow(1, 0, 1):reshape { self.max_seq, KVH, hd } end
    self.kv[l] = { K = K, V = V, k = slot0(K), v = slot0(V) }
  end
  self.views = {}
  self.batch_ctxs = {} -- [slot0][B][T]: views of a forward_batch pass (see batch_ctx)
  self.pos = 0 -- tokens in the cache (slot 0)
  self.slot_pos = {} -- tokens in the cache of slots 1 .. batch - 1
  self.pos_list = {} -- forward_batch's positions (reused)
  -- decode steps replay CUDA graphs on a GPU unless opts.graphs == false
  self.device_kind, self.device_index = tensor.device_id(dev)
  -- (tensor-parallel ranks capture their all-reduces with the step when the communicator can:
  -- the one-shot kernel of NCCL ranks on one host; pipeline stages wait on their peers eagerly)
  self.use_graphs = dev ~= "cpu" and opts.graphs ~= false and C.msh_has_cuda() == 1
    and (not self.tp_comm or self:tp_capturable(1)) and not self.pp_comm
  self.graphs = {}
  self.batch_graphs = {} -- [slot0][B][context bucket]: batched decode steps
  return self
end

-- Whether the tensor-parallel all-reduces of a step of R rows can be captured into a CUDA graph
-- (MSH_TP_GRAPHS=1 also captures NCCL's own kernels). Asked once per R: the buffers are fixed.
local function tp_capturable(self, R)
  local tp = self.tp_comm
  if not tp then return true end
  if os.getenv("MSH_TP_GRAPHS") == "1" and C.msh_comm_kind(tp) == C.MSH_COMM_NCCL then return true end
  if C.msh_comm_capturable(tp, C.MSH_COMM_OP_ALL_REDUCE, self.buf.o:narrow(1, 0, R)) ~= 1 then return false end
  if not self.vocab_local then return true end
  local l = R == 1 and self.buf.logits_l or self.buf.blogits_l:narrow(1, 0, R)
  return C.msh_comm_capturable(tp, C.MSH_COMM_OP_ALL_GATHER, l) == 1
end

function Llama:tp_capturable(R)
  local known = self.tp_capturable_rows
  if not known then
    known = {}
    self.tp_capturable_rows = known
  end
  if known[R] == nil then known[R] = tp_capturable(self, R) end
  return known[R]
end

-- Views of the activation buffers for a pass of T tokens (made once per T).
function Llama:views_for(T)
  local v = self.views[T]
  if v then return v end
  local b, H, KVH, hd = self.buf, self.n_heads, self.n_kv_heads, self.head_dim
  local function rows(t) return t and t:narrow(1, 0, T) end
  v = {
    x = rows(b.x), h = rows(b.h), o = rows(b.o),
    q = rows(b.q), k = rows(b.k), v = rows(b.v), att = rows(b.att),
    g = rows(b.g), u = rows(b.u), ids = rows(b.ids), pos = rows(b.pos),
    qkv = rows(b.qkv), gu = rows(b.gu),
    x_last = b.x:narrow(1, T - 1, 1),
  }
  v.q3 = v.q:reshape { T, H, hd }
  v.k3 = v.k and v.k:reshape { T, KVH, hd }
  v.v3 = v.v and v.v:reshape { T, KVH, hd }
  v.att3 = v.att:reshape { T, H, hd }
  if self.device ~= "cpu" then
    v.host_ids = self.host_ids:narrow(1, 0, T)
    v.host_pos = self.host_pos:narrow(1, 0, T)
  end
  self.views[T] = v
  return v
end

local embedding, rmsnorm, matmul, rope_op = ops.embedding, ops.rmsnorm, ops.matmul, ops.rope
local set_rows, attention, silu_mul = ops.set_rows, ops.attention, ops.silu_mul
local matmul_acc, matmul_glu = ops.matmul_acc, ops.matmul_glu
local rmsnorm_matmul, rmsnorm_qkv_rope, rmsnorm_mlp = ops.rmsnorm_matmul, ops.rmsnorm_qkv_rope, ops.rmsnorm_mlp

-- Moves the T token ids and positions pos0 .. pos0+T-1 to the device's buffers.
function Llama:upload(T, pos0)
  local v = self:views_for(T)
  local pos_ptr = self.pos_ptr
  for i = 0, T - 1 do pos_ptr[i] = pos0 + i end
  if v.host_ids then
    v.ids:copy_from(v.host_ids)
    v.pos:copy_from(v.host_pos)
  end
  return v
end

local set_rows_dyn, attention_dyn = ops.set_rows_dyn, ops.attention_dyn

-- The layers over T uploaded tokens at positions pos0 ... With dyn_len, the position is read
-- from the device's position buffer when the ops run (pos0 is then only a hint), and attention
-- is planned for up to dyn_len positions: the form a CUDA graph captures and replays.
local function comm_check(s)
  if s ~= 0 then error((core.errmsg(s)), 3) end
end

-- logits (R, V) = h (R, D) @ output^T. A vocabulary-parallel head (desc.vocab_local rows on each
-- tensor-parallel rank) computes this rank's columns, then an all-gather joins them: the gather
-- holds (rank, row, columns), which a strided copy turns into rows.
function Llama:head(logits, h, R)
  local out_w, Vl = self.stage:output(), self.vocab_local
  if not Vl then
    matmul(logits, h, out_w)
    return
  end
  local tp, n, b = self.tp_comm, self.tp_size, self.buf
  local l, g
  if R == 1 then
    l = b.logits_l
  elseif R <= self.batch then
    l, g = b.blogits_l:narrow(1, 0, R), b.gather:narrow(1, 0, n * R * Vl)
  else -- every position's logits (opts.all_logits): buffers for this call
    l, g = assert(tensor.new({ R, Vl }, "f32", self.device)), assert(tensor.new({ n * R * Vl }, "f32", self.device))
  end
  matmul(l, h, out_w)
  if R == 1 then
    comm_check(C.msh_comm_all_gather(tp, logits, l))
    return
  end
  comm_check(C.msh_comm_all_gather(tp, g, l))
  logits:reshape({ R, n, Vl }):copy_from(g:view({ R, n, Vl }, { Vl, R * Vl, 1 }, 0))
end

-- logits = head(rmsnorm(x)) through h (R, D): the final norm folded into a replicated head.
function Llama:norm_head(logits, x, h, R)
  local stage = self.stage
  if self.vocab_local then
    rmsnorm(h, x, stage:norm(), self.norm_eps)
    self:head(logits, h, R)
  else
    rmsnorm_matmul(logits, x, stage:norm(), self.norm_eps, stage:output(), h, nil)
  end
end

-- x += a @ w^T: fused into the projection on one rank; with tensor parallelism the partial
-- products are summed across ranks first, and the RMSNorm that follows (h = norm(x) * norm_w)
-- comes with the sum (one kernel on NCCL ranks of one host). Returns true when h was computed.
function Llama:residual(v, a, w, norm_w)
  local tp = self.tp_comm
  if tp then
    matmul(v.o, a, w)
    if norm_w then
      comm_check(C.msh_comm_all_reduce_add_norm(tp, v.x, v.o, v.h, norm_w, self.norm_eps))
      return true
    end
    comm_check(C.msh_comm_all_reduce_add(tp, v.x, v.o))
  else
    matmul_acc(v.x, a, w)
  end
  return false
end

-- bt (forward_batch): a batch context (batch_ctx); T then counts rows (B x tokens), the caches
-- are its slots' and positions come from bt.starts with dyn_len (one per sequence).
function Llama:compute(T, pos0, all_logits_out, dyn_len, bt)
  local v = self.views[T]
  local stage, eps = self.stage, self.norm_eps
  local pp, pp_rank, pp_size = self.pp_comm, self.pp_rank, self.pp_size
  local hooks = self.hooks -- optional: begin(model, T) once the input is here, finish(model) before it leaves
  -- pp_external: the caller moves activations between stages (moonshard.schedule) and only the
  -- last stage gets logits
  if self.pp_external then pp = nil end
  if pp_rank > 0 and pp then comm_check(C.msh_comm_recv(pp, v.x, pp_rank - 1)) end
  if hooks then hooks.begin(self, T) end
  if pp_rank == 0 then embedding(v.x, stage:embed(), v.ids) end
  local normed = false -- h already holds this layer's attention norm (see residual)
  for l = self.first_layer, self.last_layer do
    local w = stage:acquire(l)
    local kv = bt and bt.kv[l] or self.kv[l]
    if w.wqkv then
      -- one projection (the norm folded in unless the sum across ranks brought it: then h is the
      -- normalized input), rope and the cache store (positions from the device): one op, one
      -- kernel at decode on a GPU
      if normed then
        rmsnorm_qkv_rope(v.q3, kv.k, kv.v, v.qkv, v.h, nil, eps, w.wqkv, nil, v.pos, self.inv_freq, self.rope_style)
      else
        rmsnorm_qkv_rope(v.q3, kv.k, kv.v, v.qkv, v.x, w.attn_norm, eps, w.wqkv, v.h, v.pos, self.inv_freq,
          self.rope_style)
      end
    else
      if not normed then rmsnorm(v.h, v.x, w.attn_norm, eps) end
      matmul(v.q, v.h, w.wq)
      matmul(v.k, v.h, w.wk)
      matmul(v.v, v.h, w.wv)
      rope_op(v.q3, v.pos, self.inv_freq, self.rope_style)
      rope_op(v.k3, v.pos, self.inv_freq, self.rope_style)
      local kr, vr = bt and bt.k4 or v.k3, bt and bt.v4 or v.v3
      if dyn_len then
        set_rows_dyn(kv.k, bt and bt.starts or v.pos, kr)
        set_rows_dyn(kv.v, bt and bt.starts or v.pos, vr)
      else
        set_rows(kv.k, pos0, kr)
        set_rows(kv.v, pos0, vr)
      end
    end
    local q, att = bt and bt.q4 or v.q3, bt and bt.att4 or v.att3
    if dyn_len then
      attention_dyn(att, q, kv.k, kv.v, bt and bt.starts or v.pos, dyn_len, self.scale)
    else
      attention(att, q, kv.k, kv.v, pos0, self.scale)
    end
    local ffn_normed = self:residual(v, v.att, w.wo, w.ffn_norm)
    if w.w_gu and not self.tp_comm then
      -- the whole feed-forward block into the residual: one op (16-bit activations between the
      -- GEMMs of a prefill on a GPU); with TP the down projection's sum goes across the ranks
      rmsnorm_mlp(v.x, w.ffn_norm, eps, w.w_gu, w.w_down, v.h, v.g, v.gu)
      normed = false
    else
      if w.w_gu then
        if ffn_normed then
          matmul_glu(v.g, v.h, w.w_gu, v.gu)
        else
          rmsnorm_matmul(v.g, v.x, w.ffn_norm, eps, w.w_gu, v.h, v.gu)
        end
      else
        if not ffn_normed then rmsnorm(v.h, v.x, w.ffn_norm, eps) end
        matmul(v.g, v.h, w.w_gate)
        matmul(v.u, v.h, w.w_up)
        silu_mul(v.g, v.g, v.u)
      end
      normed = self:residual(v, v.g, w.w_down, l < self.last_layer and self.attn_norms[l + 1] or nil)
    end
    stage:release(l)
  end
  if pp_rank < pp_size - 1 then
    if hooks then hooks.finish(self) end
    if pp then comm_check(C.msh_comm_send(pp, v.x, pp_rank + 1)) end
  else
    if all_logits_out then self:norm_head(all_logits_out, v.x, v.h, T) end
    if bt then
      -- each sequence's last row (x itself for one token a sequence)
      if bt.x_rows then bt.x_last:copy_from(bt.x_rows) end
      self:norm_head(bt.logits, bt.x_last, bt.h_last, bt.B)
    else
      self:norm_head(self.buf.logits, v.x_last, self.buf.h_last, 1)
    end
    if hooks then hooks.finish(self) end
  end
  if pp then
    -- every stage gets the logits, so each samples the same token from the same seed
    if all_logits_out then comm_check(C.msh_comm_broadcast(pp, all_logits_out, pp_size - 1)) end
    comm_check(C.msh_comm_broadcast(pp, bt and bt.logits or self.buf.logits, pp_size - 1))
  end
end

-- One pass over T tokens already written to the host id buffer, at positions pos0 .. pos0+T-1.
function Llama:pass(T, pos0, all_logits_out)
  self:upload(T, pos0)
  self:compute(T, pos0, all_logits_out)
end

-- Context-length buckets of the decode graphs: one graph per bucket, replayed at every position
-- inside it (attention is planned for the bucket's length).
local function bucket_for(n, max_seq)
  local b = 256
  while b < n do b = b * 2 end
  return math.min(b, max_seq)
end

-- One decode step (T = 1) through a CUDA graph: the first step of a bucket runs eagerly with the
-- position-from-device ops (sizing scratch), then records them; later steps replay.
function Llama:decode_graph(pos0)
  local len = bucket_for(pos0 + 1, self.max_seq)
  self:upload(1, pos0)
  local g = self.graphs[len]
  if g then
    local hooks = self.hooks
    if hooks then hooks.begin(self, 1) end
    local s = C.msh_graph_launch(g)
    if s ~= 0 then core.check(s) end
    if hooks then hooks.finish(self) end
    return
  end
  self:compute(1, pos0, nil, len)
  local kind, index = self.device_kind, self.device_index
  local ok = core.try(C.msh_graph_begin(kind, index))
  if not ok then
    self.use_graphs = false -- no graphs on this device: stay eager
    return
  end
  local cok, cerr = pcall(self.compute, self, 1, pos0, nil, len)
  local out = ffi.new("msh_graph*[1]")
  local s = C.msh_graph_end(kind, index, out)
  if not cok then error(cerr, 0) end
  core.check(s)
  self.graphs[len] = ffi.gc(out[0], C.msh_graph_free)
end

-- model:forward(ids, pos0?, opts?) -> logits of the last token (1, V), or of every token (T, V)
-- with opts.all_logits. ids: a Lua array of token ids or a single id. pos0 defaults to the
-- number of tokens already in the cache. Returns nil, message when the context is full.
function Llama:forward(ids, pos0, opts)
  local n = type(ids) == "number" and 1 or #ids
  pos0 = pos0 or self.pos
  if n == 0 then return nil, "forward: no tokens" end
  if pos0 + n > self.max_seq then
    return nil, string.format("context full: %d tokens at position %d exceed the context of %d",
      n, pos0, self.max_seq)
  end
  local all = opts and opts.all_logits and assert(tensor.new({ n, self.vocab_size }, "f32", self.device))
  local V = self.vocab_size
  local done = 0
  while done < n do
    local T = math.min(self.chunk, n - done)
    if type(ids) == "number" then
      if ids < 0 or ids >= V then
        return nil, string.format("token id %d outside the vocabulary [0, %d)", ids, V)
      end
      self.ids_ptr[0] = ids
    else
      for i = 0, T - 1 do
        local id = ids[done + i + 1]
        if id < 0 or id >= V then
          return nil, string.format("token id %d outside the vocabulary [0, %d)", id, V)
        end
        self.ids_ptr[i] = id
      end
    end
    if T == 1 and not all and self.use_graphs then
      self:views_for(1)
      self:decode_graph(pos0 + done)
    else
      self:pass(T, pos0 + done, all and all:narrow(1, done, T))
    end
    done = done + T
  end
  self.pos = pos0 + n
  return all or self.buf.logits
end

-- ------------------------------------------------------------------------------ batches

-- The views of a forward_batch pass of B sequences of T tokens in slots slot0 .. slot0 + B - 1
-- (made once per (slot0, B, T)): activation views of B * T rows and their 4-D forms, the
-- slots' caches, the sequences' first positions (the rows' own when T = 1) and logits.
function Llama:batch_ctx(B, T, slot0)
  local by_slot = self.batch_ctxs[slot0]
  if not by_slot then by_slot = {}; self.batch_ctxs[slot0] = by_slot end
  local by_b = by_slot[B]
  if not by_b then by_b = {}; by_slot[B] = by_b end
  local bt = by_b[T]
  if bt then return bt end
  local R, D, H, KVH, hd = B * T, self.dim, self.n_heads, self.n_kv_heads, self.head_dim
  local v, b = self:views_for(R), self.buf
  bt = {
    B = B, T = T, R = R, v = v,
    q4 = v.q:reshape { B, T, H, hd }, att4 = v.att:reshape { B, T, H, hd },
    k4 = v.k and v.k:reshape { B, T, KVH, hd }, v4 = v.v and v.v:reshape { B, T, KVH, hd },
    starts = T == 1 and v.pos or b.starts:narrow(1, 0, B),
    h_last = b.bh_last:narrow(1, 0, B), logits = b.blogits:narrow(1, 0, B), kv = {},
  }
  if T == 1 then
    bt.x_last = v.x
  else
    bt.x_last = b.bx_last:narrow(1, 0, B)
    bt.x_rows = v.x:view({ B, D }, { T * D, 1 }, (T - 1) * D) -- row T - 1 of each sequence
    bt.host_starts = self.host_starts:narrow(1, 0, B)
  end
  for l = self.first_layer, self.last_layer do
    local kv = self.kv[l]
    bt.kv[l] = { k = kv.K:narrow(1, slot0, B), v = kv.V:narrow(1, slot0, B) }
  end
  by_b[T] = bt
  return bt
end

-- Tokens in the cache of a slot.
function Llama:slot_position(slot)
  if slot == 0 then return self.pos end
  return self.slot_pos[slot] or 0
end

local function set_slot_position(self, slot, n)
  if slot == 0 then self.pos = n else self.slot_pos[slot] = n end
end

-- One batched decode step (T = 1, positions already in the host buffer) through a CUDA graph
-- per (slot0, B, context bucket): recorded on its bucket's first step, replayed after.
function Llama:decode_graph_batch(bt, slot0, max_pos)
  local B, len = bt.B, bucket_for(max_pos + 1, self.max_seq)
  local v = bt.v
  v.ids:copy_from(v.host_ids)
  v.pos:copy_from(v.host_pos)
  local by_slot = self.batch_graphs[slot0]
  if not by_slot then by_slot = {}; self.batch_graphs[slot0] = by_slot end
  local by_b = by_slot[B]
  if not by_b then by_b = {}; by_slot[B] = by_b end
  local g = by_b[len]
  if g then
    local hooks = self.hooks
    if hooks then hooks.begin(self, B) end
    local s = C.msh_graph_launch(g)
    if s ~= 0 then core.check(s) end
    if hooks then hooks.finish(self) end
    return
  end
  self:compute(B, nil, nil, len, bt) -- eagerly first: sizes the device scratch
  local kind, index = self.device_kind, self.device_index
  if not core.try(C.msh_graph_begin(kind, index)) then
    self.use_graphs = false -- no graphs on this device: stay eager
    return
  end
  local cok, cerr = pcall(self.compute, self, B, nil, nil, len, bt)
  local out = ffi.new("msh_graph*[1]")
  local s = C.msh_graph_end(kind, index, out)
  if not cok then error(cerr, 0) end
  core.check(s)
  by_b[len] = ffi.gc(out[0], C.msh_graph_free)
end

-- model:forward_batch(tokens, pos0?, slot0?) -> logits (B, V) f32 of each sequence's last token,
-- on the model's device (a view, valid until the next call), or nil, message.
--   tokens: B arrays of T token ids each (the same T for all), B <= opts.batch.
--   pos0: the first position of every sequence (a number), or an array of B numbers (sequences
--     of different lengths decode together: positions read on the device per sequence); default:
--     each slot's tokens in the cache.
--   slot0: the first KV cache slot (0-based, default 0); sequence b uses slot slot0 + b - 1.
--     Slot 0 is the cache model:forward uses.
-- Prompts longer than opts.chunk go in chunks. Decode steps (T = 1) replay CUDA graphs on a GPU.
function Llama:forward_batch(tokens, pos0, slot0)
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
      if type(id) ~= "number" or id < 0 or id >= V then
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
  local done, bt = 0, nil
  while done < T do
    local Tc = math.min(self.chunk, T - done)
    bt = self:batch_ctx(B, Tc, slot0)
    for b = 0, B - 1 do
      local seq, p, r = tokens[b + 1], pos[b + 1] + done, b * Tc
      for i = 0, Tc - 1 do
        ids_ptr[r + i] = seq[done + i + 1]
        pos_ptr[r + i] = p + i
      end
      starts_ptr[b] = p
    end
    if Tc == 1 and self.use_graphs and self:tp_capturable(B) then
      self:decode_graph_batch(bt, slot0, max_pos + done)
    else
      local v = bt.v
      if v.host_ids then
        v.ids:copy_from(v.host_ids)
        v.pos:copy_from(v.host_pos)
      end
      if uniform then
        self:compute(bt.R, pos[1] + done, nil, nil, bt)
      else
        if bt.host_starts and self.device ~= "cpu" then bt.starts:copy_from(bt.host_starts) end
        self:compute(bt.R, nil, nil, bucket_for(max_pos + done + Tc, self.max_seq), bt)
      end
    end
    done = done + Tc
  end
  for b = 1, B do set_slot_position(self, slot0 + b - 1, pos[b] + T) end
  return bt.logits
end

-- Forgets the cache (the next forward starts at position 0), of every slot.
function Llama:reset()
  self.pos = 0
  self.slot_pos = {}
end

M.Llama = Llama
return M
