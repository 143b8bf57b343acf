local V = require "moonshard.validate"
local cjson = require "cjson"

local function err_of(fn, ...)
  local ok, e = pcall(fn, ...)
  assert.is_false(ok, "expected an error")
  return e
end

describe("moonshard.validate", function()
  local where = "dir/config.json"

  it("field: the value, or the default when absent or null", function()
    assert.are.equal(1e-5, V.field({ rms_norm_eps = 1e-5 }, "rms_norm_eps", { type = "number", gt = 0 }, where))
    assert.are.equal(1e-6, V.field({}, "rms_norm_eps", { type = "number", gt = 0, default = 1e-6 }, where))
    assert.are.equal(1e-6, V.field({ rms_norm_eps = cjson.null }, "rms_norm_eps",
      { type = "number", gt = 0, default = 1e-6 }, where))
  end)

  it("names the file, the field, what it must be and what it got", function()
    assert.are.equal([['dir/config.json': field 'rms_norm_eps' must be a positive finite number (got "x")]],
      err_of(V.field, { rms_norm_eps = "x" }, "rms_norm_eps", { type = "number", gt = 0 }, where))
    assert.are.equal([['dir/config.json': field 'num_key_value_heads' must be a positive integer (got "abc")]],
      err_of(V.field, { num_key_value_heads = "abc" }, "num_key_value_heads", { type = "int", gt = 0 }, where))
    assert.are.equal([['dir/config.json': field 'tie_word_embeddings' must be true or false (got "yes")]],
      err_of(V.field, { tie_word_embeddings = "yes" }, "tie_word_embeddings", { type = "boolean" }, where))
    assert.are.equal([['dir/config.json': missing field 'hidden_size' (a positive integer)]],
      err_of(V.field, {}, "hidden_size", { type = "int", gt = 0, required = true }, where))
    assert.are.equal("--model is required", err_of(V.check, nil, { required = true }, nil, "--model"))
  end)

  it("numbers: finite by default, bounds, integers exact", function()
    local num = { type = "number" }
    for _, bad in ipairs { 0 / 0, math.huge, -math.huge } do
      assert.truthy(err_of(V.check, bad, num, "cli", "--temperature"):find("finite number", 1, true))
    end
    assert.are.equal(math.huge, V.check(math.huge, { type = "number", finite = false }))
    assert.truthy(err_of(V.check, 0 / 0, { type = "number", finite = false }):find("got nan", 1, true))
    assert.truthy(err_of(V.check, 1.5, { type = "int" }, nil, "n"):find("must be an integer", 1, true))
    assert.truthy(err_of(V.check, 2 ^ 53, { type = "int" }, nil, "--seed"):find("2^53", 1, true))
    assert.are.equal(2 ^ 53 - 1, V.check(2 ^ 53 - 1, { type = "int", min = 0 }))
    assert.truthy(err_of(V.check, 2, { type = "number", min = 0, max = 1 }, nil, "--top-p"):find("in 0..1", 1, true))
    assert.truthy(err_of(V.check, 0, { type = "number", gt = 0 }, nil, "x"):find("positive", 1, true))
    assert.truthy(err_of(V.check, -1, { type = "int", min = 0 }, nil, "x"):find("an integer at least 0", 1, true))
    assert.truthy(err_of(V.check, "3", { type = "int" }, nil, "x"):find('got "3"', 1, true))
  end)

  it("enums list the allowed values", function()
    local e = err_of(V.check, "foo", { type = "string", enum = { "decode", "prefill" } }, nil, "--pp-balance")
    assert.are.equal([[--pp-balance must be one of decode, prefill (got "foo")]], e)
    assert.are.equal("prefill", V.check("prefill", { enum = { "decode", "prefill" } }))
  end)

  it("lists and int_or_list (eos_token_id)", function()
    local spec = { int_or_list = true, min = 0 }
    assert.are.equal(2, V.check(2, spec))
    assert.are.same({ 1, 2 }, V.check({ 1, 2 }, spec))
    assert.truthy(err_of(V.field, { eos_token_id = "two" }, "eos_token_id", spec, where)
      :find("field 'eos_token_id' must be an integer or a list of integers", 1, true))
    assert.truthy(err_of(V.check, { 1, "x" }, spec, where, "eos"):find("element 2", 1, true))
    assert.truthy(err_of(V.check, {}, spec, where, "eos"))
    local l = { type = "list", elem = { type = "int", min = 0 } }
    assert.are.same({ 0, 3 }, V.check({ 0, 3 }, l))
    assert.truthy(err_of(V.check, { 0, -1 }, l, where, "ids"):find("element 2", 1, true))
    assert.truthy(err_of(V.check, { a = 1 }, l, where, "ids"):find("must be a list", 1, true))
    -- a JSON null among the elements is named, not passed on (console eval: "tasks": ["arc_easy", null])
    local names = require("cjson").decode('["arc_easy", null]')
    local e = err_of(V.check, names, { type = "list", elem = { type = "string", min = 1 } }, nil, "field 'tasks'")
    assert.truthy(e and e:find("element 2: element is required", 1, true), e)
    assert.truthy(err_of(V.check, "x", { type = "table" }, where, "rope_scaling"):find("an object", 1, true))
  end)

  it("a value that is not a table where fields are read", function()
    assert.truthy(err_of(V.field, "x", "k", { type = "int" }, where):find("expected an object", 1, true))
  end)

  it("shows long strings cut and control characters escaped", function()
    local e = err_of(V.check, string.rep("a", 100) .. "\n", { type = "int" }, nil, "x")
    assert.truthy(#e < 120, e)
    assert.falsy(e:find("\n", 1, true))
  end)

  it("pp_layers: contiguous ranges from 0", function()
    assert.are.same({ { 0, 2 }, { 3, 4 } }, V.pp_layers("0-2,3-4"))
    for _, bad in ipairs { "garbage", "", "0-2,4-5", "1-2", "3-1", "0-2,", "0-2;3-4", "-1-2" } do
      assert.is_nil(V.pp_layers(bad), bad)
    end
  end)

  it("device names", function()
    assert.truthy(V.device("cpu") and V.device("cuda") and V.device("cuda:3"))
    assert.is_nil(V.device("gpu"))
    assert.is_nil(V.device("cuda:x"))
  end)

  it("UTF-8: the first bad byte", function()
    assert.is_true(V.utf8("héllo, 世界 🙂"))
    assert.are.same({ nil, 3 }, { V.utf8("ab\255") })
    assert.are.same({ nil, 2 }, { V.utf8("a\192\128") }) -- overlong
    assert.are.same({ nil, 1 }, { V.utf8("\237\160\128") }) -- a surrogate
    assert.are.same({ nil, 2 }, { V.utf8("a\226\130") }) -- cut short
  end)

  it("input paths: FIFOs and symlink loops refused, missing paths left to the loader", function()
    local h = require "helpers"
    local dir = h.tmpdir()
    os.execute("mkfifo " .. h.q(dir .. "/f") .. " && ln -s " .. h.q(dir .. "/l1") .. " " .. h.q(dir .. "/l2")
      .. " && ln -s " .. h.q(dir .. "/l2") .. " " .. h.q(dir .. "/l1"))
    local ok, e = V.input_path(dir .. "/f", "model")
    assert.is_nil(ok)
    assert.truthy(e:find("FIFO", 1, true), e)
    ok, e = V.input_path(dir .. "/l1")
    assert.is_nil(ok)
    assert.truthy(e:find("symbolic links", 1, true), e)
    assert.are.equal(dir .. "/none", V.input_path(dir .. "/none"))
    assert.are.equal(dir, V.input_path(dir))
    h.rmdir(dir)
  end)
end)

describe("moonshard.args with validation", function()
  local args = require "moonshard.args"
  local spec = {
    usage = "moonshard thing [options]",
    { "t", "number", "temperature", default = 1, min = 0 },
    { "n", "int", "count", min = 0 },
    { "mode", "string", "mode", enum = { "a", "b" } },
  }
  it("refuses non-finite numbers and non-decimal forms", function()
    for _, raw in ipairs { "nan", "inf", "-inf", "0x10", "1e999", "", " " } do
      assert.is_nil((args.try_parse({ "--t", raw }, spec)), raw)
    end
    for _, raw in ipairs { "0x10", "1.5", "1e3", "9007199254740993" } do
      assert.is_nil((args.try_parse({ "--n", raw }, spec)), raw)
    end
    assert.are.equal(0.5, args.try_parse({ "--t", "0.5" }, spec).t)
    assert.are.equal(1e-3, args.try_parse({ "--t", "1e-3" }, spec).t)
    assert.are.equal(12, args.try_parse({ "--n", "12" }, spec).n)
  end)
  it("enums, and the usage lists them", function()
    local _, e = args.try_parse({ "--mode", "c" }, spec)
    assert.are.equal([[--mode must be one of a, b (got "c")]], e)
    assert.truthy(args.usage(spec):find("(a, b)", 1, true))
  end)
  it("--debug is understood by every command", function()
    local o = args.try_parse({ "--debug", "--n", "1" }, spec)
    assert.are.equal(1, o.n)
    require("moonshard.host").debug = nil
  end)
  it("the command name for messages", function()
    assert.are.equal("moonshard thing", args.command(spec))
  end)
end)
