-- Evaluate a model on lm-evaluation-harness-style tasks (the task files in lua/moonshard/tasks/
-- or --tasks-dir): results JSON in the harness's shape (--output) and its markdown table.
local args = require "moonshard.args"
local V = require "moonshard.validate"

local opts = args.parse(arg, require("moonshard.offload").add_flags {
  usage = "moonshard eval --model PATH --tasks NAME[,NAME...] [options]",
  summary = "Scores the tasks' requests (loglikelihood, loglikelihood_rolling, generate_until) as lm-evaluation-harness "
    .. "does; prints the results table on stdout, progress on stderr.",
  { "model", "string", "model: a directory or a checkpoint file", input = "model" },
  { "tasks", "string", "comma-separated task names (--list-tasks lists them)" },
  { "list-tasks", "flag", "list the known tasks and exit" },
  { "tasks-dir", "string", "a folder of task files searched before the built-in ones" },
  { "data-dir", "string", "folder of the tasks' data files (default ../shared/data/eval)" },
  { "data", "string", "data files for given tasks: NAME=PATH[,NAME=PATH...]" },
  { "num-fewshot", "int", "few-shot examples per prompt (default: each task's)", min = 0 },
  { "limit", "int", "evaluate the first N documents of each task", min = 1 },
  { "batch-size", "int", "requests scored side by side", default = 8, min = 1 },
  { "gen-batch", "int", "generate_until documents generated side by side through the serving engine (one process); "
    .. "above 1 a text can depend on the batch, as a batch's rows may take another matmul method", default = 1, min = 1 },
  { "seed", "int", "seed of the few-shot draws", default = 1234, min = 0 },
  { "max-length", "int", "context tokens at most (default min(2048, the model's context - 1))", min = 2 },
  { "add-bos", "flag", "put BOS before every context (the harness's add_bos_token)" },
  { "output", "string", "write the results JSON to this file" },
  { "log-samples", "flag", "with --output: add each document's scores under \"samples\"" },
  { "tokenizer", "string", "tokenizer file to use instead of the one beside the model", input = "tokenizer" },
  { "max-seq", "int", "context length (default: the model's)", min = 1 },
  { "threads", "int", "CPU threads (default: all cores)", min = 1 },
  { "device", "string", "cpu or cuda[:N]", default = "cpu", check = V.device },
  { "tp", "int", "tensor-parallel degree (ranks from `moonshard launch`, torchrun or Slurm)", default = 1, min = 1 },
  { "pp", "int", "pipeline-parallel stages", default = 1, min = 1 },
  { "pp-layers", "string", "layers of each stage, e.g. 0-12,13-25 (default: balanced)",
    check = function(s) local ok, err = V.pp_layers(s) return ok and s, err end },
  { "dtype", "string", "weights' dtype on the device: native, f32, f16, bf16, q8_0, i8g64, i4g64 ... (default on the CPU: float weights in f32, GGUF Q8_0/Q4_0/Q4_1 kept)",
    enum = V.DTYPES },
  { "quant-bits", "int", "quantize the matrices at load, group-wise: 8 or 4 (sets --dtype i8g64 / i4g64 ...)", enum = { 4, 8 } },
  { "quant-group-size", "int", "elements per group of --quant-bits", default = 64, enum = { 32, 64, 128 } },
  { "jobs", "string", "auto or N: cut the tasks into jobs run side by side on the free GPUs or CPU cores, each job one process keeping its model loaded (moonshard.policy.eval_jobs)",
    check = function(v) return (v == "auto" or (v:match("^%d+$") and tonumber(v) >= 1)) and v or nil, "expects auto or a positive integer" end },
  { "jobs-policy", "string", "with --jobs: a Lua file returning { plan = function(tasks, topo, opts) } instead of the built-in policy", input = "policy" },
  { "jobs-dir", "string", "with --jobs: the folder of the jobs' descriptors (jobs.jsonl), events (events.jsonl) and outputs (default logs/eval-jobs-DATE-PID)" },
  { "topology", "string", "with --jobs: plan for this hwloc XML or cluster JSON instead of this machine (moonshard.topology)", input = "topology" },
  { "events", "string", "append JSON Lines progress events here (task_start, task_progress, task_done; each rank, its pipeline stage)" },
})

local function fail(msg)
  io.stderr:write("moonshard eval: ", msg, "\n")
  os.exit(1)
end

local eval = require "moonshard.eval"
if opts.list_tasks then
  local dirs = { opts.tasks_dir, eval.TASKS_DIR }
  if not opts.tasks_dir then table.remove(dirs, 1) end
  for _, n in ipairs(eval.list_tasks(dirs)) do print(n) end
  os.exit(0)
end
if not opts.model then fail("--model is required (see `moonshard eval --help`)") end
if not opts.tasks or opts.tasks == "" then fail("--tasks is required (see `moonshard eval --list-tasks`)") end
if opts.quant_bits then
  if opts.dtype then fail("give --dtype or --quant-bits, not both") end
  opts.dtype = ("i%dg%d"):format(opts.quant_bits, opts.quant_group_size)
end

-- the tasks and their data, checked before the model loads
local data = {}
if opts.data then
  for item in opts.data:gmatch("[^,]+") do
    local name, path = item:match("^([^=]+)=(.+)$")
    if not name then fail(string.format("--data expects NAME=PATH, got '%s'", item)) end
    data[name] = path
  end
end
local tasks = {}
for name in opts.tasks:gmatch("[^,%s]+") do
  local t, err = eval.load_task(name, { tasks_dir = opts.tasks_dir })
  if not t then fail(err) end
  local docs, derr, path = eval.docs(t, { data_dir = opts.data_dir, data = data })
  if not docs then fail(derr) end
  local original = #docs
  if opts.limit and #docs > opts.limit then
    local cut = {}
    for i = 1, opts.limit do cut[i] = docs[i] end
    tasks[#tasks + 1] = { task = t, docs = cut, pool = docs, original = original, path = path }
  else
    tasks[#tasks + 1] = { task = t, docs = docs, pool = docs, original = original, path = path }
  end
end
if #tasks == 0 then fail("--tasks names no task") end
if opts.jobs then os.exit(require("moonshard.jobs").eval(opts, tasks, arg)) end

local moonshard = require "moonshard"
if opts.threads then moonshard.C.msh_set_num_threads(opts.threads) end
local load_opts, oerr = require("moonshard.offload").load_opts(opts, { device = opts.device, max_seq = opts.max_seq,
  tokenizer = opts.tokenizer, dtype = opts.dtype, tp = opts.tp, pp = opts.pp, pp_layers = opts.pp_layers,
  batch = math.max(opts.batch_size, opts.gen_batch) })
if not load_opts then fail(oerr) end
local t0 = require("luv").hrtime()
local model, err = moonshard.load(opts.model, load_opts)
if not model then fail(err) end
local quiet = model.rank ~= 0
local lm = eval.adapter(model, { max_length = opts.max_length })

local events = require("moonshard.jobs").events(opts.events, model)
-- REPL sessions (moonshard attach): `progress` in their scope says where the run is; they are
-- answered between scoring batches
local live = require "moonshard.live"
local progress = { tasks = #tasks }
live.listen { name = "eval", model = model, pg = model.dist, quiet = quiet, tcp = os.getenv("MSH_REPL"),
  scope = { progress = progress } }
local runs = {}
for i, tk in ipairs(tasks) do
  events("task_start", tk.task.name, { docs = #tk.docs })
  progress.task, progress.task_index, progress.done, progress.total = tk.task.name, i, 0, nil
  local ok, run = pcall(eval.run_task, lm, tk.task, tk.docs, {
    num_fewshot = opts.num_fewshot, seed = opts.seed, batch_size = opts.batch_size, gen_batch = opts.gen_batch,
    quiet = quiet,
    add_bos = opts.add_bos, fewshot_docs = nil,
    on_progress = function(done, total)
      progress.done, progress.total = done, total
      events("task_progress", tk.task.name, { done = done, total = total })
      live.poll()
    end,
  })
  if not ok then fail(string.format("task '%s': %s", tk.task.name, tostring(run))) end
  events("task_done", tk.task.name, { metrics = run.metrics })
  run.task, run.original, run.data_path = tk.task, tk.original, tk.path
  runs[#runs + 1] = run
end
local elapsed = (require("luv").hrtime() - t0) / 1e9
if quiet then os.exit(0) end

local function git_hash()
  local root = require("moonshard.host").root
  local p = io.popen("git -C '" .. root:gsub("'", "'\\''") .. "' rev-parse --short HEAD 2>/dev/null")
  local h = p and p:read("*l")
  if p then p:close() end
  return h
end
local placement = {
  device = model.net.device, tp = opts.tp, pp = opts.pp, zero = opts.zero, cpu_offload = opts.cpu_offload or false,
  disk_offload = opts.disk_offload or false, kv_offload = opts.kv_offload or false, dtype = opts.dtype or "default",
  world = model.dist and model.dist.world or 1,
}
local res = eval.results_json(runs, {
  config = {
    model = "moonshard", model_args = "model=" .. opts.model, model_path = opts.model, placement = placement,
    batch_size = opts.batch_size, gen_batch = opts.gen_batch, limit = opts.limit, seed = opts.seed,
    max_length = lm.max_length,
    add_bos = opts.add_bos or false, moonshard_version = moonshard.version,
  },
  git_hash = git_hash(), date = os.time(), total_evaluation_time_seconds = string.format("%.2f", elapsed),
})
if opts.output then
  if opts.log_samples then
    res.samples = {}
    for _, run in ipairs(runs) do res.samples[run.task.name] = run.samples end
  end
  local f, ferr = io.open(opts.output, "wb")
  if not f then fail(string.format("cannot write %s: %s", opts.output, tostring(ferr))) end
  f:write(eval.encode_json(res), "\n")
  f:close()
end
io.stdout:write(string.format("moonshard (model=%s, device=%s, tp=%d, pp=%d, dtype=%s), limit: %s, num_fewshot: %s, batch_size: %d\n",
  opts.model, placement.device, opts.tp, opts.pp, placement.dtype, tostring(opts.limit), tostring(opts.num_fewshot),
  opts.batch_size))
io.stdout:write(eval.markdown(res))
