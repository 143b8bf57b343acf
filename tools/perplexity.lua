-- tools/perplexity.lua: perplexity of a model over a text with rolling windows (the way Hugging
-- Face's perplexity guide does it): windows of --ctx tokens starting every --stride tokens; each
-- window scores only the tokens the previous one did not (all but the first token of the first),
-- each with the window's earlier tokens as context. ppl = exp(mean negative log-likelihood).
--
--   moonshard tools/perplexity.lua --model M [--dtype f32|i8g64|i4g64|native ...] [--file F]
--     [--ctx 512] [--stride 256] [--max-tokens N] [--device cpu] [--json]
--
-- Prints one line: model, dtype, tokens scored, windows, ppl (a JSON object with --json).
-- M.perplexity(model, ids, opts) is the function the specs call.
local M = {}

local ffi = require "ffi"
local ops = require "moonshard.ops"

-- M.perplexity(model, ids, { ctx, stride }) -> ppl, tokens scored, windows
function M.perplexity(model, ids, opts)
  local ctx, stride = opts.ctx or 512, opts.stride or 256
  assert(stride >= 1 and stride <= ctx, "stride must be in [1, ctx]")
  local n, nll, scored, windows, prev_end = #ids, 0.0, 0, 0, 0
  local begin = 0
  while prev_end < n do
    local stop = math.min(begin + ctx, n)
    local win = {}
    for i = begin + 1, stop do win[#win + 1] = ids[i] end
    model:reset()
    local logits = assert(model:forward(win, 0, { all_logits = true }))
    ops.log_softmax(logits, logits) -- in place, on the logits' device
    local host = logits:device() == "cpu" and logits or logits:to("f32", "cpu")
    local V = host:size(2)
    local p = ffi.cast("const float *", host:data())
    -- the token at window index j (0-based) is predicted by row j - 1
    for j = math.max(prev_end - begin, 1), stop - begin - 1 do
      nll = nll - p[(j - 1) * V + win[j + 1]]
      scored = scored + 1
    end
    if host ~= logits then host:free() end
    logits:free()
    windows = windows + 1
    prev_end = stop
    if stop == n then break end
    begin = begin + stride
  end
  return math.exp(nll / scored), scored, windows
end

local function main(argv)
  local opts = { ctx = 512, stride = 256, file = nil, device = "cpu" }
  local i = 1
  while i <= #argv do
    local a = argv[i]
    local key = a:match("^%-%-(.+)$")
    if not key then error("unexpected argument " .. a, 0) end
    key = key:gsub("%-", "_")
    if key == "json" then opts.json = true
    else
      i = i + 1
      opts[key] = argv[i]
    end
    i = i + 1
  end
  assert(opts.model, "--model is required")
  local host = require "moonshard.host"
  opts.file = opts.file or (host.root .. "/../shared/data/eval/wikitext2_raw_test.txt")
  local f = assert(io.open(opts.file, "rb"))
  local text = f:read("*a")
  f:close()
  if opts.threads then require("moonshard").C.msh_set_num_threads(tonumber(opts.threads)) end
  local ctx, stride = tonumber(opts.ctx), tonumber(opts.stride)
  local dtype = opts.dtype
  local model = assert(require("moonshard").load(opts.model, { device = opts.device, dtype = dtype,
    max_seq = ctx, chunk = ctx }))
  local max = tonumber(opts.max_tokens)
  -- a prefix of the text is enough for max tokens (wikitext averages ~4 bytes a token): encoding
  -- all of it would take longer than scoring the part wanted
  if max and #text > 16 * max then text = text:sub(1, 16 * max) end
  local ids = model.tokenizer:encode(text, false)
  if max and #ids > max then
    local cut = {}
    for k = 1, max do cut[k] = ids[k] end
    ids = cut
  end
  local t0 = os.clock()
  local ppl, scored, windows = M.perplexity(model, ids, { ctx = ctx, stride = stride })
  local secs = os.clock() - t0
  if opts.json then
    print(string.format('{"model":"%s","dtype":"%s","tokens":%d,"scored":%d,"windows":%d,"ctx":%d,"stride":%d,"ppl":%.6f,"cpu_s":%.1f}',
      opts.model, dtype or "default", #ids, scored, windows, ctx, stride, ppl, secs))
  else
    print(string.format("%s %s: %d tokens scored in %d windows (ctx %d, stride %d): ppl %.4f", opts.model,
      dtype or "default", scored, windows, ctx, stride, ppl))
  end
  model:close()
end

-- run as a script (moonshard tools/perplexity.lua ...), not when loaded by a spec
if arg and arg[0] and arg[0]:match("perplexity%.lua$") then main(arg) end

return M
