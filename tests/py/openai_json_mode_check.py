"""`response_format` through the official OpenAI Python SDK.

Usage: openai_json_mode_check.py BASE_URL MODEL
`json_object` and `json_schema` (strict, nested, enum, array, anyOf), each
non-stream and streamed: the content always parses and validates with the
`jsonschema` package, and ends with the value (finish_reason "stop"), or is
cut by max_tokens (finish_reason "length"). An unsupported schema keyword is
a 400 naming it. Exits non-zero with an assertion message when anything is off.
"""
import json
import sys

import jsonschema
import openai
from openai import OpenAI

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer"},
        "city": {"type": "string", "enum": ["Paris", "London", "Rome"]},
        "languages": {
            "type": "array",
            "items": {"type": "string", "maxLength": 20},
            "maxItems": 3,
        },
        "employed": {"type": "boolean"},
        "spouse": {"anyOf": [{"type": "string", "maxLength": 40}, {"type": "null"}]},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string", "maxLength": 40},
                "number": {"type": "number"},
            },
            "required": ["street", "number"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "city", "languages", "employed", "spouse", "address"],
    "additionalProperties": False,
}


PERSON_PROMPT = "Describe a person who lives in Paris, as JSON."
# A free-form object has no schema to end it: the prompt asks for a small one.
OBJECT_PROMPT = 'Give a JSON object with the keys "name" (a first name) and "age" (a number).'


def ask(client, model, response_format, stream, max_tokens=200, seed=1, prompt=PERSON_PROMPT):
    messages = [
        {"role": "system", "content": "You answer in JSON."},
        {"role": "user", "content": prompt},
    ]
    kwargs = dict(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0.7,
        seed=seed,
        response_format=response_format,
    )
    if not stream:
        r = client.chat.completions.create(**kwargs)
        return r.choices[0].message.content, r.choices[0].finish_reason
    text, finish = "", None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    return text, finish


def main() -> None:
    base, model = sys.argv[1], sys.argv[2]
    client = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    schema_format = {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": PERSON, "strict": True},
    }
    for stream in (False, True):
        for seed in (1, 2):
            text, finish = ask(
                client, model, {"type": "json_object"}, stream, seed=seed, prompt=OBJECT_PROMPT
            )
            assert finish == "stop", (stream, finish, text)
            assert isinstance(json.loads(text), dict), text
            text, finish = ask(client, model, schema_format, stream, seed=seed)
            assert finish == "stop", (stream, finish, text)
            jsonschema.validate(json.loads(text), PERSON)
        # Cut short: a prefix of a valid value, and "length".
        text, finish = ask(client, model, schema_format, stream, max_tokens=5)
        assert finish == "length", (stream, finish, text)
        assert text.lstrip().startswith("{"), text

    try:
        bad = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}}
        ask(client, model, {"type": "json_schema", "json_schema": {"name": "n", "schema": bad}}, False)
    except openai.BadRequestError as e:
        assert e.status_code == 400, e.status_code
        assert e.param == "minimum", e.body
        assert "minimum" in str(e), str(e)
    else:
        raise AssertionError("a schema with minimum was accepted")
    print(f"ok: response_format json_object and json_schema at {base}")


if __name__ == "__main__":
    main()
