"""Drive `sgl proxy` with the official OpenAI Python SDK, unmodified: the
proxy seals each request end to end to a node of the grid behind it.

Usage: openai_proxy_check.py PROXY_BASE_URL MODEL PROMPT EVIDENCE_FORMAT
The node runs the echo engine, so the answer is the prompt. Prints one JSON
line: the job ids and the answers, for the caller to look for elsewhere.
Exits non-zero (with an assertion message) when anything is off.
"""
import json
import sys

import openai
from openai import OpenAI


def main() -> None:
    base, model, prompt, evidence = sys.argv[1:5]
    # The proxy holds the grid credentials; the key here is not used.
    client = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)

    models = [m.id for m in client.models.list()]
    assert model in models, models

    messages = [
        {"role": "system", "content": "Repeat after me."},
        {"role": "user", "content": prompt},
    ]
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=messages, temperature=0, max_tokens=64
    )
    # The proxy verified the node's evidence before sealing to it.
    assert raw.headers.get("x-sgl-evidence") == evidence, dict(raw.headers)
    r = raw.parse()
    text = r.choices[0].message.content
    assert text == prompt, (text, prompt)
    assert r.object == "chat.completion", r.object
    assert r.choices[0].finish_reason == "stop", r.choices[0].finish_reason
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    job = raw.headers["x-sgl-job-id"]
    assert r.id == "chatcmpl-" + job, (r.id, job)

    with client.chat.completions.with_streaming_response.create(
        model=model,
        messages=messages,
        temperature=0,
        max_tokens=64,
        stream=True,
        stream_options={"include_usage": True},
    ) as resp:
        assert resp.headers.get("x-sgl-evidence") == evidence, dict(resp.headers)
        assert resp.headers["content-type"].startswith("text/event-stream")
        stream_job = resp.headers["x-sgl-job-id"]
        parts, finish, usage, ids = [], None, None, set()
        for chunk in resp.parse():
            ids.add(chunk.id)
            assert chunk.object == "chat.completion.chunk", chunk
            if chunk.usage is not None:
                usage = chunk.usage
            for c in chunk.choices:
                if c.delta.content:
                    parts.append(c.delta.content)
                if c.finish_reason:
                    finish = c.finish_reason
    streamed = "".join(parts)
    assert streamed == prompt, (streamed, prompt)
    # The echo engine answers word by word: the text came in pieces.
    assert len(parts) > 1, parts
    assert finish == "stop", finish
    assert usage is not None and usage.completion_tokens == r.usage.completion_tokens
    assert ids == {"chatcmpl-" + stream_job}, ids
    assert stream_job != job

    # The coordinator's refusals come through with their status and code.
    try:
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}]
        )
        raise AssertionError("unknown model accepted")
    except openai.NotFoundError as e:
        assert e.code == "model_not_found", e
    # The request's own faults are refused before a node is reserved.
    try:
        client.chat.completions.create(model=model, messages=messages, temperature=5)
        raise AssertionError("temperature 5 accepted")
    except openai.BadRequestError as e:
        assert e.code == "invalid_request", e

    print(json.dumps({"jobs": [job, stream_job], "answers": [text, streamed]}))


if __name__ == "__main__":
    main()
