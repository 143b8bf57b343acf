-- moonshard.sweep_plot: the plots of a sweep's run (moonshard.sweep): throughput against batch
-- size, latency against tp, accuracy against quantization bits, strong and weak scaling against
-- the ideal line; each a .dat file and a .gp script in <run>/plots, and a PNG where gnuplot runs.
local jobs = require "moonshard.jobs"

local M = {}

local function show(v) return require("moonshard.sweep").show(v) end

-- the throughput and latency numbers of a point's record (nil when it has none)
local function throughput(p, r)
  if not (r and r.status == "ok" and r.metrics) then return nil end
  if p.command == "bench" then return r.metrics.decode_tok_s, "bench decode tokens/s" end
  if p.command == "bench-serve" then return r.metrics.output_tok_s, "bench-serve output tokens/s" end
end
local function latency(p, r)
  if not (r and r.status == "ok" and r.metrics) then return nil end
  if p.command == "bench" then return r.metrics.decode_step_ms, "bench decode step (ms)" end
  if p.command == "bench-serve" then return r.metrics["itl_ms.p50"], "bench-serve inter-token latency p50 (ms)" end
end

-- the label of a point's other axes (those not in `except`)
local function series_label(s, p, except)
  local parts = {}
  for _, ax in ipairs(s.axes) do
    if not except[ax.name] and (#ax.values > 1 or (ax.name == "command" and #ax.values > 1)) then
      parts[#parts + 1] = ax.name .. "=" .. show(p.values[ax.name])
    end
  end
  return #parts > 0 and table.concat(parts, " ") or "all"
end

local function axis_of(s, name)
  for _, ax in ipairs(s.axes) do if ax.name == name then return ax end end
end

-- A plot: { name, title, xlabel, ylabel, xtics = { label... } (categorical) or nil (numeric),
-- series = { { label, points = { { x, y } } } }, ideal = "x" | "1" | nil }
local function category_plot(s, run, axis, pick, spec)
  local ax = axis_of(s, axis)
  if not ax or #ax.values < 2 then return nil end
  local pos = {}
  for i, v in ipairs(ax.values) do pos[show(v)] = i - 1 end
  local series, by, ylabel = {}, {}, nil
  for _, p in ipairs(run.points) do
    local ys = pick(p, run.records[p.key])
    for _, yv in ipairs(ys or {}) do
      local label = series_label(s, p, { [axis] = true }) .. (yv.suffix or "")
      if not by[label] then
        by[label] = { label = label, points = {} }
        series[#series + 1] = by[label]
      end
      table.insert(by[label].points, { pos[show(p.values[axis])], yv.y, show(p.values[axis]) })
      ylabel = ylabel or yv.ylabel
    end
  end
  local keep = {}
  for _, se in ipairs(series) do if #se.points >= 2 then keep[#keep + 1] = se end end
  if #keep == 0 then return nil end
  local tics = {}
  for i, v in ipairs(ax.values) do tics[i] = show(v) end
  spec.series, spec.xtics, spec.ylabel = keep, tics, spec.ylabel or ylabel
  return spec
end

local function one(fn)
  return function(p, r)
    local y, label = fn(p, r)
    if y then return { { y = y, ylabel = label } } end
  end
end

local function accuracy(p, r)
  if p.command ~= "eval" or not (r and r.status == "ok" and r.metrics) then return nil end
  local out = {}
  local keys = {}
  for k in pairs(r.metrics) do keys[#keys + 1] = k end
  table.sort(keys)
  for _, k in ipairs(keys) do
    local task = k:match("^(.+)%.acc$")
    if task then out[#out + 1] = { y = r.metrics[k], suffix = " " .. task, ylabel = "accuracy (acc)" } end
  end
  return out
end

-- scaling: x = ranks (tp*pp*dp), y = throughput(N) / throughput(1) of the same series; strong:
-- the same batch at every size; weak: the batch grows with the ranks (batch / ranks constant)
local function scaling_plot(s, run, weak)
  local layouts = {}
  local function layout(p)
    local parts = {}
    if p.tp > 1 then parts[#parts + 1] = "tp" end
    if p.pp > 1 then parts[#parts + 1] = "pp" end
    if p.dp > 1 then parts[#parts + 1] = "dp" end
    return table.concat(parts, "x")
  end
  local except = { tp = true, pp = true, dp = true }
  if weak then except.batch = true end
  local base, pts = {}, {}
  for _, p in ipairs(run.points) do
    local y = throughput(p, run.records[p.key])
    if y and y > 0 then
      local b = weak and ((p.values.batch or 1) / p.world) or 0
      local k = series_label(s, p, except)
      if weak then k = (k == "all" and "" or k .. " ") .. string.format("batch/rank=%g", b) end
      if p.world == 1 then base[k] = y else pts[#pts + 1] = { p = p, y = y, k = k } end
    end
  end
  local series, by = {}, {}
  for _, e in ipairs(pts) do
    if base[e.k] then
      local l = layout(e.p)
      local label = (e.k == "all" and "" or e.k .. " ") .. l
      if not by[label] then
        by[label] = { label = label, points = { { 1, 1 } }, ranks = {} }
        series[#series + 1] = by[label]
        layouts[l] = true
      end
      if not by[label].ranks[e.p.world] then
        by[label].ranks[e.p.world] = true
        table.insert(by[label].points, { e.p.world, e.y / base[e.k] })
      end
    end
  end
  if #series == 0 then return nil end
  for _, se in ipairs(series) do table.sort(se.points, function(a, b) return a[1] < b[1] end) end
  return { name = weak and "weak_scaling" or "strong_scaling",
    title = weak and "weak scaling: batch grows with the ranks" or "strong scaling: the same batch on more ranks",
    xlabel = "ranks (tp x pp x dp)", ylabel = "throughput / throughput on 1 rank", series = series, ideal = "x" }
end

function M.plot_specs(s, run)
  local specs = {}
  local function add(p) if p then specs[#specs + 1] = p end end
  add(category_plot(s, run, "batch", one(throughput), { name = "throughput_vs_batch",
    title = "throughput against batch size", xlabel = "batch size" }))
  add(category_plot(s, run, "tp", one(latency), { name = "latency_vs_tp", title = "latency against tensor parallelism",
    xlabel = "tp" }))
  add(category_plot(s, run, "quant_bits", accuracy, { name = "accuracy_vs_quant_bits",
    title = "accuracy against quantization bits", xlabel = "weight bits" }))
  add(category_plot(s, run, "quant_bits", one(throughput), { name = "throughput_vs_quant_bits",
    title = "throughput against quantization bits", xlabel = "weight bits" }))
  add(scaling_plot(s, run, false))
  add(scaling_plot(s, run, true))
  return specs
end

local function gp_string(s) return '"' .. tostring(s):gsub('\\', '\\\\'):gsub('"', '\\"') .. '"' end

-- M.write_plot(dir, spec, terminal) -> png path, gp path, dat path
function M.write_plot(dir, spec, terminal)
  local dat = {}
  for i, se in ipairs(spec.series) do
    if i > 1 then dat[#dat + 1] = "\n" end
    dat[#dat + 1] = "# " .. se.label
    for _, pt in ipairs(se.points) do
      dat[#dat + 1] = string.format("%.10g %.10g%s", pt[1], pt[2], pt[3] and (" " .. pt[3]) or "")
    end
    dat[#dat + 1] = ""
  end
  local datf = spec.name .. ".dat"
  local f = assert(io.open(dir .. "/" .. datf, "wb"))
  f:write(table.concat(dat, "\n"), "\n")
  f:close()
  local gp = {
    string.format("set terminal %s size 900,560", terminal),
    string.format("set output %s", gp_string(spec.name .. ".png")),
    string.format("set title %s", gp_string(spec.title)),
    string.format("set xlabel %s", gp_string(spec.xlabel)),
    string.format("set ylabel %s", gp_string(spec.ylabel or "")),
    "set grid", "set key outside right top", "set offsets 0.2, 0.2, 0, 0",
  }
  if spec.xtics then
    local t = {}
    for i, l in ipairs(spec.xtics) do t[i] = string.format("%s %d", gp_string(l), i - 1) end
    gp[#gp + 1] = "set xtics (" .. table.concat(t, ", ") .. ")"
  else
    gp[#gp + 1] = "set xtics 1"
  end
  local plots = {}
  for i, se in ipairs(spec.series) do
    plots[#plots + 1] = string.format("%s index %d using 1:2 with linespoints pt 7 title %s", i == 1 and gp_string(datf) or "''",
      i - 1, gp_string(se.label))
  end
  if spec.ideal == "x" then plots[#plots + 1] = "x with lines dashtype 2 lc rgb 'gray40' title \"ideal\"" end
  if spec.ideal == "x" then
    local maxx = 1
    for _, se in ipairs(spec.series) do for _, pt in ipairs(se.points) do maxx = math.max(maxx, pt[1]) end end
    gp[#gp + 1] = string.format("set xrange [1:%g]", maxx)
    gp[#gp + 1] = "set yrange [0:*]"
  end
  gp[#gp + 1] = "plot " .. table.concat(plots, ", \\\n     ")
  local gpf = spec.name .. ".gp"
  f = assert(io.open(dir .. "/" .. gpf, "wb"))
  f:write(table.concat(gp, "\n"), "\n")
  f:close()
  return dir .. "/" .. spec.name .. ".png", dir .. "/" .. gpf, dir .. "/" .. datf
end

local function sh_ok(cmd)
  local ok, _, code = os.execute(cmd)
  return ok == true or ok == 0 or code == 0
end

-- M.plots(s, run) -> { png paths } | nil, message: data and scripts always; PNGs where gnuplot runs
function M.plots(s, run)
  local specs = M.plot_specs(s, run)
  if #specs == 0 then return {} end
  local dir = run.dir .. "/plots"
  local ok, err = jobs.mkdir_p(dir)
  if not ok then return nil, err end
  local have = sh_ok("command -v gnuplot >/dev/null 2>&1")
  local terminal = "pngcairo"
  if have and not sh_ok("gnuplot -e 'set terminal pngcairo' >/dev/null 2>&1") then terminal = "png" end
  local out, missing = {}, nil
  for _, spec in ipairs(specs) do
    local png, gp = M.write_plot(dir, spec, terminal)
    if have then
      os.remove(png)
      local q = jobs.quote
      if sh_ok(string.format("cd %s && gnuplot %s 2>%s", q(dir), q(spec.name .. ".gp"), q(spec.name .. ".log"))) then
        out[#out + 1] = png
        os.remove(dir .. "/" .. spec.name .. ".log")
      else
        local l = jobs.tail(dir .. "/" .. spec.name .. ".log", 1)[1]
        missing = string.format("gnuplot failed on %s: %s", gp, l or "")
      end
    else
      missing = "gnuplot not found (Debian: apt install gnuplot-nox): scripts and data written, no PNGs"
    end
  end
  return out, missing
end

return M
