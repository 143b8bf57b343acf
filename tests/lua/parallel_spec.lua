-- Tensor and pipeline parallel runs on CPU ranks (TCP) give the single-rank results.
local h = require "helpers"

local golden = h.read(h.stories .. "/expected_greedy_200.txt") .. "\n"

describe("tensor and pipeline parallel (CPU ranks)", function()
  for _, case in ipairs {
    { 2, { "--tp", "2" } }, { 2, { "--pp", "2" } }, { 4, { "--tp", "2", "--pp", "2" } },
    { 2, { "--pp", "2", "--pp-layers", "0-0,1-4" } },
  } do
    local n, extra = case[1], case[2]
    it(string.format("launch -n %d generate %s prints the stories260K golden text", n, table.concat(extra, " ")), function()
      local args = { "launch", "-n", tostring(n), "generate", "--model", h.stories, "--max-tokens", "200",
        "--temperature", "0" }
      for _, a in ipairs(extra) do args[#args + 1] = a end
      local out, err, code = h.run(args)
      assert.are.equal(0, code, err)
      assert.are.equal(golden, out)
    end)
  end

  for _, case in ipairs { { "f32", 2, 1 }, { "f32", 1, 2 }, { "bf16", 2, 2 }, { "llama3", 1, 2 },
                           { "f32", 2, 1, "replicated" } } do
    local name, tp, pp, head = case[1], case[2], case[3], case[4]
    it(string.format("%s checkpoint, tp %d x pp %d%s: logits within 1e-4 of transformers", name, tp, pp,
      head and " (" .. head .. " head)" or ""), function()
      local diff = h.parallel_diff(name, tp, pp, head)
      assert.is_true(diff < 1e-4, "max |diff| " .. tostring(diff))
    end)
  end

  it("explains a model that does not split", function()
    local out, err, code = h.run { "launch", "-n", "3", "generate", "--model", h.stories, "--max-tokens", "4",
      "--tp", "3" }
    assert.are_not.equal(0, code)
    assert.truthy(err:find("8 attention heads do not split over 3", 1, true), err)
  end)
end)
