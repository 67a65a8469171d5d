"""`tools` and `tool_choice` through the official OpenAI Python SDK.

Usage: openai_tools_check.py BASE_URL MODEL
A forced call (`tool_choice` "required" and a named function), non-stream
and streamed: the answer is one tool call to a declared function whose
arguments validate against its parameters with the `jsonschema` package,
content null and finish_reason "tool_calls". A follow-up turn carrying the
assistant's call and the tool's result is accepted, and a named function
that is not declared is a 400 naming `tool_choice`. Exits non-zero with an
assertion message when anything is off.
"""
import json
import sys

import jsonschema
import openai
from openai import OpenAI

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 30},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"timezone": {"type": "string", "maxLength": 30}},
    "required": ["timezone"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather of a city.",
            "parameters": WEATHER,
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The current time in a timezone.",
            "parameters": TIME,
        },
    },
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
MESSAGES = [{"role": "user", "content": "What is the weather like in Paris today?"}]


def check_call(name, arguments, only=None):
    assert name in SCHEMAS, f"unknown function {name!r}"
    if only is not None:
        assert name == only, f"called {name!r}, not {only!r}"
    args = json.loads(arguments)
    jsonschema.validate(args, SCHEMAS[name])
    return args


def ask(client, model, tool_choice, stream, only=None, seed=1):
    kwargs = dict(
        model=model,
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice=tool_choice,
        max_tokens=120,
        temperature=0.7,
        seed=seed,
    )
    if not stream:
        r = client.chat.completions.create(**kwargs)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls", c
        assert c.message.content is None, c.message
        calls = c.message.tool_calls
        assert calls and len(calls) == 1, c.message
        call = calls[0]
        assert call.type == "function" and call.id.startswith("call_"), call
        check_call(call.function.name, call.function.arguments, only)
        return call
    calls, finish, content = {}, None, ""
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            content += c.delta.content or ""
            for d in c.delta.tool_calls or []:
                slot = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                if d.id:
                    slot["id"] = d.id
                if d.function and d.function.name:
                    slot["name"] += d.function.name
                if d.function and d.function.arguments:
                    slot["arguments"] += d.function.arguments
            finish = c.finish_reason or finish
    assert finish == "tool_calls", finish
    assert content == "", repr(content)
    assert list(calls) == [0], calls
    call = calls[0]
    assert call["id"] and call["id"].startswith("call_"), call
    check_call(call["name"], call["arguments"], only)
    return call


def main() -> None:
    base, model = sys.argv[1], sys.argv[2]
    client = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    named = {"type": "function", "function": {"name": "get_time"}}
    for stream in (False, True):
        ask(client, model, "required", stream)
        ask(client, model, named, stream, only="get_time", seed=2)

    # The follow-up turn: the call made and its result.
    call = ask(client, model, {"type": "function", "function": {"name": "get_weather"}}, False,
               only="get_weather")
    follow = MESSAGES + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {
                        "name": call.function.name,
                        "arguments": call.function.arguments,
                    },
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 18, "sky": "clear"}'},
    ]
    r = client.chat.completions.create(
        model=model, messages=follow, tools=TOOLS, max_tokens=40, temperature=0, seed=3
    )
    c = r.choices[0]
    assert c.finish_reason in ("stop", "length", "tool_calls"), c
    assert (c.message.content or "") or c.message.tool_calls, c.message

    try:
        client.chat.completions.create(
            model=model,
            messages=MESSAGES,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "launch"}},
            max_tokens=8,
        )
        raise AssertionError("an undeclared function was accepted")
    except openai.BadRequestError as e:
        assert e.status_code == 400
        assert e.body.get("param") == "tool_choice", e.body
    print("ok")


if __name__ == "__main__":
    main()
