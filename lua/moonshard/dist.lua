-- moonshard.dist: ranks, rendezvous and communicators.
--
--   local dist = require "moonshard.dist"
--   local pg = assert(dist.init { tp = 2, pp = 1, timeout = 60 })
--   pg.rank, pg.world, pg.comm          -- this rank, the world size, the world communicator
--   pg.tp, pg.pp, pg.dp                 -- this rank's group communicators (policy.groups grid)
--   pg.grid.coords[pg.rank]             -- { dp = i, pp = j, tp = k }
--   pg.nodes, pg.hosts                  -- topology gathered at the rendezvous
--
-- Who am I: the launcher's (and torchrun's) RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
-- MASTER_ADDR, MASTER_PORT; or under Slurm SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID,
-- SLURM_TASKS_PER_NODE, SLURM_NODEID and the first host of SLURM_JOB_NODELIST (MASTER_ADDR and
-- MASTER_PORT still win when set; the port defaults to one derived from SLURM_JOB_ID); or none of
-- them: a world of one.
--
-- Rendezvous: rank 0 serves moonshard.store on MASTER_ADDR:MASTER_PORT; every rank joins the
-- gather "init" with its host name and communicator address, then the communicators are built
-- (TCP between CPU ranks, NCCL between GPU ranks, the NCCL id passed through the store).
local uv = require "luv"

local M = {}

-- ------------------------------------------------------------------------ Slurm node lists

-- Splits s at commas outside brackets.
local function split_top(s)
  local parts, depth, cur = {}, 0, {}
  for ch in s:gmatch(".") do
    if ch == "[" then depth = depth + 1 elseif ch == "]" then depth = depth - 1 end
    if ch == "," and depth == 0 then
      parts[#parts + 1] = table.concat(cur)
      cur = {}
    else
      cur[#cur + 1] = ch
    end
  end
  parts[#parts + 1] = table.concat(cur)
  return parts, depth
end

-- Expands one host expression with bracket groups ("rack[1-2]-n[01-03,7]").
local function expand_host(expr, out)
  local pre, body, post = expr:match("^([^%[]*)%[([^%]]*)%](.*)$")
  if not pre then
    if expr:find("[%[%]]") then return nil, "unbalanced brackets in '" .. expr .. "'" end
    out[#out + 1] = expr
    return true
  end
  for item in (body .. ","):gmatch("([^,]*),") do
    local a, b = item:match("^(%d+)%-(%d+)$")
    if a then
      local lo, hi = tonumber(a), tonumber(b)
      if hi < lo or hi - lo > 100000 then return nil, "bad range '" .. item .. "'" end
      local width = #a
      for i = lo, hi do
        local ok, err = expand_host(pre .. string.format("%0" .. width .. "d", i) .. post, out)
        if not ok then return nil, err end
      end
    elseif item:match("^%d+$") then
      local ok, err = expand_host(pre .. item .. post, out)
      if not ok then return nil, err end
    else
      return nil, "bad range '" .. item .. "'"
    end
  end
  return true
end

-- M.expand_nodelist("node[01-03],gpu7") -> { "node01", "node02", "node03", "gpu7" } | nil, message
function M.expand_nodelist(s)
  if type(s) ~= "string" or s == "" then return nil, "empty node list" end
  local parts, depth = split_top(s)
  if depth ~= 0 then return nil, "unbalanced brackets in node list '" .. s .. "'" end
  local out = {}
  for _, p in ipairs(parts) do
    if p == "" then return nil, "empty host in node list '" .. s .. "'" end
    local ok, err = expand_host(p, out)
    if not ok then return nil, "node list '" .. s .. "': " .. err end
  end
  return out
end

-- M.first_node("node[01-04],other") -> "node01" | nil, message
function M.first_node(s)
  local list, err = M.expand_nodelist(s)
  if not list then return nil, err end
  return list[1]
end

-- Tasks on node i (0-based) from SLURM_TASKS_PER_NODE ("2(x3),1"). nil when unparseable.
function M.tasks_on_node(spec, node)
  if type(spec) ~= "string" then return nil end
  local i = 0
  for item in (spec .. ","):gmatch("([^,]*),") do
    local n, rep = item:match("^(%d+)%(x(%d+)%)$")
    if not n then n, rep = item:match("^(%d+)$"), 1 end
    if not n then return nil end
    n, rep = tonumber(n), tonumber(rep)
    if node < i + rep then return n end
    i = i + rep
  end
  return nil
end

-- ------------------------------------------------------------------------------ identity

local function int_var(env, name)
  local v = env(name)
  if v == nil or v == "" then return nil end
  local n = tonumber(v)
  if not n or n % 1 ~= 0 or n < 0 then return nil, string.format("%s must be a non-negative integer (got '%s')", name, v) end
  return n
end

-- M.identity(getenv?) -> { rank, world, local_rank, local_world, master_addr, master_port,
--                          source = "env" | "slurm" | "single" } | nil, message
-- getenv defaults to os.getenv (tests pass a table lookup).
function M.identity(getenv)
  local env = getenv or os.getenv
  if type(env) == "table" then
    local t = env
    env = function(k) return t[k] end
  end
  local id = {}
  local err
  local function need(name)
    local v, e = int_var(env, name)
    if e then err = err or e end
    return v
  end
  local rank, world = need("RANK"), need("WORLD_SIZE")
  if err then return nil, err end
  if rank or world then
    if not (rank and world) then return nil, "RANK and WORLD_SIZE must be set together" end
    id.source = "env"
    id.rank, id.world = rank, world
    id.local_rank = need("LOCAL_RANK") or rank
    id.local_world = need("LOCAL_WORLD_SIZE") or world
    id.master_addr = env("MASTER_ADDR") or "127.0.0.1"
    id.master_port = need("MASTER_PORT")
    if err then return nil, err end
    if not id.master_port and world > 1 then return nil, "MASTER_PORT is not set (WORLD_SIZE is " .. world .. ")" end
  elseif env("SLURM_PROCID") and env("SLURM_NTASKS") then
    id.source = "slurm"
    id.rank, id.world = need("SLURM_PROCID"), need("SLURM_NTASKS")
    id.local_rank = need("SLURM_LOCALID") or 0
    local node = need("SLURM_NODEID") or 0
    if err then return nil, err end
    id.local_world = M.tasks_on_node(env("SLURM_TASKS_PER_NODE") or env("SLURM_STEP_TASKS_PER_NODE"), node)
      or id.world
    local addr = env("MASTER_ADDR")
    if not addr then
      local list = env("SLURM_STEP_NODELIST") or env("SLURM_JOB_NODELIST") or env("SLURM_NODELIST")
      if not list then return nil, "under Slurm without MASTER_ADDR: SLURM_JOB_NODELIST is not set" end
      local first, ferr = M.first_node(list)
      if not first then return nil, ferr end
      addr = first
    end
    id.master_addr = addr
    id.master_port = need("MASTER_PORT")
    if err then return nil, err end
    if not id.master_port then
      local job = need("SLURM_JOB_ID") or 0
      id.master_port = 15000 + job % 20000
    end
  else
    id.source = "single"
    id.rank, id.world, id.local_rank, id.local_world = 0, 1, 0, 1
    id.master_addr, id.master_port = "127.0.0.1", 0
  end
  if id.world < 1 then return nil, "the world size must be at least 1 (got " .. id.world .. ")" end
  if id.rank >= id.world then
    return nil, string.format("rank %d outside a world of %d ranks", id.rank, id.world)
  end
  if id.local_rank >= id.local_world then
    return nil, string.format("local rank %d outside %d local ranks", id.local_rank, id.local_world)
  end
  return id
end

-- ------------------------------------------------------------------------------ launched

-- Called first in a rank started by `moonshard launch`: die with the launcher (Linux
-- PR_SET_PDEATHSIG), and take the thread count the launcher chose.
function M.child_setup()
  local ok, ffi = pcall(require, "ffi")
  if ok and ffi.os == "Linux" then
    pcall(ffi.cdef, [[
      int prctl(int option, unsigned long a2, unsigned long a3, unsigned long a4, unsigned long a5);
      int getppid(void);
    ]])
    pcall(function()
      ffi.C.prctl(1 --[[PR_SET_PDEATHSIG]], 9 --[[SIGKILL]], 0, 0, 0)
      local launcher = tonumber(os.getenv("MOONSHARD_LAUNCHER_PID"))
      if launcher and ffi.C.getppid() ~= launcher then os.exit(1) end -- it died before we armed
    end)
  end
  local threads = tonumber(os.getenv("OMP_NUM_THREADS") or "")
  if threads and threads >= 1 then require("moonshard.core").C.msh_set_num_threads(threads) end
end

-- ------------------------------------------------------------------------------- groups

local ProcessGroup = {}
ProcessGroup.__index = ProcessGroup

-- Topology from the rendezvous: nodes in order of their lowest rank, ranks per node.
local function topology(infos)
  local nodes, by_host = {}, {}
  for r, info in ipairs(infos) do
    local h = info.host
    if not by_host[h] then
      by_host[h] = { host = h, ranks = {} }
      nodes[#nodes + 1] = by_host[h]
    end
    table.insert(by_host[h].ranks, r - 1)
  end
  local per = #nodes[1].ranks
  for _, n in ipairs(nodes) do
    if #n.ranks ~= per then per = nil break end
  end
  return nodes, per
end

-- M.init(opts) -> process group | nil, message
--   opts.timeout        seconds for the rendezvous (default 300; MOONSHARD_RDZV_TIMEOUT)
--   opts.comm_timeout   seconds a collective may wait without progress before it fails naming the
--                       rank it waits for (default: $MSH_COLLECTIVE_TIMEOUT, which
--                       `moonshard launch --collective-timeout S` sets, else 600)
--   opts.backend        "tcp" (default on the CPU) or "nccl" (default when opts.device is CUDA)
--   opts.device         "cpu" or "cuda[:i]" (default cuda:LOCAL_RANK for NCCL)
--   opts.tp, opts.pp    build the data x pipeline x tensor grid (moonshard.policy.groups) and
--                       its communicators; opts.groups overrides the policy (table or function)
--   opts.env            getenv function or table (tests)
function M.init(opts)
  opts = opts or {}
  local id, err = M.identity(opts.env)
  if not id then return nil, err end
  local timeout = opts.timeout or tonumber(os.getenv("MOONSHARD_RDZV_TIMEOUT") or "") or 300
  local comm_timeout = opts.comm_timeout or tonumber(os.getenv("MSH_COLLECTIVE_TIMEOUT") or "") or 600
  if comm_timeout ~= comm_timeout or comm_timeout <= 0 then
    return nil, "the collective timeout must be a positive number of seconds (got " .. tostring(comm_timeout) .. ")"
  end
  local backend = opts.backend or ((opts.device or "cpu"):match("^cuda") and "nccl" or "tcp")
  local pg = setmetatable({
    rank = id.rank, world = id.world, local_rank = id.local_rank, local_world = id.local_world,
    source = id.source, backend = backend, master_addr = id.master_addr, master_port = id.master_port,
  }, ProcessGroup)
  local host = uv.os_gethostname()
  local comm = require "moonshard.comm"
  local store = require "moonshard.store"

  local function fail(msg)
    pg:close()
    return nil, string.format("rank %d: %s", id.rank, msg)
  end

  local listener
  if backend == "tcp" then
    listener, err = comm.listen("0.0.0.0", 0)
    if not listener then return fail(err) end
  elseif backend ~= "nccl" then
    return fail("unknown backend '" .. tostring(backend) .. "' (tcp or nccl)")
  end

  local infos
  if id.world == 1 then
    infos = { { host = host, addr = "127.0.0.1:" .. (listener and listener:port() or 0),
      local_rank = 0, local_world = 1 } }
  else
    if id.rank == 0 then
      local bind = (id.master_addr == "127.0.0.1" or id.master_addr == "localhost") and "127.0.0.1" or "0.0.0.0"
      pg.server, err = store.serve(bind, id.master_port, { world = id.world })
      if not pg.server then return fail(err) end
    end
    pg.store, err = store.connect(id.master_addr, id.master_port, timeout)
    if not pg.store then return fail(err) end
    local me = require("cjson").encode {
      host = host, pid = uv.os_getpid(), local_rank = id.local_rank, local_world = id.local_world,
      addr = listener and (pg.store:local_ip() .. ":" .. listener:port()) or "",
    }
    local all
    all, err = pg.store:gather("init", id.rank, id.world, me, timeout)
    if not all then return fail(err) end
    infos = {}
    for r, s in ipairs(all) do infos[r] = require("cjson").decode(s) end
  end
  pg.hosts = {}
  for r, info in ipairs(infos) do pg.hosts[r] = info.host end
  pg.nodes, pg.ranks_per_node = topology(infos)

  -- the world communicator
  local world_comm
  if backend == "tcp" then
    local addrs = {}
    for r, info in ipairs(infos) do addrs[r] = info.addr end
    if pg.server then pg.server:drain(5) end -- the others' replies leave before rank 0 blocks
    world_comm, err = comm.new_tcp(listener, id.rank, id.world, addrs, timeout)
    listener:close()
    if not world_comm then return fail(err) end
    world_comm:set_timeout(comm_timeout)
  else
    local dev = opts.device and tonumber(opts.device:match("^cuda:(%d+)$")) or id.local_rank
    local nccl_id = ""
    if id.rank == 0 then
      nccl_id, err = comm.nccl_id()
      if not nccl_id then return fail(err) end
    end
    if id.world > 1 then
      local all
      all, err = pg.store:gather("nccl", id.rank, id.world, nccl_id, timeout)
      if not all then return fail(err) end
      nccl_id = all[1]
      if pg.server then pg.server:drain(5) end
    end
    world_comm, err = comm.new_nccl(id.rank, id.world, nccl_id, dev)
    if not world_comm then return fail(err) end
    world_comm:set_timeout(comm_timeout)
    pg.device = "cuda:" .. dev
  end
  pg.comm = world_comm
  pg.device = pg.device or "cpu"
  pg.timeout = timeout
  pg.comm_timeout = comm_timeout
  if opts.tp or opts.pp or opts.groups then
    local ok, gerr = pg:make_groups(opts)
    if not ok then return fail(gerr) end
  end
  -- the store stays reachable while the loop runs but does not keep the process alive
  if pg.server then pg.server:unref() end
  if pg.store then pg.store:unref() end
  return pg
end

-- pg:make_groups { tp, pp, groups? } builds pg.grid and the tp, pp and dp communicators.
function ProcessGroup:make_groups(opts)
  local groups = require "moonshard.policy.groups"
  local grid, err = groups.resolve(opts.groups, {
    world = self.world, tp = opts.tp or 1, pp = opts.pp or 1, ranks_per_node = self.ranks_per_node,
    hosts = self.hosts,
  })
  if not grid then return nil, err end
  self.grid = grid
  for _, kind in ipairs { "tp", "pp", "dp" } do
    local gi, pos = groups.find(grid[kind], self.rank)
    local c, cerr
    if self.backend == "nccl" then
      -- each group's first rank makes an id, shared through the store; then a fresh communicator
      local comm = require "moonshard.comm"
      local members = grid[kind][gi]
      local id = ""
      if pos == 0 then id, cerr = comm.nccl_id() end
      if id and self.store then
        local all
        all, cerr = self.store:gather("nccl-" .. kind, self.rank, self.world, id, self.timeout or 300)
        id = all and all[members[1] + 1]
      end
      -- rank 0 blocks in NCCL next: the others' replies must have left its store first
      if id and self.server then self.server:drain(5) end
      if id then c, cerr = comm.new_nccl(pos, #members, id, tonumber(self.device:match("^cuda:(%d+)$"))) end
    else
      c, cerr = self.comm:split(gi and gi - 1 or nil, pos)
    end
    if not c then return nil, string.format("%s group: %s", kind, tostring(cerr)) end
    if self.comm_timeout then c:set_timeout(self.comm_timeout) end
    self[kind] = c
  end
  self.coords = grid.coords[self.rank]
  return true
end

function ProcessGroup:barrier() return self.comm:barrier() end

-- Closes the communicators and the store (rank 0's store closes for everyone).
function ProcessGroup:close()
  for _, k in ipairs { "tp", "pp", "dp", "comm" } do
    local c = rawget(self, k)
    if c then c:free() end
    self[k] = nil
  end
  if self.store then self.store:close() end
  if self.server then self.server:close() end
  self.store, self.server = nil, nil
end

M.ProcessGroup = ProcessGroup
return M
