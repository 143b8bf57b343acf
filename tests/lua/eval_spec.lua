-- moonshard.eval and `moonshard eval`: every task file against hand-checked fixtures (prompt
-- text, targets, metrics on a fake model's known log-probabilities), bad input, the same picks on
-- one process and on two ranks (tensor and pipeline parallel), and the independent NumPy check.
local h = require "helpers"
local eval = require "moonshard.eval"

local FIX = h.root .. "/tests/fixtures/eval"

-- A tokenizer of one token per byte (BOS 1000, EOS 1001).
local function byte_tokenizer()
  local tok = { bos = 1000, eos = 1001 }
  function tok:encode(s)
    local ids = {}
    for i = 1, #s do ids[i] = s:byte(i) end
    return ids
  end
  return tok
end

-- A fake model: one token per byte; a continuation's log-probability is known[text] (else -10),
-- spread evenly over its tokens; greedy when the table says so. Generation returns canned text.
local function fake(known, greedy, generated)
  local tok = byte_tokenizer()
  function tok:decode(ids)
    local t = {}
    for i, id in ipairs(ids) do t[i] = id < 256 and string.char(id) or "" end
    return table.concat(t)
  end
  local lm = { tokenizer = tok, max_length = 4096, seen = {} }
  function lm.score_batch(reqs)
    local out = {}
    for i, r in ipairs(reqs) do
      local cont = {}
      for k = r.first + 1, #r.ids do cont[#cont + 1] = r.ids[k] end
      local text = tok:decode(cont)
      lm.seen[#lm.seen + 1] = { context = tok:decode({ unpack(r.ids, 1, r.first) }), continuation = text }
      local total = known[text] or -10
      local lp, g = {}, {}
      for k = 1, #cont do lp[k], g[k] = total / #cont, greedy and greedy[text] or false end
      out[i] = { logprobs = lp, greedy = g, sum = total, is_greedy = greedy and greedy[text] or false }
    end
    return out
  end
  function lm.generate(context, stops)
    lm.seen[#lm.seen + 1] = { context = context, stops = stops }
    return table.remove(generated, 1), 10
  end
  return lm
end

local function task_on(name, file)
  local t = assert(eval.load_task(name))
  local docs = assert(eval.docs(t, { data = { [name] = FIX .. "/" .. file } }))
  return t, docs
end

describe("eval task files", function()
  it("arc_easy / arc_challenge: harness prompt, choices after a space, acc and acc_norm", function()
    for _, name in ipairs { "arc_easy", "arc_challenge" } do
      local t, docs = task_on(name, "arc.jsonl")
      assert.equal("Question: Which is hot?\nAnswer:", t.doc_to_text(docs[1]))
      -- doc 1: " the sun" (gold) -4 over 8 chars beats " ice" -3 over 3 only after normalization
      -- doc 2: " red" -2 (gold) is the best either way
      local lm = fake { [" ice"] = -3, [" the sun"] = -4, [" red"] = -2, [" dog"] = -5, [" stone"] = -6 }
      local r = eval.run_task(lm, t, docs, { quiet = true, batch_size = 2 })
      assert.equal(0.5, r.metrics["acc,none"].value)
      assert.equal(1, r.metrics["acc_norm,none"].value)
      assert.equal(0.5, r.metrics["acc_norm,none"].value == 1 and 0.5 or 0)
      assert.near(0.5, r.metrics["acc,none"].stderr, 1e-12) -- sqrt(0.5 / 1) / sqrt(2)
      assert.equal(5, #lm.seen)
      local contexts = {}
      for _, seen in ipairs(lm.seen) do contexts[seen.context] = (contexts[seen.context] or 0) + 1 end
      assert.equal(2, contexts["Question: Which is hot?\nAnswer:"]) -- no BOS unless --add-bos
      assert.equal(3, contexts["Question: Which is a color?\nAnswer:"])
    end
  end)

  it("piqa: Question: goal, Answer:", function()
    local t, docs = task_on("piqa", "piqa.jsonl")
    assert.equal("Question: open a jar\nAnswer:", t.doc_to_text(docs[1]))
    local r = eval.run_task(fake { [" twist the lid"] = -1, [" hit it"] = -2 }, t, docs, { quiet = true })
    assert.equal(1, r.metrics["acc,none"].value)
  end)

  it("boolq: passage, question, no / yes; acc only", function()
    local t, docs = task_on("boolq", "boolq.jsonl")
    assert.equal("Cats are mammals.\nQuestion: is a cat a mammal?\nAnswer:", t.doc_to_text(docs[1]))
    assert.same({ "no", "yes" }, t.doc_to_choice(docs[1]))
    local r = eval.run_task(fake { [" no"] = -3, [" yes"] = -1 }, t, docs, { quiet = true })
    assert.equal(1, r.metrics["acc,none"].value)
    assert.is_nil(r.metrics["acc_norm,none"])
  end)

  it("copa: the connector context, choices with a lowercased first letter", function()
    local t, docs = task_on("copa", "copa.jsonl")
    assert.equal("The man turned on the faucet, therefore", t.doc_to_text(docs[1]))
    assert.same({ "the toilet filled with water.", "water flowed from the spout." }, t.doc_to_choice(docs[1]))
    local r = eval.run_task(fake { [" the toilet filled with water."] = -5, [" water flowed from the spout."] = -4 },
      t, docs, { quiet = true })
    assert.equal(1, r.metrics["acc,none"].value)
  end)

  it("openbookqa: the stem alone", function()
    local t, docs = task_on("openbookqa", "arc.jsonl")
    assert.equal("Question: Which is hot?", t.doc_to_text(docs[1]))
  end)

  it("winogrande: the continuation scored after each option's context", function()
    local t, docs = task_on("winogrande", "winogrande.jsonl")
    local lm = fake { [" got the easier cases."] = -2 }
    local r = eval.run_task(lm, t, docs, { quiet = true })
    assert.equal(2, #lm.seen)
    assert.equal("Sarah was better than Maria so Sarah", lm.seen[1].context)
    assert.equal("Sarah was better than Maria so Maria", lm.seen[2].context)
    assert.equal(" got the easier cases.", lm.seen[2].continuation)
    assert.equal(0, r.metrics["acc,none"].value) -- equal scores: the first option, not gold 1
  end)

  it("lambada_openai: the last word after a space; perplexity and acc", function()
    local t, docs = task_on("lambada_openai", "lambada.jsonl")
    assert.equal("She opened the door and saw the", t.doc_to_text(docs[1]))
    assert.equal(" cat", t.doc_to_target(docs[1]))
    local r = eval.run_task(fake({ [" cat"] = -2 }, { [" cat"] = true }), t, docs, { quiet = true })
    assert.near(math.exp(2), r.metrics["perplexity,none"].value, 1e-9)
    assert.equal(1, r.metrics["acc,none"].value)
  end)

  it("gsm8k: few-shot examples with full answers, stop strings, both filters", function()
    local t, docs = task_on("gsm8k", "gsm8k.jsonl")
    assert.equal("Question: What is 2 plus 3?\nAnswer:", t.doc_to_text(docs[1]))
    local lm = fake({}, nil, { " 2 + 3 = 5\n#### 5", " It is 1,000 dollars." })
    local r = eval.run_task(lm, t, docs, { quiet = true, num_fewshot = 1 })
    -- doc 1's one example is doc 2 (never itself)
    assert.equal("Question: What is 10 times 100?\nAnswer: 10 * 100 = 1000\n#### 1,000\n\nQuestion: What is 2 plus 3?\nAnswer:",
      lm.seen[1].context)
    assert.same({ "Question:", "</s>", "<|im_end|>" }, lm.seen[1].stops)
    assert.equal(0.5, r.metrics["exact_match,strict-match"].value) -- doc 2 has no "#### "
    assert.equal(1, r.metrics["exact_match,flexible-extract"].value) -- "1,000" -> "1000"
  end)

  it("wikitext: articles, detokenized; word and byte counts of the raw page", function()
    local t, docs = task_on("wikitext", "wikitext.txt")
    assert.equal(2, #docs)
    assert.equal(" = Alpha = \n The alpha , a test @-@ page .\n", docs[1].page)
    assert.equal(" = Alpha =\nThe alpha, a test-page .\n", t.doc_to_target(docs[1]))
    local words, bytes = t.count(docs[1])
    assert.equal(13, words) -- re.split(r"\s+") of a page that starts and ends with whitespace
    assert.equal(#docs[1].page, bytes)
    local lm = fake {}
    local r = eval.run_task(lm, t, docs, { quiet = true })
    local w2, b2 = t.count(docs[2])
    -- each page is one window scored as a whole: -10 each
    assert.near(math.exp(20 / (words + w2)), r.metrics["word_perplexity,none"].value, 1e-9)
    assert.near(20 / (bytes + b2) / math.log(2), r.metrics["bits_per_byte,none"].value, 1e-12)
  end)

  it("rolling windows score every token once with the harness's contexts", function()
    local rr = eval.rolling_requests({ 10, 11, 12, 13, 14 }, 1, 2)
    assert.same({ { ids = { 1, 10, 11 }, first = 1 }, { ids = { 11, 12, 13 }, first = 1 },
      { ids = { 12, 13, 14 }, first = 2 } }, rr)
  end)

  it("generation_ids: BOS when asked or for an empty context, the oldest tokens cut, one kept at least", function()
    local tok = byte_tokenizer()
    assert.are.same({ 97, 98, 99 }, eval.generation_ids(tok, "abc", 4, 16))
    assert.are.same({ 1000, 97, 98, 99 }, eval.generation_ids(tok, "abc", 4, 16, { add_bos = true }))
    assert.are.same({ 1000 }, eval.generation_ids(tok, "", 4, 16))
    assert.are.same({ 99, 100 }, eval.generation_ids(tok, "abcd", 6, 8)) -- 2 + 6 new fit in 8
    assert.are.same({ 100 }, eval.generation_ids(tok, "abcd", 8, 8)) -- no room: the last token alone
  end)

  it("encode_pair moves the context's trailing space to the continuation", function()
    local tok = fake({}).tokenizer
    local ctx, cont = eval.encode_pair(tok, "Answer: ", "yes")
    assert.equal("Answer:", tok:decode(ctx):sub(1))
    assert.equal(" yes", tok:decode(cont))
  end)
end)

describe("moonshard eval errors", function()
  it("an unknown task is named with the known ones", function()
    local _, err, code = h.run { "eval", "--model", h.stories, "--tasks", "arc_easy,nope" }
    assert.equal(1, code)
    assert.truthy(err:find("unknown task 'nope'", 1, true), err)
    assert.truthy(err:find("arc_easy", 1, true))
  end)
  it("a missing data file is named", function()
    local _, err, code = h.run { "eval", "--model", h.stories, "--tasks", "piqa", "--data", "piqa=/nonexistent/p.jsonl" }
    assert.equal(1, code)
    assert.truthy(err:find("/nonexistent/p.jsonl", 1, true), err)
  end)
  it("a malformed JSONL line is named by file:line", function()
    local _, err, code = h.run { "eval", "--model", h.stories, "--tasks", "arc_easy", "--data",
      "arc_easy=" .. FIX .. "/malformed.jsonl" }
    assert.equal(1, code)
    assert.truthy(err:find("malformed.jsonl:2:", 1, true), err)
  end)
  it("a record of the wrong shape is named by file:line", function()
    local _, err, code = h.run { "eval", "--model", h.stories, "--tasks", "winogrande", "--data",
      "winogrande=" .. FIX .. "/arc.jsonl" }
    assert.equal(1, code)
    assert.truthy(err:find("arc.jsonl:1: a winogrande record", 1, true), err)
  end)
end)

describe("moonshard eval on stories260K", function()
  local function picks(json)
    local res = require("cjson").decode(json)
    local out = {}
    for _, s in ipairs(res.samples.arc_easy) do out[#out + 1] = s.pick end
    return out, res
  end
  local dir = h.tmpdir()
  local base = { "--model", h.stories, "--tasks", "arc_easy", "--limit", "12", "--log-samples" }
  local function run(pre, extra, name)
    local args = {}
    for _, a in ipairs(pre) do args[#args + 1] = a end
    args[#args + 1] = "eval"
    for _, a in ipairs(base) do args[#args + 1] = a end
    for _, a in ipairs(extra) do args[#args + 1] = a end
    args[#args + 1] = "--output"
    args[#args + 1] = dir .. "/" .. name .. ".json"
    local out, err, code = h.run(args)
    assert.equal(0, code, err)
    return out, h.read(dir .. "/" .. name .. ".json")
  end

  it("writes the harness's JSON and table; batch size changes nothing", function()
    local out, json = run({}, { "--batch-size", "1" }, "b1")
    assert.truthy(out:find("|arc_easy      |", 1, true), out)
    local p1, res = picks(json)
    assert.equal(12, res["n-samples"].arc_easy.effective)
    assert.equal(2376, res["n-samples"].arc_easy.original)
    assert.is_number(res.results.arc_easy["acc,none"])
    assert.is_number(res.results.arc_easy["acc_stderr,none"])
    assert.equal(0, res["n-shot"].arc_easy)
    assert.equal(1, res.versions.arc_easy)
    assert.equal("cpu", res.config.placement.device)
    local _, json8 = run({}, { "--batch-size", "8" }, "b8")
    local p8, res8 = picks(json8)
    assert.same(p1, p8)
    for i, s in ipairs(res.samples.arc_easy) do
      for c, ll in ipairs(s.loglikelihoods) do assert.near(ll, res8.samples.arc_easy[i].loglikelihoods[c], 1e-4) end
    end
  end)

  it("generate_until: documents generated side by side (--gen-batch) give each the text it gets alone", function()
    local data = dir .. "/gsm8k.jsonl"
    local f = assert(io.open(data, "w"))
    local qs = { "Tom has 3 cats. How many?", "A dog ran to the park. Where?", "Lily saw a big tree.",
      "What is 7 and 8?", "The sun was hot and the girl", "Once upon a time", "Ben lost his ball." }
    for i, q in ipairs(qs) do f:write(string.format('{"question": "%s", "answer": "%d\\n#### %d"}\n', q, i, i)) end
    f:close()
    local function gen(pre, extra, name)
      local args = {}
      for _, a in ipairs(pre) do args[#args + 1] = a end
      for _, a in ipairs { "eval", "--model", h.stories, "--tasks", "gsm8k", "--data", "gsm8k=" .. data,
        "--num-fewshot", "1", "--log-samples", "--output", dir .. "/" .. name .. ".json" } do args[#args + 1] = a end
      for _, a in ipairs(extra) do args[#args + 1] = a end
      local _, err, code = h.run(args)
      assert.equal(0, code, err)
      local res = require("cjson").decode(h.read(dir .. "/" .. name .. ".json"))
      local out = {}
      for _, s in ipairs(res.samples.gsm8k) do out[#out + 1] = s.generated end
      return out
    end
    local one = gen({}, {}, "g1")
    assert.equal(#qs, #one)
    local some = 0
    for _, t in ipairs(one) do if #t > 0 then some = some + 1 end end
    assert.is_true(some > 0, "every generation empty")
    assert.same(one, gen({}, { "--gen-batch", "4" }, "g4"))
    -- the default, and two pipeline ranks, generate one document at a time (the loop without the
    -- engine)
    assert.same(one, gen({ "launch", "-n", "2" }, { "--pp", "2" }, "gpp"))
  end)

  it("gives the same picks on two ranks, tensor parallel and pipeline parallel", function()
    local _, json = run({}, {}, "one")
    local p1, r1 = picks(json)
    for _, topo in ipairs { { "--tp", "2" }, { "--pp", "2" } } do
      local _, jt = run({ "launch", "-n", "2" }, topo, "t" .. topo[1])
      local pt, rt = picks(jt)
      if topo[1] == "--pp" then
        assert.same(p1, pt) -- the same arithmetic, split over two processes
      else
        local a, b = r1.results.arc_easy["acc,none"], rt.results.arc_easy["acc,none"]
        assert.is_true(math.abs(a - b) <= 0.001, string.format("acc %g on one rank, %g with --tp 2", a, b))
      end
      assert.equal(2, rt.config.placement.world)
    end
  end)
end)

describe("eval against the independent NumPy reference", function()
  local smol = h.root .. "/.cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  local have = io.open(smol, "rb")
  if have then have:close() end
  local _, py = h.sh("python3 -c 'import numpy, gguf' 2>/dev/null")
  if not have or py ~= 0 then
    pending("SmolLM2 GGUF or python3 numpy/gguf missing")
    return
  end
  it("SmolLM2 (--dtype f32): each item's summed log-probabilities and choice to 1e-3 (first 2 ARC-Easy and PIQA items)", function()
    local out, code = h.sh(string.format("cd %s && python3 tools/eval_reference.py --model %s --exe %s --limit 2 2>&1",
      h.q(h.root), h.q(smol), h.q(h.exe)))
    assert.equal(0, code, out)
    assert.truthy(out:find("all agree", 1, true), out)
  end)
end)
