-- Generate text from a prompt with a model (llama2.c checkpoint, Hugging Face directory or GGUF file).
local args = require "moonshard.args"

local opts = args.parse(arg, {
  usage = "moonshard generate --model PATH [--prompt TEXT] [options]",
  summary = "Prints only the generated text to stdout as it is produced; statistics go to stderr.",
  { "model", "string", "model: a directory or a checkpoint file", required = true },
  { "prompt", "string", "prompt text (empty: start from BOS alone)", default = "" },
  { "max-tokens", "int", "tokens to generate at most", default = 256, min = 0 },
  { "temperature", "number", "sampling temperature; 0 is greedy", default = 1.0, min = 0 },
  { "top-k", "int", "keep the k most likely tokens (0: all)", default = 0, min = 0 },
  { "top-p", "number", "nucleus sampling mass (1: all)", default = 1.0, min = 0, max = 1 },
  { "seed", "int", "random seed (default: from the clock)", min = 0 },
  { "tokenizer", "string", "tokenizer file to use instead of the one beside the model" },
  { "max-seq", "int", "context length (default: the model's)", min = 1 },
  { "threads", "int", "CPU threads (default: all cores)", min = 1 },
  { "device", "string", "cpu or cuda[:N]", default = "cpu" },
})

local moonshard = require "moonshard"
if opts.threads then moonshard.C.msh_set_num_threads(opts.threads) end
local seed = opts.seed or (os.time() % 2147483647)

local model, err = moonshard.load(opts.model, { device = opts.device, max_seq = opts.max_seq, tokenizer = opts.tokenizer })
if not model then
  io.stderr:write("moonshard generate: ", err, "\n")
  os.exit(1)
end

local stats, gerr = model:generate({
  prompt = opts.prompt, max_tokens = opts.max_tokens, temperature = opts.temperature,
  top_k = opts.top_k, top_p = opts.top_p, seed = seed,
}, function(text)
  io.stdout:write(text)
  io.stdout:flush()
end)
if not stats then
  io.stderr:write("moonshard generate: ", gerr, "\n")
  os.exit(1)
end
io.stdout:write("\n")
io.stdout:flush()
io.stderr:write(string.format(
  "prompt tokens: %d, generated tokens: %d (%s), prefill %.1f tok/s, decode %.1f tok/s, seed %d\n",
  stats.prompt_tokens, stats.generated_tokens, stats.finish_reason, stats.prefill_tok_s,
  stats.decode_tok_s, seed))
