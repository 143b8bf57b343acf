-- moonshard.metrics: counters, gauges and histograms rendered in Prometheus' text exposition
-- format (version 0.0.4), for `moonshard serve`'s /metrics.
--
--   local reg = metrics.new()
--   local req = reg:counter("moonshard_requests_total", "HTTP requests answered", { "status" })
--   req:inc(1, { status = "200" })
--   local ttft = reg:histogram("moonshard_time_to_first_token_seconds", "...", { 0.01, 0.1, 1 })
--   ttft:observe(0.03)
--   reg:gauge("moonshard_queue_length", "...", function() return engine:stats().waiting end)
--   reg:render() --> "# HELP ...\n# TYPE ...\n..."
local M = {}

local CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
M.CONTENT_TYPE = CONTENT_TYPE

local function fmt(v)
  if v ~= v then return "NaN" end
  if v == math.huge then return "+Inf" end
  if v == -math.huge then return "-Inf" end
  if v % 1 == 0 and math.abs(v) < 1e15 then return string.format("%d", v) end
  for _, f in ipairs { "%.15g", "%.16g" } do -- the shortest that reads back the same
    local t = string.format(f, v)
    if tonumber(t) == v then return t end
  end
  return string.format("%.17g", v)
end
M.format_value = fmt

local function escape(s)
  return (tostring(s):gsub("\\", "\\\\"):gsub("\n", "\\n"):gsub('"', '\\"'))
end

-- '{a="x",b="y"}' for the label names in order (values from labels); "" when there are none
local function label_text(names, labels, extra)
  local parts = {}
  for _, n in ipairs(names or {}) do parts[#parts + 1] = n .. '="' .. escape(labels and labels[n] or "") .. '"' end
  if extra then parts[#parts + 1] = extra end
  if #parts == 0 then return "" end
  return "{" .. table.concat(parts, ",") .. "}"
end

local Registry = {}
Registry.__index = Registry

function M.new()
  return setmetatable({ list = {}, by_name = {} }, Registry)
end

local function add(self, m)
  if self.by_name[m.name] then error("metrics: '" .. m.name .. "' registered twice", 3) end
  if not m.name:match("^[%a_:][%w_:]*$") then error("metrics: bad metric name '" .. m.name .. "'", 3) end
  self.by_name[m.name] = m
  self.list[#self.list + 1] = m
  return m
end

-- ------------------------------------------------------------------------------- counters

local Counter = {}
Counter.__index = Counter

function Registry:counter(name, help, label_names)
  return add(self, setmetatable({ name = name, help = help, kind = "counter", labels = label_names or {},
    values = {}, keys = {} }, Counter))
end

local function key_of(m, labels)
  if #m.labels == 0 then return "" end
  local k = label_text(m.labels, labels)
  if not m.keys[k] then m.keys[k] = true; m.order = m.order or {}; m.order[#m.order + 1] = k end
  return k
end

function Counter:inc(n, labels)
  n = n or 1
  if n < 0 then error("metrics: a counter only goes up", 2) end
  local k = key_of(self, labels)
  self.values[k] = (self.values[k] or 0) + n
end

function Counter:get(labels)
  return self.values[#self.labels == 0 and "" or label_text(self.labels, labels)] or 0
end

function Counter:lines(out)
  if #self.labels == 0 then
    out[#out + 1] = self.name .. " " .. fmt(self.values[""] or 0)
    return
  end
  for _, k in ipairs(self.order or {}) do out[#out + 1] = self.name .. k .. " " .. fmt(self.values[k]) end
end

-- ------------------------------------------------------------------------------- gauges

local Gauge = {}
Gauge.__index = Gauge

-- fn (optional): computes the value at each render
function Registry:gauge(name, help, fn)
  return add(self, setmetatable({ name = name, help = help, kind = "gauge", value = 0, fn = fn }, Gauge))
end

function Gauge:set(v) self.value = v end
function Gauge:get() return self.fn and self.fn() or self.value end
function Gauge:lines(out) out[#out + 1] = self.name .. " " .. fmt(self:get() or 0) end

-- ------------------------------------------------------------------------------- histograms

local Histogram = {}
Histogram.__index = Histogram

-- buckets: increasing upper bounds (+Inf is added)
function Registry:histogram(name, help, buckets)
  for i = 2, #buckets do
    if not (buckets[i] > buckets[i - 1]) then error("metrics: buckets must increase", 2) end
  end
  local counts = {}
  for i = 1, #buckets do counts[i] = 0 end
  return add(self, setmetatable({ name = name, help = help, kind = "histogram", buckets = buckets, counts = counts,
    sum = 0, count = 0 }, Histogram))
end

function Histogram:observe(v)
  local b = self.buckets
  for i = 1, #b do
    if v <= b[i] then self.counts[i] = self.counts[i] + 1 break end
  end
  self.sum = self.sum + v
  self.count = self.count + 1
end

function Histogram:lines(out)
  local cum = 0
  for i, le in ipairs(self.buckets) do
    cum = cum + self.counts[i]
    out[#out + 1] = string.format('%s_bucket{le="%s"} %s', self.name, fmt(le), fmt(cum))
  end
  out[#out + 1] = string.format('%s_bucket{le="+Inf"} %s', self.name, fmt(self.count))
  out[#out + 1] = self.name .. "_sum " .. fmt(self.sum)
  out[#out + 1] = self.name .. "_count " .. fmt(self.count)
end

-- ------------------------------------------------------------------------------- rendering

function Registry:render()
  local out = {}
  for _, m in ipairs(self.list) do
    out[#out + 1] = "# HELP " .. m.name .. " " .. m.help:gsub("\\", "\\\\"):gsub("\n", "\\n")
    out[#out + 1] = "# TYPE " .. m.name .. " " .. m.kind
    m:lines(out)
  end
  return table.concat(out, "\n") .. "\n"
end

-- M.parse(text) -> { ["name{labels}"] = value }: the samples of an exposition (for tests and
-- bench-serve), comments skipped.
function M.parse(text)
  local out = {}
  for line in text:gmatch("[^\n]+") do
    if not line:match("^#") then
      local k, v = line:match("^(%S+)%s+(%S+)")
      if k then out[k] = tonumber(v) or (v == "+Inf" and math.huge) or v end
    end
  end
  return out
end

return M
