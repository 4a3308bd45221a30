#!/usr/bin/env python3
"""OpenAI tool calling against a running helpline server, with the official `openai` package.

Usage: python3 tests/openai_tools.py BASE_URL [API_KEY]
  The server must answer ungrounded (`grounding = false`, or a key allowed to turn it off).

For every `tool_choice` (none, auto, required, a named function), streamed and not, it asks a
question that a declared function answers, and checks: every call parses and validates against
its function's schema; the choice is honoured (none: no calls; required: at least one; named:
only that function; parallel_tool_calls false: at most one); `finish_reason` is `tool_calls`
exactly when there are calls; streamed calls arrive as deltas with indexes. Then a client loop:
the tool is run here, its result sent back as a `tool` message, and the model answers in text.
Prints the figures (`calls valid: N/M`, `tool_choice honoured: N/M`) and exits non-zero on any
failure.
"""

import json
import os
import sys

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_order",
            "description": "Look up an order by its id: its status and delivery date.",
            "parameters": {
                "type": "object",
                "properties": {"order_id": {"type": "string", "pattern": "^[A-Z]-[0-9]{1,6}$"}},
                "required": ["order_id"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "list_invoices",
            "description": "List the customer's invoices.",
            "parameters": {
                "type": "object",
                "properties": {"limit": {"type": "integer", "minimum": 1, "maximum": 10}, "unpaid_only": {"type": "boolean"}},
                "required": ["limit"],
                "additionalProperties": False,
            },
        },
    },
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def fail(msg):
    print(f"FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def valid(name, arguments):
    """The call names a declared function and its arguments parse and fit the schema."""
    import re

    schema = SCHEMAS.get(name)
    if schema is None:
        return False
    try:
        args = json.loads(arguments)
    except ValueError:
        return False
    if not isinstance(args, dict):
        return False
    props = schema["properties"]
    if any(k not in args for k in schema.get("required", [])) or any(k not in props for k in args):
        return False
    for k, v in args.items():
        p = props[k]
        if p["type"] == "string" and not (isinstance(v, str) and re.fullmatch(p["pattern"].strip("^$"), v)):
            return False
        if p["type"] == "integer" and not (isinstance(v, int) and not isinstance(v, bool) and p["minimum"] <= v <= p["maximum"]):
            return False
        if p["type"] == "boolean" and not isinstance(v, bool):
            return False
    return True


def ask(client, messages, choice, stream, parallel=True):
    """One request; returns (content, [(id, name, arguments)], finish_reason)."""
    kw = dict(model="smollm2-135m-instruct", messages=messages, tools=TOOLS, temperature=0, max_tokens=96)
    if choice is not None:
        kw["tool_choice"] = choice
    if not parallel:
        kw["parallel_tool_calls"] = False
    if not stream:
        r = client.chat.completions.create(**kw)
        m = r.choices[0].message
        calls = [(c.id, c.function.name, c.function.arguments) for c in (m.tool_calls or [])]
        return m.content, calls, r.choices[0].finish_reason
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **kw):
        if not chunk.choices:
            continue
        ch = chunk.choices[0]
        if ch.delta.content:
            content += ch.delta.content
        for d in ch.delta.tool_calls or []:
            c = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
            if d.id:
                c["id"] = d.id
            if d.function and d.function.name:
                c["name"] += d.function.name
            if d.function and d.function.arguments:
                c["arguments"] += d.function.arguments
        if ch.finish_reason:
            finish = ch.finish_reason
    if sorted(calls) != list(range(len(calls))):
        fail(f"streamed tool call indexes are not 0..n: {sorted(calls)}")
    return content, [(c["id"], c["name"], c["arguments"]) for _, c in sorted(calls.items())], finish


def main():
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    key = sys.argv[2] if len(sys.argv) > 2 else os.environ.get("OPENAI_API_KEY")
    try:
        from openai import OpenAI
    except ImportError as e:
        fail(f"the `openai` package is missing ({e}); install it with: python3 -m pip install 'openai>=1.40'")
    client = OpenAI(base_url=sys.argv[1].rstrip("/"), api_key=key or "dummy", max_retries=0, timeout=120.0)

    question = [{"role": "user", "content": "Where is my order B-1042? When will it arrive?"}]
    named = {"type": "function", "function": {"name": "list_invoices"}}
    cases = [("none", None), ("auto", None), ("required", None), ("named", named), ("required, one call", None)]
    calls_total = calls_valid = honoured = total = 0
    for label, named_choice in cases:
        for stream in (False, True):
            choice = named_choice or ("required" if label.startswith("required") else label)
            parallel = label != "required, one call"
            content, calls, finish = ask(client, question, choice, stream, parallel)
            total += 1
            for _, name, args in calls:
                calls_total += 1
                calls_valid += valid(name, args)
            ok = {
                "none": not calls and isinstance(content, str) and content != "",
                "auto": bool(calls) or (isinstance(content, str) and content != ""),
                "required": len(calls) >= 1,
                "named": len(calls) >= 1 and all(n == "list_invoices" for _, n, _ in calls),
                "required, one call": len(calls) == 1,
            }[label]
            ok = ok and (finish == "tool_calls") == bool(calls) and len({i for i, _, _ in calls}) == len(calls)
            honoured += ok
            print(f"tool_choice {label:<18} stream={stream!s:<5} -> finish={finish} calls={[(n, a) for _, n, a in calls]} content={content!r:.60}")

    # The client loop: run the call here, send the result back, get a text answer.
    for stream in (False, True):
        _, calls, finish = ask(client, question, {"type": "function", "function": {"name": "get_order"}}, stream)
        if finish != "tool_calls" or not calls:
            fail(f"no call to run (finish {finish})")
        call_id, name, args = calls[0]
        order = json.loads(args)["order_id"]
        result = {"order_id": order, "status": "shipped", "arrives": "2026-12-09"}
        history = question + [
            {"role": "assistant", "content": None, "tool_calls": [{"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}]},
            {"role": "tool", "tool_call_id": call_id, "content": json.dumps(result)},
        ]
        content, more, finish = ask(client, history, "none", stream)
        if more or not isinstance(content, str) or not content.strip():
            fail(f"after the tool result the answer is not text: {content!r} {more}")
        print(f"loop stream={stream}: called {name}({args}) -> answer {content!r:.80}")

    print(f"calls valid: {calls_valid}/{calls_total}")
    print(f"tool_choice honoured: {honoured}/{total}")
    if calls_total == 0 or calls_valid != calls_total or honoured != total:
        fail("not every call validated or not every tool_choice was honoured")
    print("ok")


if __name__ == "__main__":
    main()
