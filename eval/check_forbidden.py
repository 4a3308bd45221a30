#!/usr/bin/env python3
"""Checks for the forbidden-commitment matcher (eval/forbidden.json) and the red-team set
(eval/redteam.jsonl). Standard library only.

Usage: python3 eval/check_forbidden.py [--forbidden eval/forbidden.json]
           [--redteam eval/redteam.jsonl] [--docs docs-corpus] [--verbose]

Matcher checks:
- the file has a version and rules, each with a unique id, a description, patterns,
  at least 3 examples and at least 2 counter_examples;
- every pattern uses only syntax that Python `re` and Rust `regex` share (no lookaround, no
  backreferences, no inline flags or named groups, no possessive quantifiers, only common escapes,
  no class set operators) and compiles in Python with the `(?i)` prefix, without warnings;
- every example matches its own rule, and every pattern matches at least one example of its rule;
- no counter_example matches any rule;
- no pattern matches the visible text of any `approved` article (title, raw body and markup-stripped
  body), so a bot quoting or citing the help center is never flagged.
It also reports, for information, which rules fire on draft and retired articles (those contain
the commitments the bot must not make, so hits there are expected).

Red-team checks: one JSON object per line with id, category, turns, pasted and note; unique ids;
known categories with at least 8 items each (40 for commitment_paraphrase) and at least 150 in all; injected items are pasted;
escalation items carry a known expect_escalation; benign controls carry expect_answer and list
approved `relevant` ids. Exits non-zero on any failure.
"""

import argparse
import json
import re
import sys
import warnings
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check import EXTENSIONS, parse_article, plain_text  # noqa: E402  (eval/check.py)

FLAGS = "(?i)"
MIN_EXAMPLES, MIN_COUNTER = 3, 2
CATEGORIES = (
    "refund_beyond_policy",
    "social_engineering",
    "role_play",
    "injected_instructions",
    "other_languages",
    "system_prompt_extraction",
    "guarantees_and_legal",
    "competitors",
    "policy_exceptions",
    "escalation_triggers",
    "benign",
    "commitment_paraphrase",
)
MIN_PER_CATEGORY, MIN_TOTAL = 8, 150
# Categories that need more than MIN_PER_CATEGORY items.
CATEGORY_MINIMUMS = {"commitment_paraphrase": 40}
ESCALATIONS = ("legal_threat", "chargeback", "human_request", "repeated_failure")
REQUIRED_FIELDS = {"id", "category", "turns", "pasted", "note"}
OPTIONAL_FIELDS = {"expect_escalation", "expect_answer", "relevant"}

# Escapes both engines read the same way.
ALLOWED_ESCAPES = set("bBdDsSwWnt") | set(".$^()[]{}?+*|\\")


def portability_problems(p):
    """Syntax that Python re and Rust regex do not both accept (or read differently)."""
    problems = []
    i, in_class = 0, False
    while i < len(p):
        c = p[i]
        if c == "\\":
            if i + 1 >= len(p):
                problems.append("trailing backslash")
                break
            e = p[i + 1]
            if e.isdigit():
                problems.append(f"backreference or octal escape \\{e}")
            elif e not in ALLOWED_ESCAPES:
                problems.append(f"escape \\{e} is not in the shared subset")
            i += 2
            continue
        if in_class:
            if c == "]" and p[i - 1] != "[" and p[i - 2 : i] != "[^":
                in_class = False
            elif c == "[":
                problems.append("nested '[' inside a character class")
            elif p[i : i + 2] in ("&&", "--", "~~"):
                problems.append(f"class set operator {p[i:i+2]!r} (Rust reads it specially)")
        else:
            if c == "[":
                in_class = True
            elif c == "(" and p[i + 1 : i + 2] == "?" and p[i + 1 : i + 3] != "?:":
                problems.append(f"group extension {p[i:i+4]!r} (lookaround, flags or named group)")
            elif c in "*+?}" and p[i + 1 : i + 2] == "+":
                problems.append("possessive quantifier")
            elif c == "{" and re.match(r"\{,", p[i:]):
                problems.append("'{,n}' quantifier (Rust needs '{0,n}')")
        i += 1
    if in_class:
        problems.append("unterminated character class")
    return problems


def load_docs(root):
    docs = {}
    for path in sorted(Path(root).rglob("*")):
        if not path.is_file() or path.suffix not in EXTENSIONS or path.name == "README.md":
            continue
        meta, body = parse_article(path)
        docs[meta["id"]] = {
            "path": path,
            "status": meta.get("status"),
            # Everything the bot could quote: the title, the body as written, the visible text.
            "texts": [meta.get("title", ""), body, plain_text(body, path.suffix)],
        }
    return docs


def check_matcher(path, docs, errors, verbose):
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data.get("version"), str) or not data["version"]:
        errors.append("forbidden: missing version")
    rules = data.get("rules")
    if not isinstance(rules, list) or not rules:
        errors.append("forbidden: no rules")
        return []
    compiled, ids = [], set()
    for r in rules:
        rid = r.get("id")
        where = f"rule {rid!r}"
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

    # Counter-examples: no rule at all may fire on them.
    for rid, _, cex in compiled:
        for c in cex:
            for other, regs, _ in compiled:
                for p, rx in regs:
                    m = rx.search(c)
                    if m:
                        errors.append(
                            f"rule {rid!r}: counter_example {c!r} matched by {other!r} "
                            f"pattern {p!r} at {m.group(0)!r}"
                        )

    # Approved articles: never flagged.
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
                        errors.append(f"rule {rid!r}: pattern {p!r} matches approved {doc_id!r} at {m.group(0)!r}")
                        break

    # Draft and retired articles: informational.
    hits = defaultdict(set)
    for doc_id, d in sorted(docs.items()):
        if d["status"] == "approved":
            continue
        for rid, regs, _ in compiled:
            for p, rx in regs:
                for t in d["texts"]:
                    m = rx.search(t)
                    if m:
                        hits[doc_id].add(rid)
                        if verbose:
                            print(f"  (info) {doc_id} [{d['status']}]: {rid}: {m.group(0)!r}")
                        break
    n_pat = sum(len(regs) for _, regs, _ in compiled)
    n_ex = sum(len(r.get("examples") or []) for r in rules)
    n_cex = sum(len(r.get("counter_examples") or []) for r in rules)
    print(
        f"matcher: {len(compiled)} rules, {n_pat} patterns, {n_ex} examples, {n_cex} counter-examples; "
        f"checked against {checked} approved articles"
    )
    unapproved = sorted(k for k, d in docs.items() if d["status"] != "approved")
    for doc_id in unapproved:
        print(f"  draft/retired {doc_id}: flagged by {', '.join(sorted(hits[doc_id])) or '(none)'}")
    return compiled


def check_redteam(path, docs, errors):
    approved = {k for k, d in docs.items() if d["status"] == "approved"}
    counts, esc = Counter(), Counter()
    ids, seen_turns = set(), {}
    multi = pasted = 0
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                errors.append(f"redteam line {n}: blank line")
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                errors.append(f"redteam line {n}: invalid JSON: {e}")
                continue
            where = f"redteam line {n} ({item.get('id')})"
            keys = set(item)
            if not REQUIRED_FIELDS <= keys or keys - REQUIRED_FIELDS - OPTIONAL_FIELDS:
                errors.append(f"{where}: fields {sorted(keys)}; required {sorted(REQUIRED_FIELDS)}, optional {sorted(OPTIONAL_FIELDS)}")
            rid, cat, turns = item.get("id"), item.get("category"), item.get("turns")
            if not isinstance(rid, str) or not re.fullmatch(r"r\d{3}", rid):
                errors.append(f"{where}: bad id")
            elif rid in ids:
                errors.append(f"{where}: duplicate id")
            ids.add(rid)
            if cat not in CATEGORIES:
                errors.append(f"{where}: unknown category {cat!r}")
            if not (isinstance(turns, list) and turns and all(isinstance(t, str) and t.strip() for t in turns)):
                errors.append(f"{where}: turns must be a non-empty list of non-empty strings")
                continue
            key = tuple(t.strip().lower() for t in turns)
            if key in seen_turns:
                errors.append(f"{where}: same turns as {seen_turns[key]}")
            seen_turns[key] = rid
            if not isinstance(item.get("pasted"), bool):
                errors.append(f"{where}: pasted must be true or false")
            if not isinstance(item.get("note"), str) or not item["note"].strip():
                errors.append(f"{where}: note must be a non-empty string")
            counts[cat] += 1
            multi += len(turns) > 1
            pasted += item.get("pasted") is True
            if cat == "injected_instructions" and item.get("pasted") is not True:
                errors.append(f"{where}: injected_instructions items are pasted")
            if cat == "escalation_triggers":
                reason = item.get("expect_escalation")
                if reason not in ESCALATIONS:
                    errors.append(f"{where}: expect_escalation must be one of {ESCALATIONS}")
                esc[reason] += 1
                if reason == "repeated_failure" and len(turns) < 3:
                    errors.append(f"{where}: repeated_failure needs at least 3 turns")
            elif "expect_escalation" in item:
                errors.append(f"{where}: expect_escalation only on escalation_triggers items")
            if cat == "benign":
                if item.get("expect_answer") is not True:
                    errors.append(f"{where}: benign items have expect_answer: true")
                rel = item.get("relevant")
                if not (isinstance(rel, list) and rel):
                    errors.append(f"{where}: benign items list their relevant approved articles")
                else:
                    for d in rel:
                        if d not in approved:
                            errors.append(f"{where}: relevant {d!r} is not an approved article")
            else:
                if "expect_answer" in item or "relevant" in item:
                    errors.append(f"{where}: expect_answer/relevant only on benign items")
    for cat in CATEGORIES:
        need = CATEGORY_MINIMUMS.get(cat, MIN_PER_CATEGORY)
        if counts[cat] < need:
            errors.append(f"redteam: only {counts[cat]} {cat!r} items, need {need}")
    total = sum(counts.values())
    if total < MIN_TOTAL:
        errors.append(f"redteam: only {total} items, need {MIN_TOTAL}")
    for reason in ESCALATIONS:
        if esc[reason] < 2:
            errors.append(f"redteam: only {esc[reason]} escalation items expecting {reason!r}, need 2")
    print(f"redteam: {total} items ({multi} multi-turn, {pasted} pasted)")
    for cat in CATEGORIES:
        print(f"  {cat}: {counts[cat]}")
    print("  escalation reasons: " + ", ".join(f"{r} {esc[r]}" for r in ESCALATIONS))


def main():
    root = Path(__file__).resolve().parent.parent
    ap = argparse.ArgumentParser()
    ap.add_argument("--forbidden", default=str(root / "eval" / "forbidden.json"))
    ap.add_argument("--redteam", default=str(root / "eval" / "redteam.jsonl"))
    ap.add_argument("--docs", default=str(root / "docs-corpus"))
    ap.add_argument("--verbose", action="store_true", help="show what fires on draft/retired articles")
    args = ap.parse_args()

    errors = []
    docs = load_docs(args.docs)
    check_matcher(args.forbidden, docs, errors, args.verbose)
    check_redteam(args.redteam, docs, errors)
    if errors:
        print(f"\n{len(errors)} problem(s):")
        for e in errors:
            print("  - " + e)
        return 1
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
