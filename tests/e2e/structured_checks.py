"""Structured output and tool calling through the official `openai` client (called from
openai_e2e.py with its `check` decorator): the client's `parse` helper with pydantic models
(nested objects, enums, arrays, bounded numbers, optional fields), `json_object`, regex and
choice constraints, a streamed tool call, and the 400 for a schema feature that cannot be
compiled.

The suite runs them on the plain Transformer and on the zero-shot conversion (no recovery,
a weak model), so the schemas bound what a wandering model could stretch forever (string
lengths, list sizes) and the budgets leave room; a valid answer then comes from the grammar
whatever the model's quality.
"""

import json
from enum import Enum
from typing import Annotated, List, Optional

import openai
from pydantic import BaseModel, Field


class Color(str, Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Person(BaseModel):
    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=120)


class Address(BaseModel):
    city: str = Field(max_length=30)
    zip_code: str = Field(pattern=r"^[0-9]{5}$")


class Customer(BaseModel):
    person: Person
    address: Address
    favorite: Color
    tags: List[Annotated[str, Field(max_length=12)]] = Field(min_length=1, max_length=3)
    score: float = Field(ge=0.0, le=1.0)
    nickname: Optional[Annotated[str, Field(max_length=12)]] = None


class Inventory(BaseModel):
    items: List[Person] = Field(min_length=1, max_length=2)
    in_stock: bool


MODELS = [
    (Person, "Make up a person: a name and an age."),
    (Customer, "Make up a customer record."),
    (Inventory, "List one or two people and say whether they are in stock."),
    (Address, "Give an address in Paris."),
]

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 24},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}


def parse_helper(client):
    """`client.chat.completions.parse` (openai >= 1.92) or the older beta location."""
    chat = client.chat.completions
    return chat.parse if hasattr(chat, "parse") else client.beta.chat.completions.parse


def structured_checks(check, client, model, tag):
    parse = parse_helper(client)

    for cls, prompt in MODELS:

        @check(f"{tag}: response_format {cls.__name__} through the client's parse helper")
        def _(cls=cls, prompt=prompt):
            for seed in (0, 1):
                r = parse(
                    model=model,
                    messages=[{"role": "user", "content": prompt}],
                    response_format=cls,
                    max_tokens=600,
                    temperature=0.8,
                    seed=seed,
                )
                msg = r.choices[0].message
                assert r.choices[0].finish_reason == "stop", r
                assert isinstance(msg.parsed, cls), msg
                # parse already validated it; validate the raw text too.
                cls.model_validate_json(msg.content)

    @check(f"{tag}: streamed json_schema output parses and validates")
    def _():
        stream = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Make up a person."}],
            response_format={
                "type": "json_schema",
                # As strict schemas are written (and the parse helper sends them): no other keys.
                "json_schema": {"name": "person", "strict": True,
                                "schema": {**Person.model_json_schema(), "additionalProperties": False}},
            },
            max_tokens=400,
            seed=3,
            stream=True,
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        Person.model_validate_json(text)

    @check(f"{tag}: json_object gives a JSON object")
    def _():
        r = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Describe a cat as JSON."}],
            response_format={"type": "json_object"},
            max_tokens=200,
            temperature=0,
        )
        if r.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(r.choices[0].message.content), dict), r
        else:  # a long object cut by max_tokens is still an object's prefix
            assert r.choices[0].message.content.lstrip().startswith("{"), r

    @check(f"{tag}: regex and choice constraints (structured_outputs)")
    def _():
        r = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Give a date."}],
            extra_body={"structured_outputs": {"regex": r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-2][0-9]"}},
            max_tokens=20,
            seed=5,
        )
        import re

        assert re.fullmatch(r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-2][0-9]", r.choices[0].message.content), r
        r = client.completions.create(
            model=model,
            prompt="Is the sky blue? Answer:",
            extra_body={"structured_outputs": {"choice": [" yes", " no"]}},
            max_tokens=5,
            seed=5,
        )
        assert r.choices[0].text in (" yes", " no"), r

    @check(f"{tag}: a required tool call streams as indexed deltas with valid arguments")
    def _():
        stream = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "What's the weather in Paris?"}],
            tools=[WEATHER_TOOL],
            tool_choice="required",
            # One call: a weak model may otherwise keep adding calls until max_tokens.
            parallel_tool_calls=False,
            max_tokens=300,
            seed=7,
            stream=True,
        )
        calls, finish = {}, None
        for chunk in stream:
            if not chunk.choices:
                continue
            ch = chunk.choices[0]
            for d in ch.delta.tool_calls or []:
                c = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                c["id"] = d.id or c["id"]
                if d.function.name:
                    c["name"] += d.function.name
                c["arguments"] += d.function.arguments or ""
            finish = ch.finish_reason or finish
        assert finish == "tool_calls", finish
        assert sorted(calls) == [0], calls
        for c in calls.values():
            assert c["id"].startswith("call_") and c["name"] == "get_weather", c
            args = json.loads(c["arguments"])
            assert set(args) == {"city", "unit"} and args["unit"] in ("celsius", "fahrenheit"), args
        # The next turn: the calls and their results go back.
        first = calls[0]
        r = client.chat.completions.create(
            model=model,
            messages=[
                {"role": "user", "content": "What's the weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": first["id"], "type": "function",
                     "function": {"name": first["name"], "arguments": first["arguments"]}}]},
                {"role": "tool", "tool_call_id": first["id"], "content": "22 degrees, sunny"},
            ],
            tools=[WEATHER_TOOL],
            max_tokens=30,
            temperature=0,
        )
        assert r.choices[0].finish_reason in ("stop", "length", "tool_calls"), r

    @check(f"{tag}: a schema feature that cannot be compiled is a 400 naming response_format")
    def _():
        try:
            client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": "x"}],
                response_format={"type": "json_schema", "json_schema": {
                    "name": "bad", "schema": {"type": "string", "format": "no-such-format"}}},
                max_tokens=5,
            )
            raise AssertionError("accepted")
        except openai.BadRequestError as e:
            assert e.body["param"] == "response_format", e.body
