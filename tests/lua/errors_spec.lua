-- Bad input from outside gets a clear message naming the file and the problem, a non-zero exit
-- and no crash (a crash would show as an exit code above 128 or a missing message).
local h = require "helpers"

local function generate(model, extra)
  local args = { "generate", "--model", model, "--max-tokens", "4", "--temperature", "0" }
  for _, a in ipairs(extra or {}) do args[#args + 1] = a end
  return h.run(args)
end

-- res: { generate(...) } (stdout, stderr, exit code)
local function expect_failure(res, ...)
  local out, err, code = res[1], res[2], res[3]
  assert.are.equal(1, code, "exit code " .. tostring(code) .. ", stderr: " .. err)
  assert.are.equal("", out)
  for _, needle in ipairs { ... } do
    assert.truthy(err:find(needle, 1, true), "stderr lacks '" .. needle .. "': " .. err)
  end
end

describe("bad input", function()
  local tmp
  before_each(function() tmp = h.tmpdir() end)
  after_each(function() h.rmdir(tmp) end)

  it("a missing model path", function()
    expect_failure({ generate(tmp .. "/nope") }, tmp .. "/nope", "does not exist")
  end)

  it("a truncated llama2.c checkpoint", function()
    local full = h.read(h.stories .. "/stories260K.bin")
    h.write(tmp .. "/model.bin", full:sub(1, 500000))
    h.write(tmp .. "/tok512.bin", h.read(h.stories .. "/tok512.bin"))
    expect_failure({ generate(tmp) }, tmp .. "/model.bin", "truncated")
  end)

  it("a truncated tokenizer", function()
    h.write(tmp .. "/model.bin", h.read(h.stories .. "/stories260K.bin"))
    h.write(tmp .. "/tok512.bin", h.read(h.stories .. "/tok512.bin"):sub(1, 3000))
    expect_failure({ generate(tmp) }, tmp .. "/tok512.bin")
  end)

  local function hf_copy()
    local d = tmp .. "/hf"
    h.copy_dir(h.hf .. "/f32", d)
    return d
  end

  -- Rewrites the JSON header of a safetensors file with f(header) and keeps the data.
  local function patch_header(path, f)
    local s = h.read(path)
    local n = 0
    for i = 8, 1, -1 do n = n * 256 + s:byte(i) end
    local header, data = s:sub(9, 8 + n), s:sub(9 + n)
    local new = f(header)
    local len = #new
    local bytes = {}
    for i = 1, 8 do bytes[i] = string.char(len % 256); len = math.floor(len / 256) end
    h.write(path, table.concat(bytes) .. new .. data)
  end

  it("safetensors whose header lies about offsets", function()
    local d = hf_copy()
    patch_header(d .. "/model.safetensors", function(hd)
      return (hd:gsub('("model%.norm%.weight":%b{})', function(entry)
        return (entry:gsub('"data_offsets":%[(%d+),(%d+)%]', function(a, b)
          return string.format('"data_offsets":[%d,%d]', a + 10000000, b + 10000000)
        end))
      end))
    end)
    expect_failure({ generate(d) }, "model.safetensors", "model.norm.weight")
  end)

  it("safetensors whose header lies about a size", function()
    local d = hf_copy()
    patch_header(d .. "/model.safetensors", function(hd)
      return (hd:gsub('("model%.norm%.weight":{[^}]-"shape":)%[64%]', "%1[65]"))
    end)
    expect_failure({ generate(d) }, "model.safetensors", "model.norm.weight")
  end)

  it("safetensors whose header lies about a dtype", function()
    local d = hf_copy()
    patch_header(d .. "/model.safetensors", function(hd)
      return (hd:gsub('("model%.norm%.weight":{"dtype":)"F32"', '%1"F16"'))
    end)
    expect_failure({ generate(d) }, "model.safetensors", "model.norm.weight")
  end)

  it("safetensors with a header length past the end", function()
    local d = hf_copy()
    local s = h.read(d .. "/model.safetensors")
    h.write(d .. "/model.safetensors", "\255\255\255\0\0\0\0\0" .. s:sub(9))
    expect_failure({ generate(d) }, "model.safetensors")
  end)

  it("config.json missing a field", function()
    local d = hf_copy()
    local cfg = h.read(d .. "/config.json"):gsub('%s*"hidden_size":%s*%d+,', "")
    h.write(d .. "/config.json", cfg)
    expect_failure({ generate(d) }, "config.json", "missing field 'hidden_size'")
  end)

  it("config.json that is not JSON", function()
    local d = hf_copy()
    h.write(d .. "/config.json", "{ not json")
    expect_failure({ generate(d) }, "config.json", "not valid JSON")
  end)

  it("a tensor whose shape disagrees with config.json", function()
    local d = hf_copy()
    local cfg = h.read(d .. "/config.json"):gsub('"intermediate_size":%s*%d+', '"intermediate_size": 100')
    h.write(d .. "/config.json", cfg)
    expect_failure({ generate(d) }, "mlp.gate_proj.weight", "expected (100, 64)")
  end)

  it("a prompt longer than the context", function()
    local prompt = string.rep("Once upon a time there was a girl. ", 10)
    expect_failure({ generate(h.stories, { "--prompt", prompt, "--max-seq", "16" }) }, "context")
  end)

  it("a bad command-line option", function()
    local out, err, code = h.run { "generate", "--model", h.stories, "--max-tokens", "x" }
    assert.are.equal(2, code)
    assert.truthy(err:find("--max-tokens expects a number", 1, true), err)
  end)
end)
