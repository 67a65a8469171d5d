"""`n`, `logprobs` and `top_logprobs` through the official OpenAI Python SDK.

Usage: openai_choices_check.py BASE_URL MODEL
Against a server with the real model: JSON and streamed answers carry `n`
choices, each with `logprobs.content` as OpenAI shapes it (token, logprob,
bytes, top_logprobs sorted most likely first), the usage counts every
choice's tokens, and out-of-range values are refused with 400 naming the
parameter. Exits non-zero (with an assertion message) when anything is off.
"""
import math
import sys

import openai
from openai import OpenAI


def check_logprobs(content, top):
    assert content, "no logprobs"
    for t in content:
        assert isinstance(t.token, str), t
        assert t.logprob <= 0 and math.isfinite(t.logprob), t
        assert t.bytes is not None, t
        assert len(t.top_logprobs) == top, (top, t)
        lps = [a.logprob for a in t.top_logprobs]
        assert lps == sorted(lps, reverse=True), lps
        assert sum(math.exp(x) for x in lps) <= 1.0001, lps


def main() -> None:
    base, model = sys.argv[1], sys.argv[2]
    client = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "What is the capital of France?"}]

    # Greedy with logprobs: the chosen token is the most likely one.
    r = client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=8,
        logprobs=True, top_logprobs=3,
    )
    assert len(r.choices) == 1, r
    content = r.choices[0].logprobs.content
    check_logprobs(content, 3)
    for t in content:
        assert t.top_logprobs[0].logprob == t.logprob, t
    assert len(content) == r.usage.completion_tokens, (len(content), r.usage)
    text = b"".join(bytes(t.bytes) for t in content).decode()
    assert text == r.choices[0].message.content, (text, r.choices[0].message.content)

    # n = 3, seeded: three choices, billed as three completions.
    r = client.chat.completions.create(
        model=model, messages=messages, temperature=1.0, seed=11, max_tokens=8,
        n=3, logprobs=True, top_logprobs=1,
    )
    assert [c.index for c in r.choices] == [0, 1, 2], r.choices
    total = 0
    for c in r.choices:
        check_logprobs(c.logprobs.content, 1)
        total += len(c.logprobs.content)
        assert c.finish_reason in ("stop", "length"), c
    assert r.usage.completion_tokens == total, (r.usage, total)
    again = client.chat.completions.create(
        model=model, messages=messages, temperature=1.0, seed=11, max_tokens=8,
        n=3, logprobs=True, top_logprobs=1,
    )
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]

    # The same request streamed: deltas per index, logprobs with each delta.
    stream = client.chat.completions.create(
        model=model, messages=messages, temperature=1.0, seed=11, max_tokens=8,
        n=3, logprobs=True, top_logprobs=1, stream=True,
        stream_options={"include_usage": True},
    )
    texts, lps, finish, usage = {}, {}, {}, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.logprobs is not None and c.logprobs.content:
                lps.setdefault(c.index, []).extend(c.logprobs.content)
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert sorted(texts) == [0, 1, 2], texts
    assert [texts[i] for i in range(3)] == [c.message.content for c in r.choices], texts
    assert sorted(finish) == [0, 1, 2], finish
    for i in range(3):
        check_logprobs(lps[i], 1)
    assert usage is not None and usage.completion_tokens == total, (usage, total)

    # Out of range: 400 naming the parameter.
    for kwargs, param in [
        ({"n": 9}, "n"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
    ]:
        try:
            client.chat.completions.create(model=model, messages=messages, max_tokens=4, **kwargs)
        except openai.BadRequestError as e:
            assert e.status_code == 400, (kwargs, e.status_code)
            assert e.param == param, (kwargs, e.param, e.body)
        else:
            raise AssertionError(f"{kwargs} was accepted at {base}")
    print("openai n/logprobs: ok")


if __name__ == "__main__":
    main()
