-- Run a sweep file: bench, eval or bench-serve over axes, resumable; a table and gnuplot plots.
local args = require "moonshard.args"
local sweep = require "moonshard.sweep"

local opts, positional = args.parse(arg, {
  positional = true,
  usage = "moonshard sweep FILE.lua [options]",
  summary = "Runs every point of the sweep FILE.lua (axes: " .. table.concat(sweep.ORDER, ", ") .. ", any --flag) as a\n" ..
    "child process, under `moonshard launch -n tp*pp*dp` when it needs ranks. Before a point starts its launch\n" ..
    "descriptor is written to DIR/pNNN.json; its result is appended to DIR/results.jsonl. A rerun skips the points\n" ..
    "with a result (a failed point is recorded, a killed one runs again). At the end: a table on stdout and PNG\n" ..
    "plots (gnuplot) with their .gp scripts and .dat data in DIR/plots. Exit status 0 when every point is ok,\n" ..
    "1 when one failed or was killed, 2 on bad input, 130 / 143 when SIGINT / SIGTERM stopped it (and the point\n" ..
    "running then, which the next run runs again). Examples: examples/sweeps/.",
  { "dir", "string", "the run folder (default runs/<sweep name>)" },
  { "model", "string", "the model of every point instead of the file's", input = "model" },
  { "dry-run", "flag", "list the points (and which are done) without running anything" },
  { "retry-failed", "flag", "run the points recorded as failed again" },
  { "no-plots", "flag", "no plots, only the table" },
})

local file = positional[1]
if not file or positional[2] then
  io.stderr:write("moonshard sweep: give one sweep file (see `moonshard sweep --help`)\n")
  os.exit(2)
end
local ok, err = require("moonshard.validate").input_path(file, "sweep file")
if not ok then
  io.stderr:write("moonshard sweep: ", err, "\n")
  os.exit(2)
end

local s, lerr = sweep.load(file, { model = opts.model })
if not s then
  io.stderr:write("moonshard sweep: ", lerr, "\n")
  os.exit(2)
end

local run, rerr, code = sweep.run(s, { dir = opts.dir, retry_failed = opts.retry_failed, dry_run = opts.dry_run })
if not run then
  io.stderr:write("moonshard sweep: ", rerr, "\n")
  os.exit(code or 2)
end

if opts.dry_run then
  local todo = {}
  for _, p in ipairs(run.todo) do todo[p] = true end
  io.stdout:write(string.format("sweep %s: %d points in %s (%d to run)\n", s.name, #run.points, run.dir, #run.todo))
  for _, p in ipairs(run.points) do
    local r = run.records[p.key]
    local state = todo[p] and (r and "rerun" or "to run") or (r and r.status == "ok" and "done" or "failed")
    io.stdout:write(string.format("%s  %-7s %s\n      %s\n", p.id, state, p.label ~= "" and p.label or p.command,
      require("moonshard.jobs").command_line(sweep.argv(p, run.dir))))
  end
  os.exit(0)
end

io.stdout:write(string.format("sweep %s (%s, model %s): %d points, %d run now, %d failed, %d killed\n", s.name, run.dir,
  s.model, #run.points, run.ran, run.failed, run.killed))
io.stdout:write(sweep.table(s, run))
if not opts.no_plots then
  local pngs, perr = sweep.plots(s, run)
  if not pngs then
    io.stderr:write("moonshard sweep: plots: ", perr, "\n")
  else
    for _, p in ipairs(pngs) do io.stdout:write("plot: ", p, "\n") end
    if perr then io.stderr:write("moonshard sweep: ", perr, "\n") end
  end
end

local bad = 0
for _, p in ipairs(run.points) do
  local r = run.records[p.key]
  if not r or r.status ~= "ok" then bad = bad + 1 end
end
os.exit(bad > 0 and 1 or 0)
