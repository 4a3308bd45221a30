#!/usr/bin/env python3
"""Sanity checks for eval/grounding.jsonl against the docs corpus.

Usage: python3 eval/check.py [--questions eval/grounding.jsonl] [--docs docs-corpus]
       python3 eval/check.py --heldout [--questions eval/heldout.jsonl] [--docs docs-corpus]

Checks: every line is a JSON object with the expected fields and types; ids are unique and their
prefix matches the category (q = answerable single turn, f = answerable follow-up, u =
unanswerable); every `relevant` id is an article in the corpus with `status: approved`; every
approved article is the relevant doc of at least one question; each `answer` phrase occurs in at
least one of its relevant articles (markup stripped); per-category counts meet the minimums.
Exits non-zero on any failure. Standard library only.

With --heldout the file is the held-out set (eval/heldout.jsonl by default): ids are prefixed hq,
hf and hu instead of q, f and u, the held-out minimums apply, every approved article must still be
the relevant doc of at least one question, and no conversation may repeat one from
eval/grounding.jsonl (the held-out set must be written fresh, not copied from the tuning set).
"""

import argparse
import html
import json
import re
import sys
from collections import Counter
from pathlib import Path

MINIMUMS = {"q": 65, "f": 12, "u": 20}
MIN_UNANSWERABLE_FOLLOWUPS = 3
# Held-out set (--heldout): ids hq###, hf###, hu###.
HELDOUT_MINIMUMS = {"q": 80, "f": 12, "u": 35}
HELDOUT_MIN_UNANSWERABLE_FOLLOWUPS = 3
EXTENSIONS = (".md", ".txt", ".html")


def parse_article(path):
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    if not lines or lines[0].strip() != "---":
        raise ValueError(f"{path}: no front matter on the first line")
    try:
        end = next(i for i in range(1, len(lines)) if lines[i].strip() == "---")
    except StopIteration:
        raise ValueError(f"{path}: front matter is not closed") from None
    meta = {}
    for line in lines[1:end]:
        line = line.split(" #", 1)[0].rstrip()
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise ValueError(f"{path}: bad front matter line {line!r}")
        meta[key.strip()] = value.strip().strip('"').strip("'")
    body = "\n".join(lines[end + 1 :])
    return meta, body


def plain_text(body, suffix):
    if suffix == ".html":
        body = re.sub(r"(?is)<(script|style|title)\b.*?</\1\s*>", " ", body)
        body = re.sub(r"(?s)<!--.*?-->", " ", body)
        body = re.sub(r"(?s)<[^>]+>", " ", body)
        body = html.unescape(body)
    else:
        body = body.replace("**", "").replace("`", "")
    body = body.replace("\u00a0", " ")
    return re.sub(r"\s+", " ", body).strip().lower()


def norm(s):
    return re.sub(r"\s+", " ", s.replace("\u00a0", " ")).strip().lower()


def main():
    ap = argparse.ArgumentParser()
    root = Path(__file__).resolve().parent.parent
    ap.add_argument("--questions", default=None, help="default eval/grounding.jsonl (eval/heldout.jsonl with --heldout)")
    ap.add_argument("--docs", default=str(root / "docs-corpus"))
    ap.add_argument("--heldout", action="store_true", help="validate the held-out set (hq/hf/hu ids, its own minimums)")
    args = ap.parse_args()
    if args.questions is None:
        args.questions = str(root / "eval" / ("heldout.jsonl" if args.heldout else "grounding.jsonl"))
    prefix = "h" if args.heldout else ""
    minimums = HELDOUT_MINIMUMS if args.heldout else MINIMUMS
    min_u_followups = HELDOUT_MIN_UNANSWERABLE_FOLLOWUPS if args.heldout else MIN_UNANSWERABLE_FOLLOWUPS

    errors = []
    docs = {}
    for path in sorted(Path(args.docs).rglob("*")):
        if not path.is_file() or path.suffix not in EXTENSIONS or path.name == "README.md":
            continue
        try:
            meta, body = parse_article(path)
        except ValueError as e:
            errors.append(str(e))
            continue
        doc_id = meta.get("id", "")
        if doc_id != path.stem:
            errors.append(f"{path}: id {doc_id!r} does not match the file name")
        if doc_id in docs:
            errors.append(f"{path}: duplicate doc id {doc_id!r} (also {docs[doc_id]['path']})")
        if meta.get("status") not in ("approved", "draft", "retired"):
            errors.append(f"{path}: bad status {meta.get('status')!r}")
        docs[doc_id] = {"path": path, "status": meta.get("status"), "text": plain_text(body, path.suffix)}
    approved = {d for d, v in docs.items() if v["status"] == "approved"}

    seen_ids, seen_turns = set(), {}
    counts = Counter()
    unanswerable_followups = 0
    covered = Counter()
    with open(args.questions, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                errors.append(f"line {n}: blank line")
                continue
            try:
                q = json.loads(line)
            except json.JSONDecodeError as e:
                errors.append(f"line {n}: invalid JSON: {e}")
                continue
            where = f"line {n} ({q.get('id')})"
            if set(q) != {"id", "turns", "relevant", "answer"}:
                errors.append(f"{where}: fields are {sorted(q)}, expected id, turns, relevant, answer")
            qid, turns, relevant, answer = q.get("id"), q.get("turns"), q.get("relevant"), q.get("answer")
            if not isinstance(qid, str) or not re.fullmatch(prefix + r"[qfu]\d{3}", qid):
                errors.append(f"{where}: bad id (expected {prefix}q###, {prefix}f### or {prefix}u###)")
                continue
            if qid in seen_ids:
                errors.append(f"{where}: duplicate id")
            seen_ids.add(qid)
            if not (isinstance(turns, list) and turns and all(isinstance(t, str) and t.strip() for t in turns)):
                errors.append(f"{where}: turns must be a non-empty list of non-empty strings")
                continue
            key = tuple(norm(t) for t in turns)
            if key in seen_turns:
                errors.append(f"{where}: same turns as {seen_turns[key]}")
            seen_turns[key] = qid
            if not isinstance(relevant, list) or len(set(relevant)) != len(relevant):
                errors.append(f"{where}: relevant must be a list without repeats")
                continue
            if not isinstance(answer, str):
                errors.append(f"{where}: answer must be a string")
                continue
            kind = qid[len(prefix)]
            counts[kind] += 1
            if kind == "q" and len(turns) != 1:
                errors.append(f"{where}: q ids are single-turn")
            if kind == "f" and not 2 <= len(turns) <= 3:
                errors.append(f"{where}: f ids have 2-3 turns")
            if kind == "u":
                if relevant or answer:
                    errors.append(f"{where}: unanswerable questions have empty relevant and answer")
                if len(turns) > 1:
                    unanswerable_followups += 1
                if len(turns) > 3:
                    errors.append(f"{where}: at most 3 turns")
                continue
            if not relevant:
                errors.append(f"{where}: answerable question without relevant docs")
            if not answer.strip():
                errors.append(f"{where}: answerable question without answer")
            for doc_id in relevant:
                if doc_id not in docs:
                    errors.append(f"{where}: relevant id {doc_id!r} is not in the corpus")
                elif doc_id not in approved:
                    errors.append(f"{where}: relevant id {doc_id!r} has status {docs[doc_id]['status']}")
                else:
                    covered[doc_id] += 1
            texts = [docs[d]["text"] for d in relevant if d in approved]
            if texts and not any(norm(answer) in t for t in texts):
                errors.append(f"{where}: answer {answer!r} not found in any relevant article")

    if args.heldout:
        # The held-out set must not repeat a conversation, or a single message, of the tuning set.
        tuning = root / "eval" / "grounding.jsonl"
        tuning_turns = set()
        if tuning.exists() and Path(args.questions).resolve() != tuning.resolve():
            with open(tuning, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        try:
                            tuning_turns.update(norm(t) for t in json.loads(line).get("turns", []))
                        except (json.JSONDecodeError, AttributeError, TypeError):
                            pass
        for key, qid in sorted(seen_turns.items(), key=lambda kv: kv[1]):
            for t in key:
                if t in tuning_turns:
                    errors.append(f"{qid}: turn {t!r} also appears in {tuning.name}")

    for kind, minimum in minimums.items():
        if counts[kind] < minimum:
            errors.append(f"only {counts[kind]} '{prefix}{kind}' questions, need {minimum}")
    if unanswerable_followups < min_u_followups:
        errors.append(f"only {unanswerable_followups} unanswerable follow-ups, need {min_u_followups}")
    for doc_id in sorted(approved - set(covered)):
        errors.append(f"approved article {doc_id!r} answers no question")

    print(f"articles: {len(docs)} ({len(approved)} approved)")
    print(
        f"questions: {sum(counts.values())} = {counts['q']} answerable single-turn, "
        f"{counts['f']} answerable follow-ups, {counts['u']} unanswerable "
        f"({unanswerable_followups} of them follow-ups)"
    )
    print(f"approved articles covered: {len(covered)}/{len(approved)}")
    if errors:
        print(f"\n{len(errors)} problem(s):")
        for e in errors:
            print("  - " + e)
        return 1
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
