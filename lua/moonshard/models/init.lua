-- moonshard.models: the architecture registry. Each architecture is one model file in this
-- folder (moonshard.models.<name>) holding its math and the declaration of its weights; the
-- registry below names the files and finds one from a checkpoint's own words (Hugging Face
-- `model_type` / `architectures`, GGUF `general.architecture`).
--
-- A declaration (model.arch) says, once, for every weight:
--   { "wq", hf = "model.layers.%d.self_attn.q_proj.weight", gguf = "blk.%d.attn_q.weight",
--     shape = { "Q", "D" }, shard = "column", unit = "q", stack = "wqkv" }
--   name      the field of the layer's weight table the model file reads
--   hf, gguf  the tensor's name in each format (%d: the layer, from 0)
--   shape     in the description's sizes: D (hidden), V (vocabulary), F (feed-forward), Q (query
--             heads x head size), KV (key/value heads x head size), HD (head size)
--   shard     how tensor parallelism splits it: "column" (rows of the weight, by `unit`: q heads,
--             kv heads or f, the feed-forward rows), "row" (its columns, summed across ranks
--             after), "vocab" (the output head by vocabulary rows), nil (replicated)
--   stack     weights sharing a stack name are placed as one (rows one after another, in the
--             declaration's order) when their dtypes allow: one projection instead of several
--   optional  may be absent from a checkpoint; tied = NAME: the same tensor as NAME when the
--             checkpoint ties them (desc.tie) or leaves it out
-- Loaders (moonshard.loaders.hf, .gguf, .dummy), the tensor-parallel slicing
-- (moonshard.policy.shard), the stage's stacking (moonshard.stage) and the memory planner
-- (moonshard.memplan) all read this one declaration.
local M = {}

-- The registry: one line per architecture (a file moonshard.models.<name>).
M.names = { "llama", "mistral", "qwen2", "qwen3" }

local loaded = {}

-- M.get(name) -> the model module of an architecture, or nil, message.
function M.get(name)
  name = name or "llama"
  local m = loaded[name]
  if m then return m end
  for _, n in ipairs(M.names) do
    if n == name then
      m = require("moonshard.models." .. n)
      M.prepare(m.arch)
      loaded[name] = m
      return m
    end
  end
  return nil, string.format("architecture '%s' is not supported (supported: %s)", tostring(name), table.concat(M.names, ", "))
end

-- The architecture for a Hugging Face config.json: by model_type, else by its architectures list.
function M.for_hf(cfg)
  local mt, archs = cfg.model_type, cfg.architectures
  for _, n in ipairs(M.names) do
    local a = M.get(n).arch
    for _, t in ipairs(a.hf_model_types or {}) do
      if t == mt then return M.get(n) end
    end
    if type(archs) == "table" then
      for _, t in ipairs(a.hf_architectures or {}) do
        if t == archs[1] then return M.get(n) end
      end
    end
  end
  local known = {}
  for _, n in ipairs(M.names) do
    for _, t in ipairs(M.get(n).arch.hf_model_types or {}) do known[#known + 1] = t end
  end
  return nil, string.format("model_type '%s' is not supported (supported: %s)", tostring(mt), table.concat(known, ", "))
end

-- The architecture for a GGUF general.architecture.
function M.for_gguf(name)
  local known = {}
  for _, n in ipairs(M.names) do
    local a = M.get(n).arch
    if a.gguf_arch == name then return M.get(n) end
    if a.gguf_arch and not a.gguf_alias then known[#known + 1] = a.gguf_arch end
  end
  return nil, string.format("architecture '%s' is not supported (supported: %s)", tostring(name), table.concat(known, ", "))
end

-- Derived tables of a declaration, made once: by_name (every weight's entry by its field name)
-- and stacks ({ wqkv = { "wq", "wk", "wv" }, ... } in declaration order).
function M.prepare(arch)
  if arch.by_name then return arch end
  arch.by_name, arch.stacks = {}, {}
  for _, e in ipairs(arch.globals) do arch.by_name[e[1]] = e end
  for _, e in ipairs(arch.layer) do
    arch.by_name[e[1]] = e
    if e.stack then
      local s = arch.stacks[e.stack]
      if not s then s = {}; arch.stacks[e.stack] = s end
      s[#s + 1] = e[1]
    end
  end
  return arch
end

-- The sizes a declaration's shapes name, from a description.
function M.sizes(desc)
  local hd = desc.head_dim or desc.dim / desc.n_heads
  return { D = desc.dim, V = desc.vocab_size, F = desc.hidden_dim, Q = desc.n_heads * hd,
           KV = desc.n_kv_heads * hd, HD = hd }
end

-- A declared shape in numbers.
function M.shape(e, sizes)
  local s = {}
  for i, k in ipairs(e.shape) do
    s[i] = sizes[k] or error("weight '" .. e[1] .. "': unknown size '" .. tostring(k) .. "'", 2)
  end
  return s
end

-- M.collect(arch, desc, format, fetch, has) -> the description's weights from a checkpoint:
-- { embed, norm, output, layers = { { name = tensor } ... } }.
--   fetch(name, shape) -> tensor (raises naming the file when absent or of another shape)
--   has(name) -> whether the checkpoint holds a tensor of that name
function M.collect(arch, desc, format, fetch, has)
  local sizes = M.sizes(desc)
  local w = { layers = {} }
  local function one(e, l)
    local name = e[format] and string.format(e[format], l)
    if e.tied and (desc.tie == true or (desc.tie == nil and not (name and has(name)))) then return w[e.tied] end
    if not name or (e.optional and not has(name)) then return nil end
    return fetch(name, M.shape(e, sizes))
  end
  for _, e in ipairs(arch.globals) do w[e[1]] = one(e) end
  for l = 1, desc.n_layers do
    local lw = {}
    for _, e in ipairs(arch.layer) do lw[e[1]] = one(e, l - 1) end
    w.layers[l] = lw
  end
  return w
end

return M
