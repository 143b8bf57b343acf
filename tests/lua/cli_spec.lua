local h = require "helpers"

describe("moonshard executable", function()
  it("--version", function()
    local out, _, code = h.run { "--version" }
    assert.are.equal(0, code)
    assert.truthy(out:match("^moonshard %d+%.%d+%.%d+\n$"), out)
  end)

  it("--help lists the commands in scripts/ with a summary each", function()
    local out, _, code = h.run { "--help" }
    assert.are.equal(0, code)
    assert.truthy(out:find("\n  generate%s+Generate text"), out)
    assert.truthy(out:find("\n  repl%s+Interactive Lua prompt"), out)
  end)

  it("runs -e chunks with arguments and reports errors in one line (a traceback with --debug)", function()
    local out, _, code = h.run { "-e", "print(select('#', ...), ...)", "a", "b" }
    assert.are.equal(0, code)
    assert.are.equal("2\ta\tb\n", out)
    local _, err, code2 = h.run { "-e", "error('boom')" }
    assert.are.equal(1, code2)
    assert.truthy(err:find("boom", 1, true) and not err:find("stack traceback", 1, true), err)
    local _, err3, code3 = h.run { "--debug", "-e", "error('boom')" }
    assert.are.equal(1, code3)
    assert.truthy(err3:find("boom", 1, true) and err3:find("stack traceback", 1, true), err3)
  end)

  it("runs a script file with arg and drives the luv loop to completion", function()
    local dir = h.tmpdir()
    h.write(dir .. "/s.lua", [[
      local uv = require "luv"
      local t = uv.new_timer()
      t:start(5, 0, function() print("fired", arg[1]) t:close() end)
      print("scheduled")
    ]])
    local out, err, code = h.run { dir .. "/s.lua", "x" }
    h.rmdir(dir)
    assert.are.equal(0, code, err)
    assert.are.equal("scheduled\nfired\tx\n", out)
  end)

  it("bench prints one JSON object whose prefill FLOPs count the head for the last token only", function()
    local out, err, code = h.run { "bench", "--model", h.stories, "--prompt-len", "16", "--gen-len", "3", "--loops",
      "1", "--warmup", "0" }
    assert.are.equal(0, code, err)
    local r = require("cjson").decode(out)
    assert.is_true(r.prefill_tok_s > 0 and r.decode_tok_s > 0)
    -- stories260K: 5 layers, 8 heads of 8 dims, a 512 x 64 head (tied to the embedding);
    -- params counts every matrix, the head included
    local T, head = 16, 512 * 64
    assert.are.equal(2 * (r.params - head) * T + 2 * head + 5 * 8 * 8 * 2 * T * T, r.prefill_flops)
  end)

  it("names an unknown command", function()
    local _, err, code = h.run { "frobnicate" }
    assert.are.equal(2, code)
    assert.truthy(err:find("unknown command 'frobnicate'", 1, true))
  end)
end)

describe("moonshard repl (piped)", function()
  it("prints values, continues multi-line input and survives errors (on stderr; exit 1 after them)", function()
    local input = table.concat({
      "x = 1 +", "  2", "x * 10",
      "error('oops')",
      "function f(a)", "  return a * 2", "end",
      "f(21), 's'",
      "moonshard.version == require('moonshard').version",
    }, "\n") .. "\n"
    local out, err, code = h.run({ "repl" }, input)
    assert.are.equal(1, code, err)
    local lines = {}
    for l in out:gmatch("[^\n]+") do lines[#lines + 1] = l end
    assert.are.equal("30", lines[1])
    assert.truthy(err:find("oops", 1, true))
    assert.truthy(err:find("stack traceback", 1, true))
    assert.truthy(out:find('\n42\t"s"\n', 1, true), out)
    assert.truthy(out:find("\ntrue\n", 1, true), out)
  end)
end)
