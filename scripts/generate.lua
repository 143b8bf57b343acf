-- Generate text from a prompt with a model (llama2.c checkpoint, Hugging Face directory or GGUF file).
local args = require "moonshard.args"
local V = require "moonshard.validate"

local opts = args.parse(arg, require("moonshard.offload").add_flags {
  usage = "moonshard generate --model PATH [--prompt TEXT | --prompt-file FILE] [options]",
  summary = "Prints only the generated text to stdout as it is produced; statistics go to stderr.",
  { "model", "string", "model: a directory or a checkpoint file", required = true, input = "model" },
  { "prompt", "string", "prompt text (empty: start from BOS alone; -: read it from stdin)", default = "" },
  { "prompt-file", "string", "read the prompt from this file (- for stdin)", input = "prompt file" },
  { "max-tokens", "int", "tokens to generate at most", default = 256, min = 0 },
  { "temperature", "number", "sampling temperature; 0 is greedy", default = 1.0, min = 0 },
  { "top-k", "int", "keep the k most likely tokens (0: all)", default = 0, min = 0 },
  { "top-p", "number", "nucleus sampling mass (1: all)", default = 1.0, min = 0, max = 1 },
  { "seed", "int", "random seed (default: from the clock)", min = 0 },
  { "tokenizer", "string", "tokenizer file to use instead of the one beside the model", input = "tokenizer" },
  { "max-seq", "int", "context length (default: the model's)", min = 1 },
  { "threads", "int", "CPU threads (default: all cores)", min = 1 },
  { "device", "string", "cpu or cuda[:N]", default = "cpu", check = V.device },
  { "tp", "int", "tensor-parallel degree (ranks from `moonshard launch`, torchrun or Slurm)", default = 1, min = 1 },
  { "pp", "int", "pipeline-parallel stages", default = 1, min = 1 },
  { "pp-layers", "string", "layers of each stage, e.g. 0-12,13-25 (default: balanced)",
    check = function(s) local ok, err = V.pp_layers(s) return ok and s, err end },
  { "pp-balance", "string", "what the stage balance evens out", enum = { "decode", "prefill" } },
  { "log-dir", "string", "write JSON Lines events (collectives, stage busy/idle) to this folder (default: $MSH_LOG_DIR, set by `moonshard launch`)" },
  { "dtype", "string", "weights' dtype on the device: native (each weight's own), f32, f16, bf16, q8_0 ... (default on the CPU: float weights in f32, GGUF Q8_0/Q4_0/Q4_1 kept)",
    enum = V.DTYPES },
  { "quant-bits", "int", "quantize the matrices at load, group-wise: 8 (int8, symmetric) or 4 (int4 with a min); sets --dtype i8g64 / i4g64 ...", enum = { 4, 8 } },
  { "quant-group-size", "int", "elements per group of --quant-bits", default = 64, enum = { 32, 64, 128 } },
  { "preset", "string", "balanced, latency, throughput or FILE.lua: a plan for this machine fills the options not given (moonshard plan)" },
})
if opts.preset then local _, perr = require("moonshard.plan").for_command(opts, arg, "generate") if perr then io.stderr:write("moonshard generate: ", perr, "\n") os.exit(2) end end
if opts.quant_bits then -- --quant-bits and --quant-group-size name a group-wise dtype (i4g64 ...)
  if opts.dtype then io.stderr:write("moonshard generate: give --dtype or --quant-bits, not both\n") os.exit(1) end
  opts.dtype = ("i%dg%d"):format(opts.quant_bits, opts.quant_group_size)
end

local function fail(msg)
  io.stderr:write("moonshard generate: ", msg, "\n")
  os.exit(1)
end

-- the prompt: --prompt TEXT, --prompt - (stdin) or --prompt-file FILE (- for stdin); no shell
-- argument limit on the last two
if opts.prompt_file and opts.prompt ~= "" then fail("give --prompt or --prompt-file, not both") end
local source = opts.prompt_file or (opts.prompt == "-" and "-")
if source then
  local f, ferr = io.stdin, nil
  if source ~= "-" then f, ferr = io.open(source, "rb") end
  if not f then fail("cannot read the prompt file: " .. tostring(ferr)) end
  local text, rerr = f:read("*a")
  if f ~= io.stdin then f:close() end
  if not text then fail(string.format("cannot read the prompt from '%s': %s", source, tostring(rerr))) end
  opts.prompt = text
end
do
  local ok, at = V.utf8(opts.prompt)
  if not ok then
    fail(string.format("the prompt is not valid UTF-8: byte %d (0x%02X) starts no character", at, opts.prompt:byte(at)))
  end
end

local moonshard = require "moonshard"
if opts.threads then moonshard.C.msh_set_num_threads(opts.threads) end
local seed = opts.seed or (os.time() % 2147483647)

local load_opts, oerr = require("moonshard.offload").load_opts(opts, { device = opts.device, max_seq = opts.max_seq,
  tokenizer = opts.tokenizer, dtype = opts.dtype, tp = opts.tp, pp = opts.pp, pp_layers = opts.pp_layers,
  pp_balance = opts.pp_balance })
if not load_opts then fail(oerr) end
local model, err = moonshard.load(opts.model, load_opts)
if not model then fail(err) end
if opts.max_seq and model.net.max_seq < opts.max_seq then
  io.stderr:write(string.format("moonshard generate: --max-seq %d is more than the model's context; using %d\n",
    opts.max_seq, model.net.max_seq))
end
-- every rank runs the same loop and samples the same tokens; rank 0 alone writes
if model.dist then seed = require("moonshard.parallel").agree(model.dist, seed) end
local quiet = model.rank ~= 0

-- telemetry: only when a log folder is named (nothing is recorded otherwise)
local tel
local log_dir = opts.log_dir or os.getenv("MSH_LOG_DIR")
if log_dir and log_dir ~= "" then
  local terr
  tel, terr = require("moonshard.telemetry").open(log_dir, { rank = model.rank, world = model.dist and model.dist.world or 1,
    meta = { script = "generate", model = opts.model, tp = opts.tp, pp = opts.pp, device = model.net.device } })
  if not tel then
    io.stderr:write("moonshard generate: ", terr, "\n")
    os.exit(1)
  end
  local net = model.net
  net:observe(tel)
end

-- under moonshard launch every rank listens for REPL sessions (moonshard attach), answered
-- between tokens; a single process does not
local live = model.dist and require "moonshard.live"
if live then
  live.listen { name = "generate", model = model, pg = model.dist, telemetry = tel, quiet = quiet,
    tcp = os.getenv("MSH_REPL") }
end

local stats, gerr = model:generate({
  prompt = opts.prompt, max_tokens = opts.max_tokens, temperature = opts.temperature,
  top_k = opts.top_k, top_p = opts.top_p, seed = seed,
}, function(text)
  if live then live.poll() end
  if quiet then return end
  io.stdout:write(text)
  local ok, werr = io.stdout:flush()
  if not ok then fail("cannot write to stdout: " .. tostring(werr)) end
end)
if not stats then
  io.stderr:write("moonshard generate: ", gerr, "\n")
  os.exit(1)
end
if tel then
  tel:close { prompt_tokens = stats.prompt_tokens, generated_tokens = stats.generated_tokens,
    prefill_s = stats.prefill_s, decode_s = stats.decode_s, n_layers = model.net.last_layer - model.net.first_layer + 1 }
end
if quiet then os.exit(0) end
io.stdout:write("\n")
io.stdout:flush()
io.stderr:write(string.format(
  "prompt tokens: %d, generated tokens: %d (%s), prefill %.1f tok/s, decode %.1f tok/s, seed %d\n",
  stats.prompt_tokens, stats.generated_tokens, stats.finish_reason, stats.prefill_tok_s,
  stats.decode_tok_s, seed))
