"""The public clients against a local sgl grid: the singularity-grid SDK
(sealed, non-stream and stream) and the OpenAI SDK (plain mode, non-stream
and stream). Prints one JSON line per call; exits non-zero on any failure.

usage: grid_sdk_check.py BASE_URL MODEL [API_KEY [MAX_TOKENS]]

With API_KEY every call is paid from that key's credits: the SDK sends it as
a bearer token and X-API-Key, the OpenAI SDK as a bearer token. Without it
the calls are anonymous (a development coordinator serves them free).
"""
import json
import sys

base, model = sys.argv[1], sys.argv[2]
api_key = sys.argv[3] if len(sys.argv) > 3 and sys.argv[3] else None
max_tokens = int(sys.argv[4]) if len(sys.argv) > 4 else 48
question = [{"role": "user", "content": "What is the capital of France?"}]
results = {}

from singularity_grid import GridClient  # noqa: E402

with GridClient(api_key=api_key, base_url=base) as grid:
    r = grid.chat_completions(model, question, temperature=0.0, max_tokens=max_tokens)
    results["sgl_sdk_chat_completions"] = r["choices"][0]["message"]["content"]
    results["sgl_sdk_chat_completion_stream"] = "".join(
        grid.chat_completion_stream(model, question, temperature=0.0, max_tokens=max_tokens)
    )

from openai import OpenAI  # noqa: E402

oa = OpenAI(base_url=base + "/v1", api_key=api_key or "sgl-anonymous")
r = oa.chat.completions.create(
    model=model, messages=question, temperature=0, max_tokens=max_tokens
)
results["openai_plain"] = r.choices[0].message.content
assert r.usage is not None and r.usage.completion_tokens > 0, "usage is reported"
stream = oa.chat.completions.create(
    model=model, messages=question, temperature=0, max_tokens=max_tokens, stream=True,
    stream_options={"include_usage": True},
)
parts, usage = [], None
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        parts.append(chunk.choices[0].delta.content)
    if chunk.usage is not None:
        usage = chunk.usage
results["openai_plain_stream"] = "".join(parts)
assert usage is not None, "the stream ends with usage"

failed = False
for name, text in results.items():
    ok = "paris" in text.lower()
    failed |= not ok
    print(json.dumps({"call": name, "ok": ok, "text": text}))
sys.exit(1 if failed else 0)
