-- Streaming stages (moonshard.offload) and ZeRO-3 on CPU ranks: the same tokens and logits as the
-- resident stage, and clear refusals of bad input.
local h = require "helpers"
local ffi = require "ffi"

local golden = h.read(h.stories .. "/expected_greedy_200.txt") .. "\n"
local GEN = { "generate", "--model", h.stories, "--max-tokens", "200", "--temperature", "0" }

local function args(pre, extra)
  local a = {}
  for _, x in ipairs(pre or {}) do a[#a + 1] = x end
  for _, x in ipairs(GEN) do a[#a + 1] = x end
  for _, x in ipairs(extra or {}) do a[#a + 1] = x end
  return a
end

local function values(t)
  local c = t:to("f32", "cpu")
  local p, out = ffi.cast("float*", c:data()), {}
  for i = 0, c:numel() - 1 do out[i + 1] = p[i] end
  return out
end

describe("streaming stages", function()
  local dir
  before_each(function() dir = h.tmpdir() end)
  after_each(function() h.rmdir(dir) end)

  for _, case in ipairs {
    { nil, { "--cpu-offload" } },
    { nil, { "--cpu-offload", "--prefetch", "0" } },
    { nil, { "--disk-offload", "--offload-dir", "DIR" } },
    { { "launch", "-n", "2" }, { "--zero", "3" } },
    { { "launch", "-n", "4" }, { "--zero", "3" } },
    { { "launch", "-n", "4" }, { "--tp", "2", "--pp", "2", "--cpu-offload" } },
    { { "launch", "-n", "4" }, { "--tp", "2", "--zero", "3", "--disk-offload", "--offload-dir", "DIR" } },
  } do
    local pre, extra = case[1], case[2]
    it(string.format("%s generate %s prints the stories260K golden text", table.concat(pre or {}, " "),
      table.concat(extra, " ")), function()
      local e = {}
      for i, x in ipairs(extra) do e[i] = x == "DIR" and dir or x end
      local out, err, code = h.run(args(pre, e))
      assert.are.equal(0, code, err)
      assert.are.equal(golden, out)
    end)
  end

  it("streams the HF tiny fixtures' logits equal to the resident stage's, exactly", function()
    local moonshard = require "moonshard"
    for _, name in ipairs { "f32", "bf16", "llama3" } do
      local ids = h.reference("ids")
      local list = {}
      for i, v in ipairs(ids) do list[i] = math.floor(v) end
      local base = assert(moonshard.load(h.hf .. "/" .. name))
      local want = values(assert(base:forward(list, 0, { all_logits = true })))
      base:close()
      for _, o in ipairs { { offload = "host" }, { offload = "host", prefetch = 0, pin = false },
                           { offload = "disk", offload_dir = dir } } do
        local m = assert(moonshard.load(h.hf .. "/" .. name, o))
        local got = values(assert(m:forward(list, 0, { all_logits = true })))
        assert.are.equal(0, h.max_abs_diff(want, got), name .. " " .. o.offload)
        m:close()
      end
    end
  end)

  it("reuses a matching offload file without reading or converting its matrices again", function()
    local moonshard = require "moonshard"
    local stage_mod = require "moonshard.stage"
    local ids = {}
    for i, v in ipairs(h.reference("ids")) do ids[i] = math.floor(v) end
    for _, dt in ipairs { "f32", "i4g64" } do
      local o = { offload = "disk", offload_dir = dir, dtype = dt }
      local base = assert(moonshard.load(h.hf .. "/f32", { dtype = dt }))
      local want = values(assert(base:forward(ids, 0, { all_logits = true })))
      base:close()
      local m = assert(moonshard.load(h.hf .. "/f32", o)) -- writes the file
      m:close()
      -- the second load: the layers' placement sees their vectors only
      local place, matrices, calls = stage_mod.place_layer, 0, 0
      local function load_counting()
        calls, matrices = 0, 0
        stage_mod.place_layer = function(w, ...)
          calls = calls + 1
          for _, t in pairs(w) do if t:ndim() == 2 then matrices = matrices + 1 end end
          return place(w, ...)
        end
        local ok, m2 = pcall(moonshard.load, h.hf .. "/f32", o)
        stage_mod.place_layer = place
        m2 = assert(ok and m2, m2)
        local got = values(assert(m2:forward(ids, 0, { all_logits = true })))
        assert.are.equal(0, h.max_abs_diff(want, got), dt)
        m2:close()
      end
      load_counting()
      assert.are.equal(3, calls)
      assert.are.equal(0, matrices)
      -- a header whose layouts do not check (their hash changed): the layers are placed again
      local path = dir .. "/moonshard-offload-rank0.bin"
      local f = assert(io.open(path, "r+b"))
      local head = f:read(4096)
      local at = head:find('"layouts_hash":"', 1, true)
      assert.truthy(at, head)
      at = at + #'"layouts_hash":"'
      f:seek("set", at - 1)
      f:write(head:sub(at, at) == "1" and "2" or "1")
      f:close()
      load_counting()
      assert.is_true(matrices > 0)
    end
  end)

  it("launch -n 4 --tp 2 --zero 3 --disk-offload reuses each rank's file: the golden text again, nothing rebuilt", function()
    local a = args({ "launch", "-n", "4" }, { "--tp", "2", "--zero", "3", "--disk-offload", "--offload-dir", dir })
    for run = 1, 2 do
      local out, err, code = h.run(a)
      assert.are.equal(0, code, err)
      assert.are.equal(golden, out)
      if run == 2 then assert.is_nil(err:find("rebuilding", 1, true), err) end
    end
    for r = 0, 3 do assert.truthy(io.open(string.format("%s/moonshard-offload-rank%d.bin", dir, r), "rb")) end
  end)

  it("reuses a matching offload file and rebuilds a truncated or changed one, naming it", function()
    local a = args(nil, { "--disk-offload", "--offload-dir", dir, "--max-tokens", "20" })
    local out1, err1, code1 = h.run(a)
    assert.are.equal(0, code1, err1)
    local file = dir .. "/moonshard-offload-rank0.bin"
    local st = assert(require("luv").fs_stat(file))
    local out2, err2 = h.run(a)
    assert.are.equal(out1, out2)
    assert.falsy(err2:find("rebuilding", 1, true), err2)
    -- truncated
    h.sh(string.format("truncate -s %d %s", st.size - 5000, h.q(file)))
    local out3, err3, code3 = h.run(a)
    assert.are.equal(0, code3, err3)
    assert.are.equal(out1, out3)
    assert.truthy(err3:find(file .. "' is truncated", 1, true), err3)
    assert.truthy(err3:find("rebuilding", 1, true), err3)
    -- a changed byte in the data: caught by its checksum
    h.sh(string.format("printf 'XYZ' | dd of=%s bs=1 seek=%d conv=notrunc 2>/dev/null", h.q(file), st.size - 9000))
    local out4, err4, code4 = h.run(a)
    assert.are.equal(0, code4, err4)
    assert.are.equal(out1, out4)
    assert.truthy(err4:find("is corrupt", 1, true) and err4:find("rebuilding", 1, true), err4)
    -- changed and read-only: refused, never used
    h.sh(string.format("printf 'XYZ' | dd of=%s bs=1 seek=%d conv=notrunc 2>/dev/null", h.q(file), st.size - 9000))
    local ro = args(nil, { "--disk-offload", "--offload-dir", dir, "--max-tokens", "20", "--offload-readonly" })
    local out5, err5, code5 = h.run(ro)
    assert.are_not.equal(0, code5)
    assert.are.equal("", out5)
    assert.truthy(err5:find("is corrupt", 1, true) and err5:find("refused", 1, true), err5)
  end)

  it("checks the offload dir before loading: missing, read-only, too small", function()
    local _, err, code = h.run(args(nil, { "--disk-offload", "--offload-dir", dir .. "/nope" }))
    assert.are_not.equal(0, code)
    assert.truthy(err:find("offload dir '" .. dir .. "/nope' does not exist", 1, true), err)
    _, err, code = h.run(args(nil, { "--disk-offload" }))
    assert.are_not.equal(0, code)
    assert.truthy(err:find("--disk-offload needs --offload-dir", 1, true), err)
    -- read-only: a file system mounted so, or a dir without write permission (root ignores modes:
    -- /proc is read-only for everyone)
    _, err, code = h.run(args(nil, { "--disk-offload", "--offload-dir", "/proc/self" }))
    assert.are_not.equal(0, code)
    assert.truthy(err:find("is not writable", 1, true), err)
    -- too small: a 1 MiB tmpfs is not available unprivileged everywhere; /dev/full-like space is
    -- simulated with a dir on a file system reporting no room when one exists
    local small = "/dev/shm"
    if require("luv").fs_stat(small) then
      local ok = h.sh("mkdir -p " .. h.q(dir .. "/small") .. " && mount -t tmpfs -o size=64k tmpfs " ..
        h.q(dir .. "/small") .. " 2>/dev/null && echo mounted")
      if ok:find("mounted") then
        _, err, code = h.run(args(nil, { "--disk-offload", "--offload-dir", dir .. "/small" }))
        h.sh("umount " .. h.q(dir .. "/small"))
        assert.are_not.equal(0, code)
        assert.truthy(err:find("free; the offload file needs", 1, true), err)
      end
    end
  end)

  it("--cpu-offload where host memory cannot hold the layers: the disk in --offload-dir, else a refusal", function()
    -- MSH_HOST_SHARE: the share of MemAvailable the host tier may take (here: too little for 260K)
    local env = { MSH_HOST_SHARE = "1e-9" }
    local out, err, code = h.run(args(nil, { "--cpu-offload", "--offload-dir", dir }), nil, env)
    assert.are.equal(0, code, err)
    assert.are.equal(golden, out)
    assert.truthy(err:find("the host tier needs", 1, true) and err:find("streaming from the disk in " .. dir, 1, true), err)
    local _, n = err:gsub("moonshard: ", "")
    assert.are.equal(1, n, err) -- one line
    assert.truthy(io.open(dir .. "/moonshard-offload-rank0.bin", "rb"), "no offload file written")
    local _, err2, code2 = h.run(args(nil, { "--cpu-offload" }), nil, env)
    assert.are_not.equal(0, code2)
    assert.truthy(err2:find("give --offload-dir DIR", 1, true), err2)
    -- with room, --offload-dir changes nothing: the host tier, no file
    local dir2 = h.tmpdir()
    local out3, err3, code3 = h.run(args(nil, { "--cpu-offload", "--offload-dir", dir2 }))
    assert.are.equal(0, code3, err3)
    assert.are.equal(golden, out3)
    assert.is_nil(io.open(dir2 .. "/moonshard-offload-rank0.bin", "rb"))
    h.rmdir(dir2)
  end)

  it("refuses a pinned request over the limit with --pin-memory, and falls back with a warning without", function()
    local env = "MSH_PIN_SHARE=0.0000001 "
    local base = table.concat({ h.q(h.exe), "generate", "--model", h.q(h.stories), "--max-tokens", "200",
      "--temperature", "0", "--cpu-offload" }, " ")
    local out = h.sh(env .. base .. " --pin-memory 2>&1; echo code=$?")
    assert.truthy(out:find("pinning", 1, true) and out:find("refused: allowed", 1, true)
      and out:find("would fit", 1, true), out)
    assert.falsy(out:find("code=0", 1, true), out)
    out = h.sh(env .. base .. " 2>" .. h.q(dir .. "/err") .. "; echo code=$?")
    assert.truthy(out:find("code=0", 1, true), out)
    assert.are.equal(golden, out:gsub("code=0\n$", ""))
    assert.truthy(h.read(dir .. "/err"):find("using pageable memory", 1, true))
  end)

  it("stops the group within 30 s when a rank dies during a ZeRO-3 all-gather", function()
    h.write(dir .. "/die.lua", [[
      local moonshard = require "moonshard"
      local m = assert(moonshard.load(arg[1], { zero = 3, offload = "host" }))
      if m.rank == 1 then os.exit(3) end
      for i = 1, 1000 do assert(m:forward({ 1, 2, 3 }, 0)) end
    ]])
    local t0 = require("luv").hrtime()
    local _, err, code = h.run { "launch", "-n", "2", "--collective-timeout", "10", dir .. "/die.lua", h.stories }
    assert.are_not.equal(0, code)
    assert.truthy(err:find("rank 1", 1, true), err)
    assert.is_true((require("luv").hrtime() - t0) / 1e9 < 30)
  end)

  it("measures a file's disk read rate two ways, the best the ceiling, within max_bytes", function()
    local ceil = require "moonshard.ceilings"
    local path = dir .. "/probe.bin"
    local f = assert(io.open(path, "wb"))
    local mib = string.rep("\1\2\3\4", 256 * 1024)
    for _ = 1, 40 do f:write(mib) end
    f:close()
    local rd = assert(ceil.disk(path, 24 * 1024 * 1024))
    assert.are.equal(24 * 1024 * 1024, rd.bytes)
    -- both read alike (direct, or both through the page cache where O_DIRECT is refused)
    assert.is_true(rd.dd_gbs > 0 and rd.reader_gbs > 0, require("cjson").encode(rd))
    assert.are.equal(math.max(rd.dd_gbs, rd.reader_gbs), rd.gbs)
    assert.are.equal(40 * 1024 * 1024, assert(ceil.disk(path)).bytes)
    local none, err = ceil.disk(dir .. "/missing.bin")
    assert.is_nil(none)
    assert.truthy(err:find("missing.bin", 1, true), err)
  end)

  it("bench --disk-offload reports the disk's rate measured in the same run beside the stream's", function()
    local out, err, code = h.run { "bench", "--model", h.stories, "--disk-offload", "--offload-dir", dir,
      "--prompt-len", "8", "--gen-len", "4", "--loops", "1", "--warmup", "1", "--threads", "1" }
    assert.are.equal(0, code, err)
    local r = require("cjson").decode(out:match("(%b{})%s*$"))
    assert.are.equal("disk", r.offload)
    assert.is_true(r.nvme_gbs > 0 and r.disk_read_gbs > 0, out)
    assert.are.equal(math.max(r.disk_read_dd_gbs, r.disk_read_reader_gbs), r.disk_read_gbs)
    -- the disk's bytes are counted over the timed loops alone, as the stream's (not the warm-up's):
    -- each layer read once per upload, give or take the reads queued ahead at either end
    local ratio = r.nvme_gbs / r.stream_gbs
    assert.is_true(ratio > 0.9 and ratio < 1.2, tostring(ratio))
    local f = assert(io.open(dir .. "/moonshard-offload-rank0.bin", "rb"))
    assert.are.equal(f:seek("end"), r.disk_read_bytes)
    f:close()
    -- a file of 1 MiB measures latency, not a rate: no share is stated against it
    assert.is_nil(r.nvme_share_of_disk)
  end)

  it("refuses bad flag combinations", function()
    for _, case in ipairs {
      { { "--cpu-offload", "--disk-offload", "--offload-dir", "/tmp" }, "not both" },
      { { "--offload-dir", "/tmp" }, "goes with --disk-offload (or --cpu-offload" },
      { { "--zero", "2" }, "only ZeRO stage 3" },
      { { "--cpu-offload", "--pin-memory", "--no-pin-memory" }, "not both" },
    } do
      local _, err, code = h.run(args(nil, case[1]))
      assert.are_not.equal(0, code)
      assert.truthy(err:find(case[2], 1, true), err)
    end
  end)
end)
