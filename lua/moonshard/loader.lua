-- moonshard.loader: opens a model from a path, whatever its format, and returns its description
-- and tokenizer. Formats: Hugging Face directories (config.json + safetensors) and llama2.c
-- checkpoints (a .bin file, or a directory holding one, with a tokenizer.bin-format vocabulary).
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

-- Which format a path holds: "hf", "llama2c" (with model and tokenizer paths), or nil, message.
function M.detect(path)
  local st = stat(path)
  if not st then return nil, string.format("model path '%s' does not exist", path) end
  if st.type == "directory" then
    if stat(path .. "/config.json") then return { format = "hf", dir = path } end
    local model, tok
    for _, name in ipairs(list(path)) do
      if name:match("%.bin$") then
        if is_tokenizer_name(name) then tok = tok or (path .. "/" .. name)
        else model = model or (path .. "/" .. name) end
      end
    end
    if model then return { format = "llama2c", model = model, tokenizer = tok } end
    return nil, string.format("'%s': no config.json and no llama2.c checkpoint (.bin) inside", path)
  end
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
  return nil, string.format("'%s': unrecognized model file (expected a directory, .bin or .safetensors)", path)
end

-- M.load(path, opts?) -> { desc, tokenizer } | nil, message
--   opts.tokenizer: path of a tokenizer file to use instead of the one found beside the model
function M.load(path, opts)
  opts = opts or {}
  local found, err = M.detect(path)
  if not found then return nil, err end
  local desc, tokpath
  if found.format == "hf" then
    desc, err = require("moonshard.loaders.hf").load(found.dir)
    if desc and stat(found.dir .. "/tokenizer.bin") then tokpath = found.dir .. "/tokenizer.bin" end
  else
    desc, err = require("moonshard.loaders.llama2c").load(found.model)
    tokpath = found.tokenizer
  end
  if not desc then return nil, err end
  local m = require("moonshard.models.llama")
  local ok, verr = m.validate(desc)
  if not ok then return nil, string.format("'%s': %s", path, verr) end
  tokpath = opts.tokenizer or tokpath
  local tok
  if tokpath then
    tok, err = require("moonshard.tokenizer").load_sp(tokpath, desc.vocab_size)
    if not tok then return nil, err end
  end
  return { desc = desc, tokenizer = tok, path = path }
end

return M
