"""Drive `sgl node serve` with the official OpenAI Python SDK.

Usage: openai_sdk_check.py BASE_URL MODEL
Exits non-zero (with an assertion message) when anything is off.
"""
import sys

from openai import OpenAI


def main() -> None:
    base, model = sys.argv[1], sys.argv[2]
    client = OpenAI(base_url=base + "/v1", api_key="unused")

    models = [m.id for m in client.models.list()]
    assert model in models, models

    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=48,
    )
    text = r.choices[0].message.content
    assert "Paris" in text, text
    assert r.choices[0].finish_reason == "stop", r.choices[0].finish_reason
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=48,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                parts.append(c.delta.content)
            if c.finish_reason:
                finish = c.finish_reason
    assert "".join(parts) == text, ("".join(parts), text)
    assert finish == "stop", finish
    assert usage is not None and usage.completion_tokens == r.usage.completion_tokens

    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Write a long poem."}],
        max_completion_tokens=3,
    )
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 3

    try:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
        raise AssertionError("unknown model accepted")
    except Exception as e:  # openai.BadRequestError
        assert getattr(e, "status_code", None) == 400, e
    print("openai sdk: ok")


if __name__ == "__main__":
    main()
