-- lua_fuzz.lua: a mutation fuzzer for the Lua-side parsers of outside input, run inside the
-- moonshard host: `moonshard tools/fuzz/lua_fuzz.lua SECONDS SEED_DIR`.
--
-- Targets (each seed file's name picks its target):
--   config_*    config.json text -> cjson -> the fields a Hugging Face config holds, through
--               moonshard.validate (every error a one-line string naming the file)
--   argv_*      a command line, one argument a line -> moonshard.args (generate's options) and
--               moonshard.launch's parser (an options table or nil and a message; never a raise)
--   template_*  a Jinja chat template -> moonshard.chat_template.detect and rendering
--   frame_*     bytes from a rendezvous peer -> moonshard.store's frame reader, fed in random pieces
--   tokenizer_* a tokenizer.json, optionally followed by a line "@@tokenizer_config.json@@" and a
--               tokenizer_config.json -> both written to a folder -> moonshard.loaders.hf's
--               tokenizer_from_file (moonshard.bpe.from_json); a tokenizer made encodes and decodes
--   gguf_*      GGUF metadata as a JSON object (key -> number, string, boolean or array) behind a
--               table-backed handle like moonshard.loaders.gguf's -> parse_metadata (a description
--               whose sizes are positive integers and whose numbers are finite, or a one-line
--               message naming the file) and the tokenizer in the metadata
--   openai_*    an HTTP request body (first byte c: chat completions, else completions) -> the
--               checks of moonshard.openai (a status it answers; a 400 with a one-line message)
-- `moonshard tools/fuzz/lua_fuzz.lua SECONDS SEED_DIR [KIND,KIND...]` runs only those targets.
-- A Lua error escaping a parser, or a message that is not one line of text, is a finding: the
-- input is written to fuzz-finding-<target>.bin and the run exits 1.
local V = require "moonshard.validate"
local args = require "moonshard.args"
local launch = require "moonshard.launch"
local chat_template = require "moonshard.chat_template"
local store = require "moonshard.store"
local cjson = require "cjson"
local uv = require "luv"

local hf = require "moonshard.loaders.hf"
local gguf = require "moonshard.loaders.gguf"

local seconds = tonumber(arg[1]) or 15
local seed_dir = arg[2] or (require("moonshard.host").root .. "/tools/fuzz/seeds_lua")
local only -- the targets to run (default all)
if arg[3] and arg[3] ~= "" then
  only = {}
  for k in arg[3]:gmatch("[^,]+") do only[k] = true end
end

-- a private generator (xorshift32), seeded from the clock; the seed is printed to replay a run
local state = tonumber(os.getenv("MSH_FUZZ_SEED") or "") or (os.time() % 2147483647 + 1)
print("lua_fuzz: seed " .. state)
local bit = require "bit"
local function rnd(n)
  state = bit.bxor(state, bit.lshift(state, 13))
  state = bit.bxor(state, bit.rshift(state, 17))
  state = bit.bxor(state, bit.lshift(state, 5))
  return (state % n + n) % n
end

local DICT = { "null", "true", "false", "-1", "0", "1e309", "-0", "NaN", "\"\"", "[]", "{}", "[1,\"x\"]",
  "\"x\"", "9007199254740993", "{%", "%}", "{{", "}}", "<|im_start|>", "[INST]", "<|eot_id|>", "\0",
  "\255", "--", "=", "nan", "inf", "0x10", "-", "," }

local function mutate(s)
  local n = 1 + rnd(4)
  for _ = 1, n do
    local op = rnd(6)
    local at = #s > 0 and rnd(#s) + 1 or 1
    if op == 0 and #s > 0 then -- flip a byte
      s = s:sub(1, at - 1) .. string.char(rnd(256)) .. s:sub(at + 1)
    elseif op == 1 then -- insert a token
      s = s:sub(1, at - 1) .. DICT[rnd(#DICT) + 1] .. s:sub(at)
    elseif op == 2 and #s > 0 then -- delete a run
      s = s:sub(1, at - 1) .. s:sub(at + 1 + rnd(8))
    elseif op == 3 and #s > 0 then -- duplicate a run
      local len = 1 + rnd(16)
      s = s:sub(1, at + len) .. s:sub(at, at + len) .. s:sub(at + len + 1)
    elseif op == 4 then -- truncate
      s = s:sub(1, at)
    else -- replace a number
      s = s:gsub("%d+", function(d) return rnd(4) == 0 and DICT[rnd(#DICT) + 1] or d end, 1)
    end
  end
  return s
end

-- a message is one line of text
local function one_line(e)
  return type(e) == "string" and not e:find("\n", 1, true) and not e:find("attempt to", 1, true)
    and not e:find("bad argument", 1, true)
end

local HF_FIELDS = {
  { "hidden_size", { type = "int", gt = 0, required = true } },
  { "num_hidden_layers", { type = "int", gt = 0, required = true } },
  { "num_attention_heads", { type = "int", gt = 0, required = true } },
  { "num_key_value_heads", { type = "int", gt = 0 } },
  { "intermediate_size", { type = "int", gt = 0, required = true } },
  { "vocab_size", { type = "int", gt = 0, required = true } },
  { "max_position_embeddings", { type = "int", gt = 0, default = 2048 } },
  { "rms_norm_eps", { type = "number", gt = 0, default = 1e-6 } },
  { "rope_theta", { type = "number", gt = 0 } },
  { "tie_word_embeddings", { type = "boolean", default = false } },
  { "head_dim", { type = "int", gt = 0 } },
  { "bos_token_id", { type = "int", min = 0 } },
  { "eos_token_id", { int_or_list = true, min = 0 } },
  { "model_type", { type = "string", enum = { "llama", "mistral", "qwen2", "qwen3" } } },
  { "hidden_act", { type = "string", enum = { "silu" } } },
  { "rope_scaling", { type = "table" } },
}

local GEN_SPEC = {
  usage = "moonshard generate",
  { "model", "string", "m", required = true },
  { "prompt", "string", "p", default = "" },
  { "max-tokens", "int", "n", default = 256, min = 0 },
  { "temperature", "number", "t", default = 1.0, min = 0 },
  { "top-p", "number", "p", default = 1.0, min = 0, max = 1 },
  { "seed", "int", "s", min = 0 },
  { "pp-layers", "string", "l", check = function(s) local ok, err = V.pp_layers(s) return ok and s, err end },
  { "pp-balance", "string", "b", enum = { "decode", "prefill" } },
  { "dtype", "string", "d", enum = V.DTYPES },
  { "device", "string", "d", default = "cpu", check = V.device },
  { "verbose", "flag", "v" },
}

local targets = {}

function targets.config(text)
  local ok, cfg = pcall(cjson.decode, text)
  if not ok then return end
  for _, f in ipairs(HF_FIELDS) do
    local ok2, e = pcall(V.field, cfg, f[1], f[2], "fuzz/config.json")
    if not ok2 and not (one_line(e) and e:find("^'fuzz/config.json': ")) then return false, e end
  end
end

local function lines(text)
  local argv = {}
  for l in (text .. "\n"):gmatch("([^\n]*)\n") do argv[#argv + 1] = l end
  if argv[#argv] == "" then argv[#argv] = nil end
  return argv
end

function targets.argv(text)
  local argv = lines(text)
  local ok, o, e = pcall(args.try_parse, argv, GEN_SPEC)
  if not ok then return false, o end
  if o == nil and not one_line(e) then return false, e end
  if o then
    for _, k in ipairs { "temperature", "top_p", "max_tokens", "seed" } do
      local v = o[k]
      if v ~= nil and (v ~= v or v == math.huge or v == -math.huge) then return false, k .. " not finite" end
    end
  end
  local ok2, lo, le = pcall(launch.parse, argv)
  if not ok2 then return false, lo end
  if lo == nil and not one_line(le) then return false, le end
end

function targets.template(text)
  local ok, t, e = pcall(chat_template.detect, text)
  if not ok then return false, t end
  if t == nil then
    if not one_line(e) then return false, e end
    return
  end
  local msgs = { { role = "system", content = "s" }, { role = "user", content = "u" } }
  local ok2, s = pcall(t.format, msgs, true, { bos = "<s>", eos = "</s>" })
  if not ok2 then return false, s end
  if type(s) ~= "string" then return false, "format returned " .. type(s) end
end

function targets.frame(bytes)
  local msgs, bad = 0, nil
  local feed = store.reader(function(m)
    if type(m) ~= "table" or type(m.id) ~= "number" then error("reader passed a bad message") end
    msgs = msgs + 1
  end, function(why) bad = why end)
  local i = 1
  while i <= #bytes do
    local n = 1 + rnd(64)
    local ok, e = pcall(feed, bytes:sub(i, i + n - 1))
    if not ok then return false, e end
    i = i + n
  end
  if bad and not one_line(bad) then return false, bad end
end

-- a folder for the tokenizer files, made once
local tok_dir = os.tmpname()
os.remove(tok_dir)
assert(uv.fs_mkdir(tok_dir, 448))
local function write(path, text)
  local f = assert(io.open(path, "wb"))
  f:write(text)
  f:close()
end

-- the tokenizer made is used: encoded text decodes back without an error escaping
local function use_tokenizer(tok)
  local ok, ids = pcall(tok.encode, tok, "Hello, world! 123 <|im_start|>user\n\226\150\129caf\195\169", true, true)
  if not ok then return false, ids end
  for _, id in ipairs(ids) do
    if type(id) ~= "number" or id < 0 or id >= tok.vocab_size or id % 1 ~= 0 then
      return false, "encode gave id " .. tostring(id) .. " of " .. tostring(tok.vocab_size)
    end
  end
  local ok2, text = pcall(tok.decode, tok, ids)
  if not ok2 then return false, text end
  for _, k in ipairs { "bos", "eos" } do
    local id = tok[k]
    if id ~= nil and (type(id) ~= "number" or id < 0 or id >= tok.vocab_size or id % 1 ~= 0) then
      return false, k .. " id " .. tostring(id) .. " outside the vocabulary of " .. tostring(tok.vocab_size)
    end
  end
end

function targets.tokenizer(text)
  local tj, tc = text:match("^(.-)\n@@tokenizer_config.json@@\n(.*)$")
  write(tok_dir .. "/tokenizer.json", tj or text)
  if tc then write(tok_dir .. "/tokenizer_config.json", tc) else os.remove(tok_dir .. "/tokenizer_config.json") end
  local path = tok_dir .. "/tokenizer.json"
  local ok, tok, e = pcall(hf.tokenizer_from_file, path, { bos = 1, eos = 2 })
  if not ok then return false, tok end
  if not tok then
    if not (one_line(e) and e:find(path, 1, true)) then return false, e end
    return
  end
  return use_tokenizer(tok)
end

-- A handle like moonshard.loaders.gguf's over a table: arrays are Lua lists (their element type
-- that of their first element; strings()/numbers() refuse a list of another or of mixed types, as
-- the file's typed arrays cannot hold one), JSON objects arrays of arrays.
local GT = gguf.types
local function elem_type(v)
  if type(v) == "string" then return GT.STRING end
  if type(v) == "boolean" then return GT.BOOL end
  if type(v) == "number" then return v % 1 == 0 and GT.I64 or GT.F64 end
  return GT.ARRAY
end
local function fake_gguf(meta, path)
  local g = { path = path }
  local function raw(name)
    local v = meta[name]
    if v == cjson.null then return nil end
    return v
  end
  function g.get(_, name)
    local v = raw(name)
    if type(v) ~= "table" then return v end
    return { type = #v > 0 and elem_type(v[1]) or (next(v) and GT.ARRAY or GT.U8), n = #v }
  end
  function g.strings(_, name)
    local v = raw(name)
    if v == nil then return nil, string.format("'%s': no key '%s'", path, name) end
    if type(v) ~= "table" then return nil, string.format("'%s': key '%s' is not an array of strings", path, name) end
    for _, x in ipairs(v) do
      if type(x) ~= "string" then return nil, string.format("'%s': key '%s' is not an array of strings", path, name) end
    end
    local out = {}
    for i, x in ipairs(v) do out[i] = x end
    return out
  end
  function g.numbers(_, name)
    local v = raw(name)
    if v == nil then return nil, string.format("'%s': no key '%s'", path, name) end
    if type(v) ~= "table" then return nil, string.format("'%s': key '%s' is not a numeric array", path, name) end
    for _, x in ipairs(v) do
      if type(x) ~= "number" then return nil, string.format("'%s': key '%s' is not a numeric array", path, name) end
    end
    local out = {}
    for i, x in ipairs(v) do out[i] = x end
    return out
  end
  return g
end

local function posint(x) return type(x) == "number" and x >= 1 and x % 1 == 0 and x < 2 ^ 53 end
local function posnum(x) return type(x) == "number" and x > 0 and x < math.huge end

function targets.gguf(text)
  local ok, meta = pcall(cjson.decode, text)
  if not ok or type(meta) ~= "table" then return end
  local g = fake_gguf(meta, "fuzz.gguf")
  local ok2, d = pcall(gguf.parse_metadata, g)
  if not ok2 then
    if not (one_line(d) and d:find("^'fuzz.gguf': ")) then return false, d end
  else
    for _, k in ipairs { "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "max_seq", "head_dim" } do
      if not posint(d[k]) then return false, "description " .. k .. " = " .. tostring(d[k]) end
    end
    if d.n_heads % d.n_kv_heads ~= 0 then return false, "n_heads not a multiple of n_kv_heads" end
    if not posnum(d.norm_eps) then return false, "norm_eps = " .. tostring(d.norm_eps) end
    local r = d.rope
    if not posnum(r.theta) then return false, "rope theta = " .. tostring(r.theta) end
    if r.rotary_dim and not (posint(r.rotary_dim) and r.rotary_dim % 2 == 0 and r.rotary_dim <= d.head_dim) then
      return false, "rotary_dim = " .. tostring(r.rotary_dim)
    end
    if r.scaling and not posnum(r.scaling.factor) then return false, "rope scaling factor = " .. tostring(r.scaling.factor) end
  end
  local ok3, tok, e = pcall(gguf.tokenizer, g)
  if not ok3 then return false, tok end
  if not tok then
    if not one_line(e) then return false, e end
    return
  end
  return use_tokenizer(tok)
end

-- openai_*: a request body (JSON) -> moonshard.openai's checks over a stub engine and tokenizer:
-- every answer is a status the API gives, with OpenAI's error object naming the field for a 400
local openai = require "moonshard.openai"
local stub_tok = {
  vocab_size = 256, bos = 1, eos = 2,
  encode = function(_, s) local t = {} for i = 1, #s do t[i] = s:byte(i) end return t end,
  decode = function(_, ids) local t = {} for i, id in ipairs(ids) do t[i] = string.char(id % 256) end return table.concat(t) end,
  piece = function(_, id) return string.char(id % 256) end,
  decoder = function() return { push = function(_, id) return string.char(id % 256) end, flush = function() return "" end } end,
}
local stub_engine = {
  submit = function(_, r) return { id = 1, output_ids = {}, prompt_ids = r.prompt_ids } end,
  cancel = function() end,
  stats = function() return { waiting = 0, running = 0 } end,
}
local api = openai.new(stub_engine, { tokenizer = stub_tok, desc = {}, net = { vocab_size = 256, max_seq = 256 },
  path = "fuzz" }, { template = chat_template.builtin.chatml(), max_batch = 4, max_queue = 4 })
local STATUSES = { [200] = true, [400] = true, [404] = true, [429] = true }
function targets.openai(text)
  local path = text:sub(1, 1) == "c" and "/v1/chat/completions" or "/v1/completions"
  local res = { close_fns = {} }
  function res:send(status, _, body) self.status, self.body, self.started = status, body, true end
  function res:json(status, v) self:send(status, nil, cjson.encode(v)) end
  function res:stream(status) self.status, self.started, self.chunked = status, true, true end
  function res:write() return true end
  function res:finish() self.finished = true end
  function res:on_close() end
  function res:closed() return false end
  local ok, err = pcall(api.handler, { method = "POST", path = path, target = path, headers = {}, body = text:sub(2) }, res)
  if not ok then return false, err end
  if res.status and not STATUSES[res.status] then return false, "status " .. tostring(res.status) end
  if res.status == 400 then
    local dok, e = pcall(cjson.decode, res.body)
    if not dok or type(e) ~= "table" or type(e.error) ~= "table" or not one_line(e.error.message) then
      return false, "400 without a one-line error message: " .. tostring(res.body)
    end
  end
end

-- the seeds
local seeds = {}
local req = uv.fs_scandir(seed_dir)
while req do
  local name = uv.fs_scandir_next(req)
  if not name then break end
  local kind = name:match("^(%a+)_")
  if kind and targets[kind] and (not only or only[kind]) then
    local f = assert(io.open(seed_dir .. "/" .. name, "rb"))
    seeds[#seeds + 1] = { kind = kind, data = f:read("*a") }
    f:close()
  end
end
table.sort(seeds, function(a, b) return a.kind .. a.data < b.kind .. b.data end)
if #seeds == 0 then
  io.stderr:write("lua_fuzz: no seeds in ", seed_dir, "\n")
  os.exit(2)
end

local deadline = uv.hrtime() + seconds * 1e9
local runs, per = 0, {}
while uv.hrtime() < deadline do
  for _ = 1, 100 do
    local seed = seeds[rnd(#seeds) + 1]
    local input = runs % 10 == 0 and seed.data or mutate(seed.data)
    local verdict, why = targets[seed.kind](input)
    runs = runs + 1
    per[seed.kind] = (per[seed.kind] or 0) + 1
    if verdict == false then
      local out = "fuzz-finding-" .. seed.kind .. ".bin"
      local f = io.open(out, "wb")
      if f then f:write(input) f:close() end
      io.stderr:write(string.format("lua_fuzz: %s: %s (input in %s)\n", seed.kind, tostring(why), out))
      os.remove(tok_dir .. "/tokenizer.json")
      os.remove(tok_dir .. "/tokenizer_config.json")
      uv.fs_rmdir(tok_dir)
      os.exit(1)
    end
  end
end
os.remove(tok_dir .. "/tokenizer.json")
os.remove(tok_dir .. "/tokenizer_config.json")
uv.fs_rmdir(tok_dir)
local parts = {}
for k, n in pairs(per) do parts[#parts + 1] = k .. " " .. n end
table.sort(parts)
print(string.format("lua_fuzz: %d inputs in %g s (%s), no findings", runs, seconds, table.concat(parts, ", ")))
