local args = require "moonshard.args"

local spec = {
  { "model", "string", "model", required = true },
  { "max-tokens", "int", "n", default = 4, min = 0 },
  { "temperature", "number", "t", default = 1.0, min = 0 },
  { "verbose", "flag", "v" },
}

describe("moonshard.args", function()
  it("parses --name value and --name=value, with defaults", function()
    local o = assert(args.try_parse({ "--model", "m", "--temperature=0.5" }, spec))
    assert.are.equal("m", o.model)
    assert.are.equal(0.5, o.temperature)
    assert.are.equal(4, o.max_tokens)
    assert.is_nil(o.verbose)
  end)

  it("names the problem with a bad option", function()
    local o, err = args.try_parse({ "--model", "m", "--max-tokens", "2.5" }, spec)
    assert.is_nil(o)
    assert.truthy(err:find("--max-tokens expects an integer", 1, true))
    o, err = args.try_parse({ "--modle", "m" }, spec)
    assert.are.equal("unknown option --modle", err)
    o, err = args.try_parse({}, spec)
    assert.are.equal("--model is required", err)
    o, err = args.try_parse({ "--model" }, spec)
    assert.are.equal("--model needs a value", err)
    o, err = args.try_parse({ "--model", "m", "--temperature", "-1" }, spec)
    assert.truthy(err:find("at least 0", 1, true))
  end)

  it("renders a usage with every option", function()
    local u = args.usage(spec)
    assert.truthy(u:find("--max-tokens N", 1, true))
    assert.truthy(u:find("(default 4)", 1, true))
  end)
end)
