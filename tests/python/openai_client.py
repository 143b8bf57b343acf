"""The real `openai` SDK against `moonshard serve` (run by tests/lua/serve_spec.lua).

    python3 tests/python/openai_client.py BASE_URL MODEL

Streams a chat answer, reads a completion with logprobs and one with echo (max_tokens 0: the
prompt's log-probabilities, as lm-evaluation-harness's local-completions asks), and prints one
JSON object of what it saw; exits 77 when the SDK is not installed.
"""
import json
import sys

try:
    import openai
except ImportError:
    sys.exit(77)

base, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=60)
out = {"version": openai.__version__}

# a chat answer, streamed, with usage in the last chunk
parts, finish, usage, roles, n_chunks = [], None, None, [], 0
stream = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=12,
    temperature=0, stream=True, stream_options={"include_usage": True})
for chunk in stream:
    n_chunks += 1
    if chunk.usage is not None:
        usage = chunk.usage.model_dump()
    for ch in chunk.choices:
        if ch.delta.role:
            roles.append(ch.delta.role)
        if ch.delta.content:
            parts.append(ch.delta.content)
        if ch.finish_reason:
            finish = ch.finish_reason
out["chat"] = {"text": "".join(parts), "finish": finish, "usage": usage, "roles": roles, "chunks": n_chunks}

# the same answer without streaming
r = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=12, temperature=0)
out["chat_whole"] = {"text": r.choices[0].message.content, "finish": r.choices[0].finish_reason,
                     "usage": r.usage.model_dump()}

# a completion with the top-3 log-probabilities of each token
r = client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0, logprobs=3)
lp = r.choices[0].logprobs
out["completion"] = {"text": r.choices[0].text, "tokens": lp.tokens, "token_logprobs": lp.token_logprobs,
                     "top_logprobs": lp.top_logprobs, "text_offset": lp.text_offset,
                     "usage": r.usage.model_dump()}

# echo with max_tokens 0: the prompt scored
r = client.completions.create(model=model, prompt="Once upon a time there was", max_tokens=0, echo=True,
                              logprobs=1, temperature=0)
lp = r.choices[0].logprobs
out["echo"] = {"text": r.choices[0].text, "tokens": lp.tokens, "token_logprobs": lp.token_logprobs,
               "text_offset": lp.text_offset}

# an invalid request: the SDK raises BadRequestError with the field
try:
    client.completions.create(model=model, prompt="x", max_tokens=-3)
    out["bad"] = None
except openai.BadRequestError as e:
    out["bad"] = {"status": e.status_code, "param": e.body.get("param") if isinstance(e.body, dict) else None}

print(json.dumps(out))
