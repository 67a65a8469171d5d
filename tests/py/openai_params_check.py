"""The official OpenAI Python SDK sends parameters `sgl` does not implement.

Usage: openai_params_check.py BASE_URL MODEL
Each is refused with 400 `unsupported_parameter` naming it (the SDK's
BadRequestError with `code` and `param`); their no-op defaults are served.
The servers under test run the echo engine, which has no `tools`; a
`tool_choice` that requires a call with no tools is a 400 naming it.
Exits non-zero (with an assertion message) when anything is off.
"""
import sys

import openai
from openai import OpenAI


def main() -> None:
    base, model = sys.argv[1], sys.argv[2]
    client = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "hello"}]
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    refused = {
        "tools": {"tools": [tool]},
        "frequency_penalty": {"frequency_penalty": 0.5},
    }
    for name, kwargs in refused.items():
        try:
            client.chat.completions.create(model=model, messages=messages, max_tokens=8, **kwargs)
        except openai.BadRequestError as e:
            assert e.status_code == 400, (name, e.status_code)
            assert e.code == "unsupported_parameter", (name, e.code, e.body)
            assert e.param == name, (name, e.param, e.body)
            assert name in str(e), (name, str(e))
        else:
            raise AssertionError(f"{name} was accepted at {base}")

    try:
        client.chat.completions.create(
            model=model, messages=messages, max_tokens=8, tool_choice="required"
        )
    except openai.BadRequestError as e:
        assert e.status_code == 400 and e.param == "tool_choice", (e.status_code, e.body)
    else:
        raise AssertionError(f"tool_choice required without tools was accepted at {base}")

    r = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=8,
        n=1,
        logprobs=False,
        response_format={"type": "text"},
    )
    assert len(r.choices) == 1, r
    print(f"ok: {len(refused)} parameters refused by name at {base}")


if __name__ == "__main__":
    main()
