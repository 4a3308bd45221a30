#!/usr/bin/env python3
"""Drives a running helpline server with the official `openai` Python package.

Usage: python3 tests/openai_client.py BASE_URL [API_KEY]
  BASE_URL  e.g. http://127.0.0.1:8080/v1
  API_KEY   the server's key (default: $OPENAI_API_KEY, else a dummy for a server without keys)

Checks the model list, a non-streamed and a streamed chat completion of the bare model (greedy
answer to "Hi!", grounding off), a grounded answer with its citations as the API's defaults give it,
and, when a real key is given, that a wrong key is refused. Exits non-zero on any failure,
including a missing `openai` package (install: python3 -m pip install 'openai>=1.40').
"""

import os
import sys

EXPECTED = "Hello! How can I assist you today?"


def fail(msg):
    print(f"FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def main():
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    base_url = sys.argv[1].rstrip("/")
    key = sys.argv[2] if len(sys.argv) > 2 else os.environ.get("OPENAI_API_KEY")
    real_key = bool(key)

    try:
        import openai
        from openai import OpenAI
    except ImportError as e:
        fail(f"the `openai` package is missing ({e}); install it with: python3 -m pip install 'openai>=1.40'")

    client = OpenAI(base_url=base_url, api_key=key or "dummy", max_retries=0, timeout=120.0)

    models = client.models.list()
    ids = [m.id for m in models.data]
    if len(ids) != 1:
        fail(f"expected one model, got {ids!r}")
    model = ids[0]
    print(f"model: {model}")

    messages = [{"role": "user", "content": "Hi!"}]
    # The server answers ungrounded by its own setting (a customer may not turn grounding off).
    bare = {"helpline": {}}
    reply = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=32, extra_body=bare)
    choice = reply.choices[0]
    if choice.message.content != EXPECTED:
        fail(f"non-streamed answer {choice.message.content!r}, expected {EXPECTED!r}")
    if choice.finish_reason != "stop":
        fail(f"non-streamed finish_reason {choice.finish_reason!r}")
    if reply.usage is None or reply.usage.completion_tokens <= 0 or reply.usage.prompt_tokens <= 0:
        fail(f"usage missing or empty: {reply.usage!r}")
    print(f"chat: {choice.message.content!r}")

    deltas = []
    finish = None
    chunks = 0
    stream = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=32, stream=True, extra_body=bare)
    for chunk in stream:
        chunks += 1
        for c in chunk.choices:
            if c.delta is not None and c.delta.content:
                deltas.append(c.delta.content)
            if c.finish_reason is not None:
                finish = c.finish_reason
    text = "".join(deltas)
    if text != EXPECTED:
        fail(f"streamed answer {text!r} (from {len(deltas)} deltas), expected {EXPECTED!r}")
    if finish != "stop":
        fail(f"streamed finish_reason {finish!r}")
    if len(deltas) < 2:
        fail(f"the answer came in {len(deltas)} delta(s); expected it token by token")
    print(f"stream: {len(deltas)} deltas in {chunks} chunks")

    # A support question, grounded: assembled from the approved article and cited (Helpline's
    # report arrives as an extra field).
    question = [{"role": "user", "content": "How do I reset my password?"}]
    grounded = {"helpline": {"grounding": True}}
    reply = client.chat.completions.create(model=model, messages=question, extra_body=grounded)
    content = reply.choices[0].message.content or ""
    if "Send reset link" not in content or "[1]" not in content:
        fail(f"the grounded answer lacks the article's steps or its marker: {content!r}")
    extra = reply.model_extra or {}
    cited = [c.get("doc_id") for c in (extra.get("helpline") or {}).get("citations") or []]
    if "password-reset" not in cited:
        fail(f"the grounded answer does not cite the password-reset article: {cited!r}")
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(model=model, messages=question, stream=True, extra_body=grounded)
        if c.choices
    )
    if streamed != content:
        fail(f"the streamed grounded answer differs from the non-streamed one: {streamed!r}")
    print(f"grounded: cites {cited}")

    if real_key:
        wrong = OpenAI(base_url=base_url, api_key=key + "-wrong", max_retries=0, timeout=30.0)
        try:
            wrong.models.list()
        except openai.AuthenticationError:
            print("wrong key: refused")
        else:
            fail("a wrong API key was accepted")

    print("ok")


if __name__ == "__main__":
    main()
