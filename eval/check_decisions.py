#!/usr/bin/env python3
"""Checks for the decision set (eval/decisions.jsonl) and the verdict matcher (eval/verdicts.json).
Standard library only.

Usage: python3 eval/check_decisions.py [--decisions eval/decisions.jsonl]
           [--verdicts eval/verdicts.json] [--docs docs-corpus]

Decision-set checks: one JSON object per line with exactly id, turns, kind, rule_doc and note;
ids `d###`, unique; turns a list of 1-4 non-empty strings, no two items with the same turns; kind
`decision` (the customer asks the bot to decide their own case: eligibility, exceptions,
compensation) or `informational` (a control asking how the same rule works in general);
rule_doc is an `approved` article; note non-empty; at least 40 decisions and 20 controls, and at
least 2 multi-turn items of each kind.

Verdict-matcher checks: a version, "flags": "(?i)" and rules, each with a unique id, a
description, patterns, at least 3 examples and at least 2 counter_examples; every pattern uses
only syntax shared by Python `re` and Rust `regex` (the same test as check_forbidden.py) and
compiles with the `(?i)` prefix without warnings; every example matches its own rule and every
pattern matches at least one example of its rule; no counter_example matches any rule; no pattern
matches the visible text of any approved article (title, raw body, markup-stripped body).
Exits non-zero on any failure.
"""

import argparse
import json
import re
import sys
import warnings
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check import EXTENSIONS, parse_article, plain_text  # noqa: E402  (eval/check.py)
from check_forbidden import portability_problems  # noqa: E402  (eval/check_forbidden.py)

FLAGS = "(?i)"
KINDS = ("decision", "informational")
MIN_KIND = {"decision": 40, "informational": 20}
MIN_MULTI_TURN = 2
MAX_TURNS = 4
FIELDS = {"id", "turns", "kind", "rule_doc", "note"}
MIN_EXAMPLES, MIN_COUNTER = 3, 2


def load_docs(root):
    docs = {}
    for path in sorted(Path(root).rglob("*")):
        if not path.is_file() or path.suffix not in EXTENSIONS or path.name == "README.md":
            continue
        meta, body = parse_article(path)
        docs[meta["id"]] = {
            "status": meta.get("status"),
            "texts": [meta.get("title", ""), body, plain_text(body, path.suffix)],
        }
    return docs


def check_decisions(path, docs, errors):
    approved = {k for k, d in docs.items() if d["status"] == "approved"}
    counts, multi, rule_docs = Counter(), Counter(), Counter()
    ids, seen = set(), {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                errors.append(f"decisions line {n}: blank line")
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                errors.append(f"decisions line {n}: invalid JSON: {e}")
                continue
            if not isinstance(item, dict):
                errors.append(f"decisions line {n}: not a JSON object")
                continue
            where = f"decisions line {n} ({item.get('id')})"
            if set(item) != FIELDS:
                errors.append(f"{where}: fields are {sorted(item)}, expected {sorted(FIELDS)}")
            did, turns, kind, doc, note = (item.get(k) for k in ("id", "turns", "kind", "rule_doc", "note"))
            if not isinstance(did, str) or not re.fullmatch(r"d\d{3}", did):
                errors.append(f"{where}: bad id (expected d###)")
            elif did in ids:
                errors.append(f"{where}: duplicate id")
            ids.add(did)
            if not (isinstance(turns, list) and turns and all(isinstance(t, str) and t.strip() for t in turns)):
                errors.append(f"{where}: turns must be a non-empty list of non-empty strings")
                continue
            if len(turns) > MAX_TURNS:
                errors.append(f"{where}: at most {MAX_TURNS} turns")
            key = tuple(re.sub(r"\s+", " ", t).strip().lower() for t in turns)
            if key in seen:
                errors.append(f"{where}: same turns as {seen[key]}")
            seen[key] = did
            if kind not in KINDS:
                errors.append(f"{where}: kind must be one of {KINDS}")
                continue
            if doc not in docs:
                errors.append(f"{where}: rule_doc {doc!r} is not in the corpus")
            elif doc not in approved:
                errors.append(f"{where}: rule_doc {doc!r} has status {docs[doc]['status']}")
            if not isinstance(note, str) or not note.strip():
                errors.append(f"{where}: note must be a non-empty string")
            counts[kind] += 1
            multi[kind] += len(turns) > 1
            rule_docs[doc] += 1
    for kind in KINDS:
        if counts[kind] < MIN_KIND[kind]:
            errors.append(f"decisions: only {counts[kind]} {kind!r} items, need {MIN_KIND[kind]}")
        if multi[kind] < MIN_MULTI_TURN:
            errors.append(f"decisions: only {multi[kind]} multi-turn {kind!r} items, need {MIN_MULTI_TURN}")
    print(
        f"decisions: {sum(counts.values())} items = {counts['decision']} decision "
        f"({multi['decision']} multi-turn), {counts['informational']} informational "
        f"({multi['informational']} multi-turn); {len(rule_docs)} rule docs"
    )


def check_verdicts(path, docs, errors):
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data.get("version"), str) or not data["version"]:
        errors.append("verdicts: missing version")
    if data.get("flags") != FLAGS:
        errors.append(f"verdicts: flags must be {FLAGS!r}")
    rules = data.get("rules")
    if not isinstance(rules, list) or not rules:
        errors.append("verdicts: no rules")
        return
    compiled, ids = [], set()
    for r in rules:
        rid = r.get("id")
        where = f"verdict rule {rid!r}"
        if not isinstance(rid, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", rid):
            errors.append(f"{where}: bad id")
        if rid in ids:
            errors.append(f"{where}: duplicate id")
        ids.add(rid)
        if not isinstance(r.get("description"), str) or not r["description"].strip():
            errors.append(f"{where}: missing description")
        pats = r.get("patterns") or []
        if not pats:
            errors.append(f"{where}: no patterns")
        regs = []
        for p in pats:
            for prob in portability_problems(p):
                errors.append(f"{where}: pattern {p!r}: {prob}")
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error")
                    regs.append((p, re.compile(FLAGS + p)))
            except (re.error, Warning) as e:
                errors.append(f"{where}: pattern {p!r} does not compile: {e}")
        ex, cex = r.get("examples") or [], r.get("counter_examples") or []
        if len(ex) < MIN_EXAMPLES:
            errors.append(f"{where}: {len(ex)} examples, need {MIN_EXAMPLES}")
        if len(cex) < MIN_COUNTER:
            errors.append(f"{where}: {len(cex)} counter_examples, need {MIN_COUNTER}")
        for e in ex:
            if not any(rx.search(e) for _, rx in regs):
                errors.append(f"{where}: example not matched: {e!r}")
        for p, rx in regs:
            if not any(rx.search(e) for e in ex):
                errors.append(f"{where}: no example exercises pattern {p!r}")
        compiled.append((rid, regs, cex))

    for rid, _, cex in compiled:
        for c in cex:
            for other, regs, _ in compiled:
                for p, rx in regs:
                    m = rx.search(c)
                    if m:
                        errors.append(
                            f"verdict rule {rid!r}: counter_example {c!r} matched by {other!r} "
                            f"pattern {p!r} at {m.group(0)!r}"
                        )

    checked = 0
    for doc_id, d in sorted(docs.items()):
        if d["status"] != "approved":
            continue
        checked += 1
        for rid, regs, _ in compiled:
            for p, rx in regs:
                for t in d["texts"]:
                    m = rx.search(t)
                    if m:
                        errors.append(f"verdict rule {rid!r}: pattern {p!r} matches approved {doc_id!r} at {m.group(0)!r}")
                        break
    n_pat = sum(len(regs) for _, regs, _ in compiled)
    n_ex = sum(len(r.get("examples") or []) for r in rules)
    n_cex = sum(len(r.get("counter_examples") or []) for r in rules)
    print(
        f"verdicts: {len(compiled)} rules, {n_pat} patterns, {n_ex} examples, {n_cex} counter-examples; "
        f"checked against {checked} approved articles"
    )


def main():
    root = Path(__file__).resolve().parent.parent
    ap = argparse.ArgumentParser()
    ap.add_argument("--decisions", default=str(root / "eval" / "decisions.jsonl"))
    ap.add_argument("--verdicts", default=str(root / "eval" / "verdicts.json"))
    ap.add_argument("--docs", default=str(root / "docs-corpus"))
    args = ap.parse_args()

    errors = []
    docs = load_docs(args.docs)
    check_decisions(args.decisions, docs, errors)
    check_verdicts(args.verdicts, docs, errors)
    if errors:
        print(f"\n{len(errors)} problem(s):")
        for e in errors:
            print("  - " + e)
        return 1
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
