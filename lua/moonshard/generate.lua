-- moonshard.generate: text generation for one sequence: prefill the prompt, then sample and
-- decode token by token, handing each piece of text to a callback as soon as it is complete.
local uv = require "luv"
local sampler_mod = require "moonshard.sampler"
local tensor = require "moonshard.tensor"

local M = {}

-- M.run(model, opts, on_text) -> stats | nil, message
--   model: from moonshard.load (net + tokenizer)
--   opts: prompt (""), max_tokens (256), temperature (1), top_k (0), top_p (1), seed (0)
--   on_text(s): receives the generated text piece by piece (whole UTF-8 characters)
function M.run(model, opts, on_text)
  local tok, net = model.tokenizer, model.net
  if not tok then return nil, string.format("'%s': no tokenizer found beside the model", model.path) end
  -- BOS in front only for models that want it (byte-level BPE models mostly do not)
  local ids = tok:encode(opts.prompt or "", tok.add_bos ~= false)
  if #ids == 0 then ids = { tok.bos or tok.eos } end
  if #ids >= net.max_seq then
    return nil, string.format("the prompt is %d tokens long, more than the context of %d tokens leaves room for",
      #ids, net.max_seq)
  end
  local sampler = sampler_mod.new {
    seed = opts.seed or 0, temperature = opts.temperature or 1, top_k = opts.top_k or 0, top_p = opts.top_p or 1,
  }
  local stop = {}
  for _, id in ipairs(model.desc.stop or { tok.eos }) do stop[id] = true end
  local max_tokens = opts.max_tokens or 256

  net:reset()
  local t0 = uv.hrtime()
  local logits, err = net:forward(ids, 0)
  if not logits then return nil, err end
  local t1 = uv.hrtime()
  local dec = tok:decoder(ids[#ids])
  local generated, reason = 0, "length"
  -- the sampler reads host memory: logits computed on a device come back through one buffer
  local host = net.device ~= "cpu" and assert(tensor.new({ 1, net.vocab_size }, "f32", "cpu"))
  local n_pieces = tok.vocab_size
  while generated < max_tokens do
    if host then logits = host:copy_from(logits) end
    local ok, lerr = sampler_mod.check_logits(logits, net.pos - 1)
    if not ok then return nil, lerr end
    local id = sampler:sample(logits)
    if n_pieces and id >= n_pieces then
      return nil, string.format("position %d: the model picked token id %d, which the tokenizer (%d pieces) does not "
        .. "have: the tokenizer is smaller than the model's vocabulary of %d", net.pos, id, n_pieces, net.vocab_size)
    end
    if stop[id] then reason = "stop" break end
    generated = generated + 1
    local text = dec:push(id)
    if text ~= "" then on_text(text) end
    if generated == max_tokens then break end
    if net.pos >= net.max_seq then reason = "context" break end
    logits = assert(net:forward(id))
  end
  local rest = dec:flush()
  if rest ~= "" then on_text(rest) end
  local t2 = uv.hrtime()
  local decode_s = (t2 - t1) / 1e9
  return {
    prompt_tokens = #ids, generated_tokens = generated, finish_reason = reason,
    prefill_s = (t1 - t0) / 1e9, decode_s = decode_s,
    prefill_tok_s = #ids / math.max((t1 - t0) / 1e9, 1e-9),
    decode_tok_s = generated / math.max(decode_s, 1e-9),
  }
end

return M
