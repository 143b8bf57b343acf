-- `moonshard bench-serve --long-prompts`: the chunked-prefill effect on the engine in process
-- (stories260K). Long prompts arrive while short requests decode, with chunked prefill on and off;
-- the report's shape, and what chunking changes, counted in tokens per step (wall time on a
-- shared 2-core machine is too noisy for a test): with chunking no step exceeds the budget, so a
-- running decode never waits for more than --max-tokens-per-step tokens; without it a long prompt
-- is computed whole in a step that also carries the decodes.
local h = require "helpers"
local cjson = require "cjson"

local function bench(extra)
  local args = { "bench-serve", "--model", h.stories, "--num-requests", "4", "--input-len", "8", "--output-len", "64",
    "--long-prompts", "2", "--long-len", "400", "--max-tokens-per-step", "64", "--max-batch", "8" }
  for _, a in ipairs(extra or {}) do args[#args + 1] = a end
  local out, err, code = h.run(args)
  assert.are.equal(0, code, err)
  return cjson.decode(out)
end

local function percentiles(p, what)
  for _, k in ipairs { "p50", "p90", "p99", "max", "mean" } do
    assert.is_number(p[k], what .. "." .. k)
  end
  assert.is_true(p.p50 <= p.p90 and p.p90 <= p.p99 and p.p99 <= p.max, what)
  assert.is_true(p.n > 0, what .. ".n")
end

describe("moonshard bench-serve --long-prompts", function()
  local on, off
  setup(function()
    on = bench()
    off = bench { "--no-chunked-prefill" }
  end)

  it("reports the long prompts' TTFT and the decodes' inter-token latency meanwhile, as JSON", function()
    for _, r in ipairs { on, off } do
      assert.are.equal(6, r.requests)
      assert.are.equal(6, r.completed)
      assert.are.equal(0, r.failed)
      assert.are.equal(4 * 64 + 2 * 4, r.output_tokens) -- every request its full length (ignore_eos)
      assert.are.equal(4 * 8 + 2 * 400, r.prompt_tokens)
      percentiles(r.ttft_ms, "ttft_ms")
      percentiles(r.itl_ms, "itl_ms")
      assert.are.equal(2, r.long.prompts)
      assert.are.equal(400, r.long.len)
      percentiles(r.long.ttft_ms, "long.ttft_ms")
      assert.are.equal(2, r.long.ttft_ms.n)
      -- decodes were running while the long prompts were computed
      percentiles(r.long.decode_itl_ms, "long.decode_itl_ms")
      assert.is_true(r.long.decode_itl_ms.max <= r.itl_ms.max)
      -- every prompt token computed once (random ids: no prefix shared)
      assert.are.equal(r.prompt_tokens, r.steps.prefill_tokens)
      assert.is_true(r.steps.count >= 64)
    end
    assert.is_true(on.chunked_prefill)
    assert.is_false(off.chunked_prefill)
  end)

  it("bounds a step by the budget with chunking; without, a long prompt shares a step with the decodes", function()
    assert.are.equal(64, on.max_tokens_per_step)
    assert.is_true(on.steps.max_tokens <= 64, on.steps.max_tokens)
    assert.are.equal(64, on.steps.max_tokens_with_decodes) -- chunks fill the budget beside the decodes
    -- the budget grows to the longest prompt plus a full batch of decodes
    assert.are.equal(408, off.max_tokens_per_step)
    assert.is_true(off.steps.max_tokens_with_decodes >= 401, off.steps.max_tokens_with_decodes)
    assert.is_true(on.steps.max_tokens_with_decodes < off.steps.max_tokens_with_decodes)
    -- a long prompt took several steps with chunking, one without: more of the decodes' tokens
    -- came while one waited for its first token
    assert.is_true(on.long.decode_itl_ms.n > off.long.decode_itl_ms.n)
  end)

  it("warns when the batch has no slot for the long prompts beside the other requests", function()
    local out, err, code = h.run { "bench-serve", "--model", h.stories, "--num-requests", "3", "--input-len", "8",
      "--output-len", "16", "--long-prompts", "2", "--long-len", "100", "--max-batch", "4" }
    assert.are.equal(0, code, err)
    assert.truthy(err:find("--max-batch 4 holds the 3 requests but not the 2 long prompts beside them", 1, true), err)
    assert.truthy(err:find("(--max-batch 5 measures chunked prefill)", 1, true), err)
    assert.are.equal(2, cjson.decode(out).long.prompts)
    _, err = h.run { "bench-serve", "--model", h.stories, "--num-requests", "3", "--input-len", "8",
      "--output-len", "16", "--long-prompts", "2", "--long-len", "100", "--max-batch", "5" }
    assert.falsy(err:find("warning", 1, true), err)
  end)

  it("refuses a long prompt the context cannot hold, and --no-chunked-prefill against a server", function()
    local _, err, code = h.run { "bench-serve", "--model", h.stories, "--num-requests", "1", "--long-prompts", "1",
      "--long-len", "600" }
    assert.are.equal(1, code)
    assert.truthy(err:find("--long-len 600 with --long-output-len 4 exceeds the context of 512 tokens", 1, true), err)
    _, err, code = h.run { "bench-serve", "--url", "http://127.0.0.1:9", "--no-chunked-prefill" }
    assert.are.equal(1, code)
    assert.truthy(err:find("--no-chunked-prefill applies to the engine in this process (--model)", 1, true), err)
  end)
end)

describe("moonshard bench-serve --dummy", function()
  it("serves random weights of a config.json's shape in process, every request its full length", function()
    local out, err, code = h.run { "bench-serve", "--dummy", h.root .. "/tests/fixtures/arch/qwen2/config.json",
      "--num-requests", "6", "--input-len", "12", "--output-len", "5", "--max-batch", "4" }
    assert.are.equal(0, code, err)
    local r = cjson.decode(out)
    assert.are.equal(6, r.completed)
    assert.are.equal(6 * 5, r.output_tokens)
    assert.are.equal(6 * 12, r.steps.prefill_tokens)
    assert.is_nil(r.floor_output_tok_s) -- no ceilings measured on the CPU
  end)

  it("takes one target", function()
    local _, err, code = h.run { "bench-serve", "--model", h.stories, "--dummy",
      h.root .. "/tests/fixtures/arch/qwen2/config.json" }
    assert.are.equal(1, code)
    assert.truthy(err:find("give --model, --dummy or --url (one of them)", 1, true), err)
  end)
end)
