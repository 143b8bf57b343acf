-- moonshard.loader: opens a model from a path, whatever its format, and returns its description
-- and tokenizer. Formats: Hugging Face directories (config.json + safetensors, tokenizer.json),
-- GGUF files (or a directory holding one) and llama2.c checkpoints (a .bin file, or a directory
-- holding one, with a tokenizer.bin-format vocabulary).
local uv = require "luv"

local M = {}

local function stat(path)
  return uv.fs_stat(path)
end

local function list(dir)
  local names = {}
  local req = uv.fs_scandir(dir)
  while req do
    local name = uv.fs_scandir_next(req)
    if not name then break end
    names[#names + 1] = name
  end
  table.sort(names)
  return names
end

local function is_tokenizer_name(name)
  return name == "tokenizer.bin" or name:match("^tok%d*%.bin$") ~= nil
end

-- The first bytes of a file ("" when unreadable).
local function magic(path)
  local f = io.open(path, "rb")
  if not f then return "" end
  local s = f:read(4) or ""
  f:close()
  return s
end

-- Which format a path holds: "hf", "gguf" (with the file), "llama2c" (with model and tokenizer
-- paths), or nil, message.
function M.detect(path)
  local st = stat(path)
  if not st then return nil, string.format("model path '%s' does not exist", path) end
  if st.type == "directory" then
    local gguf
    for _, name in ipairs(list(path)) do
      if name:match("%.gguf$") then gguf = gguf or name end
    end
    if stat(path .. "/config.json") then
      if gguf then
        return nil, string.format("'%s' holds both a Hugging Face checkpoint (config.json) and '%s': name the "
          .. "file to load, or keep them in separate folders", path, gguf)
      end
      return { format = "hf", dir = path }
    end
    if gguf then return { format = "gguf", model = path .. "/" .. gguf } end
    local model, tok
    for _, name in ipairs(list(path)) do
      if name:match("%.bin$") then
        if is_tokenizer_name(name) then tok = tok or (path .. "/" .. name)
        else model = model or (path .. "/" .. name) end
      end
    end
    if model then return { format = "llama2c", model = model, tokenizer = tok } end
    return nil, string.format("'%s': no config.json, no .gguf file and no llama2.c checkpoint (.bin) inside", path)
  end
  if path:match("%.gguf$") or magic(path) == "GGUF" then return { format = "gguf", model = path } end
  if path:match("%.safetensors$") then
    return { format = "hf", dir = path:match("^(.*)/[^/]*$") or "." }
  end
  if path:match("%.bin$") then
    local dir = path:match("^(.*)/[^/]*$") or "."
    local tok
    for _, name in ipairs(list(dir)) do
      if is_tokenizer_name(name) then tok = dir .. "/" .. name break end
    end
    return { format = "llama2c", model = path, tokenizer = tok }
  end
  return nil, string.format("'%s': unrecognized model file (expected a directory, .gguf, .bin or .safetensors)", path)
end

-- M.load(path, opts?) -> { desc, tokenizer, chat_template } | nil, message
--   opts.tokenizer: path of a tokenizer file to use instead of the one found beside the model
--     (a tokenizer.bin-format vocabulary, or a tokenizer.json)
-- desc.chat_template holds the model's chat template string when it has one.
function M.load(path, opts)
  opts = opts or {}
  local found, err = M.detect(path)
  if not found then return nil, err end
  local desc, tokpath, tok
  if found.format == "gguf" then
    local gguf = require "moonshard.loaders.gguf"
    desc, err = gguf.load(found.model)
    if not desc then return nil, err end
    if not opts.tokenizer then
      tok, err = gguf.tokenizer(desc.gguf)
      if not tok then return nil, err end
    end
  elseif found.format == "hf" then
    local hf = require "moonshard.loaders.hf"
    desc, err = hf.load(found.dir)
    if desc and not opts.tokenizer then
      if stat(found.dir .. "/tokenizer.json") then
        tok, err = hf.tokenizer(found.dir, desc)
        if not tok then return nil, err end
      elseif stat(found.dir .. "/tokenizer.bin") then
        tokpath = found.dir .. "/tokenizer.bin"
      end
    end
  else
    desc, err = require("moonshard.loaders.llama2c").load(found.model)
    tokpath = found.tokenizer
  end
  if not desc then return nil, err end
  local m = require("moonshard.runner")
  local ok, verr = m.validate(desc)
  if not ok then return nil, string.format("'%s': %s", path, verr) end
  tokpath = opts.tokenizer or tokpath
  if tokpath and tokpath:match("%.json$") then
    tok, err = require("moonshard.loaders.hf").tokenizer_from_file(tokpath, desc)
    if not tok then return nil, err end
  elseif tokpath then
    tok, err = require("moonshard.tokenizer").load_sp(tokpath, desc.vocab_size)
    if not tok then return nil, err end
  end
  if tok and tok.vocab_size > desc.vocab_size then
    return nil, string.format("'%s': the tokenizer has %d tokens, more than the model's %d", path,
      tok.vocab_size, desc.vocab_size)
  end
  return { desc = desc, tokenizer = tok, path = path, chat_template = desc.chat_template }
end

return M
