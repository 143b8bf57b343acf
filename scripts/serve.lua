-- Serve a model over HTTP with an OpenAI-compatible API (completions, chat completions, SSE
-- streaming), /health and Prometheus /metrics, with continuous batching in the engine.
local args = require "moonshard.args"
local V = require "moonshard.validate"

local opts = args.parse(arg, require("moonshard.offload").add_flags {
  usage = "moonshard serve --model PATH [--host 127.0.0.1] [--port 8000] [--api-key KEY] [options]",
  summary = "Serves POST /v1/completions, POST /v1/chat/completions, GET /v1/models, /health, /metrics and the web console at /.\n"
    .. "Prints the URL on stderr once listening; Ctrl-C (SIGINT) or SIGTERM stops it.",
  { "model", "string", "model: a directory or a checkpoint file", required = true, input = "model" },
  { "host", "string", "address to listen on (loopback by default; 0.0.0.0 for every interface)", default = "127.0.0.1" },
  { "port", "int", "TCP port (0: any free port)", default = 8000, min = 0, max = 65535 },
  { "api-key", "string", "require 'Authorization: Bearer KEY' on /v1/ paths (default: $MOONSHARD_API_KEY, else none)" },
  { "served-model-name", "string", "the model's name in the API (default: the path's last part)" },
  { "template", "string", "chat template: a Lua file, or chatml, llama2, llama3, mistral, zephyr (default: the model's own)" },
  { "max-batch", "int", "sequences generated at once", default = 16, min = 1, max = 4096 },
  { "max-queue", "int", "sequences waiting beyond the batch before requests get 429", default = 1024, min = 0 },
  { "max-tokens-per-step", "int", "tokens a step computes at most (chunked prefill)", default = 512, min = 1 },
  { "block-size", "int", "tokens a KV-cache block holds", default = 16, min = 1 },
  { "kv-blocks", "int", "KV-cache blocks in the paged pool (default: max-batch x max-seq / block-size)", min = 1 },
  { "policy", "string", "scheduling policy: fcfs, spf or a Lua file returning a policy table", default = "fcfs" },
  { "no-prefix-caching", "flag", "compute every prompt in full (no reuse of cached prefix blocks)" },
  { "max-body", "int", "request body bytes at most (413 beyond)", default = 4 * 1024 * 1024, min = 1 },
  { "max-seq", "int", "context length (default: the model's)", min = 1 },
  { "threads", "int", "CPU threads (default: all cores)", min = 1 },
  { "device", "string", "cpu or cuda[:N]", default = "cpu", check = V.device },
  { "dtype", "string", "weights' dtype on the device (see moonshard generate --help)", enum = V.DTYPES },
  { "tp", "int", "tensor-parallel degree (ranks from `moonshard launch`)", default = 1, min = 1 },
  { "pp", "int", "pipeline-parallel stages", default = 1, min = 1 },
  { "quiet", "flag", "no line per request on stderr" },
  { "eval-dir", "string", "where the web console's eval jobs write their results, and its past runs are read (default: $MSH_LOG_DIR/evals, else none kept)" },
  { "runs-dir", "string", "more past runs for the web console: moonshard sweep folders (results.jsonl) and eval --jobs folders (jobs.jsonl) in it" },
  { "console-thresholds", "string", "the web console's warning thresholds: a Lua file like lua/moonshard/console_thresholds.lua", input = "console-thresholds" },
  { "repl", "string", "REPL sessions (moonshard attach) on the run folder's Unix socket; tcp:HOST:PORT adds TCP with a token; off: none" },
})

local function fail(msg)
  io.stderr:write("moonshard serve: ", msg, "\n")
  os.exit(1)
end

-- several ranks (moonshard launch -n TPxPP serve --tp/--pp): rank 0 serves, the others follow its
-- runner calls (moonshard.follow)
if opts.tp * opts.pp > 1 then
  local _, werr = require("moonshard.follow").check_world(opts.tp, opts.pp)
  if werr then fail(werr) end
end

local uv = require "luv"
local moonshard = require "moonshard"
local http = require "moonshard.http"
local openai = require "moonshard.openai"
if opts.threads then moonshard.C.msh_set_num_threads(opts.threads) end

local load_opts, err = require("moonshard.offload").load_opts(opts, { device = opts.device, max_seq = opts.max_seq,
  dtype = opts.dtype, tp = opts.tp, pp = opts.pp,
  batch = opts.max_batch, kv_blocks = opts.kv_blocks or true, block_size = opts.block_size,
  step_tokens = opts.max_tokens_per_step })
if not load_opts then fail(err) end
local model
model, err = moonshard.load(opts.model, load_opts)
if not model then fail(err) end
if not model.tokenizer then fail(string.format("'%s': no tokenizer found beside the model", opts.model)) end
-- every rank's telemetry (collectives, its stage's bubble, streamed weights): rank 0's console
-- samples its own and receives the followers' over the call channel
local probe
probe, err = require("moonshard.serve_telemetry").attach(model.net, { rank = model.rank,
  world = model.dist and model.dist.world or 1, dir = os.getenv("MSH_LOG_DIR"),
  meta = { script = "serve", model = opts.model, tp = opts.tp, pp = opts.pp, device = opts.device } })
if not probe then fail(err) end
local group -- rank 0 of several: the followers; model.net becomes a mirror sending them each call
if model.dist then
  group, err = require("moonshard.follow").start(model, { name = "serve", repl = opts.repl,
    stats = function() return probe:tick() end })
  if not group then fail(err) end
  if model.rank ~= 0 then return end -- a follower: its loop makes rank 0's calls until rank 0 stops
end

local template
if opts.template then
  template, err = require("moonshard.chat_template").resolve(opts.template, model.desc.chat_template)
  if not template then fail(err) end
end

local policy = opts.policy
if policy ~= "fcfs" and policy ~= "spf" then
  local r, perr = V.input_path(policy, "--policy")
  if not r then fail(perr) end
end

local engine_mod = require "moonshard.engine"
local engine
engine, err = engine_mod.new(model, { max_batch = opts.max_batch, max_tokens_per_step = opts.max_tokens_per_step,
  block_size = opts.block_size, prefix_caching = not opts.no_prefix_caching, policy = policy })
if not engine then fail(err) end

local api = openai.new(engine, model, { name = opts.served_model_name, api_key = opts.api_key or os.getenv("MOONSHARD_API_KEY"),
  max_batch = opts.max_batch, max_queue = opts.max_queue, template = template })
local thresholds
if opts.console_thresholds then
  local ok, t = pcall(dofile, opts.console_thresholds)
  if not ok or type(t) ~= "table" then fail(string.format("--console-thresholds %s: %s", opts.console_thresholds,
    ok and "returns no table" or tostring(t))) end
  local terr
  thresholds, terr = require("moonshard.console").thresholds(t)
  if not thresholds then fail("--console-thresholds " .. opts.console_thresholds .. ": " .. terr) end
end
local eval_dir = opts.eval_dir or (os.getenv("MSH_LOG_DIR") and os.getenv("MSH_LOG_DIR") .. "/evals")
if opts.runs_dir then
  local st = uv.fs_stat(opts.runs_dir)
  if not st or st.type ~= "directory" then fail(string.format("--runs-dir %s: no such folder", opts.runs_dir)) end
end
require("moonshard.console").attach(api, { eval_dir = eval_dir, runs_dir = opts.runs_dir, thresholds = thresholds,
  telemetry = probe, group = group, mode = { dtype = opts.dtype, tp = opts.tp, pp = opts.pp,
  max_tokens_per_step = opts.max_tokens_per_step, policy = opts.policy,
  -- the tier the layers ended in (--cpu-offload falls back to the disk where host memory is short)
  offload = load_opts.offload and model.net.stage.streaming and model.net.stage.tier or load_opts.offload } })
engine.on_step = function(info) api:on_step(info) end
engine:attach(uv)
if group then -- a rank gone: every request answers 503, and this rank exits naming it
  group.on_broken = function(msg)
    io.stderr:write("moonshard serve: ", msg, "; stopping (serving needs every rank)\n")
    group:abandon(engine)
    group:answer_open()
    local t = uv.new_timer()
    t:start(300, 0, function() require("moonshard.follow").exit(1) end)
  end
end

local quiet = opts.quiet
local server
server, err = http.server {
  host = opts.host, port = opts.port, handler = group and group:http_handler(api.handler) or api.handler,
  limits = { max_head = 16 * 1024, max_body = opts.max_body, max_headers = 64 },
  log = function(msg) io.stderr:write("moonshard serve: ", msg, "\n") end,
  on_response = function(res)
    api.on_response(res)
    if not quiet then
      io.stderr:write(string.format("%s %s %d\n", res.req.method, res.req.target, res.status))
    end
  end,
}
if not server then fail(err) end

local shown = opts.host:find(":", 1, true) and ("[" .. opts.host .. "]") or opts.host
io.stderr:write(string.format("moonshard serve: %s listening on http://%s:%d (max batch %d, queue %d)\n",
  api.name, shown, server.port, opts.max_batch, opts.max_queue))
require("moonshard.live").listen { name = "serve", engine = engine, model = model, tcp = opts.repl, group = group,
  telemetry = probe.tel }
io.stderr:flush()

-- SIGINT / SIGTERM: stop listening, drop the connections, let the loop end
local signals = {}
local function stop(name)
  io.stderr:write("moonshard serve: ", name, ", stopping\n")
  server:close()
  engine:detach()
  probe:close()
  if not group then for _, s in ipairs(signals) do if not s:is_closing() then s:close() end end end
  model:close() -- (rank 0 of several: tells the followers to stop)
  if group then require("moonshard.follow").exit(group.broken and 1 or 0) end
  os.exit(0)
end
for _, name in ipairs { "sigint", "sigterm" } do
  local s = uv.new_signal()
  s:start(name, function() stop(name:upper()) end)
  signals[#signals + 1] = s
end
