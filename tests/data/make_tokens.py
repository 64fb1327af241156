"""Regenerate tests/data/tokens.json: the frozen token ids that the method tests evaluate and calibrate on.

The method tests order quantization methods on a few hundred tokens; if those ids came from tokenizing the
WikiText-2 files at test time, a tokenizer (or transformers) upgrade could move them and flip a test for a
reason that has nothing to do with the code under test. So the ids are committed, and this file is the only
place that tokenizes:

    python tests/data/make_tokens.py            # rewrite tests/data/tokens.json
    python tests/data/make_tokens.py --check    # only say whether today's tokenizer still gives the same ids

What it stores (SmolLM2-135M-Instruct's tokenizer, the default model's, no special tokens):
  test:  the first TEST_TOKENS ids of WikiText-2 test (wikitext-2-raw/wiki.test.raw, first 100k characters,
         as the `wiki_ids` fixture tokenizes it): evaluation windows and probes are slices of it.
  calib: CALIB_WINDOWS windows of CALIB_SEQLEN ids of WikiText-2 valid (wikitext-2/valid.txt) at random offsets,
         drawn once by lowbit's own `calibration_windows(tok, valid, CALIB_WINDOWS, CALIB_SEQLEN, seed=0)`.
         The `frozen_calib(nsamples, seqlen, seed)` fixture hands out windows [seed*nsamples, (seed+1)*nsamples),
         each cut to its first seqlen ids: seeds 0..4 of 4 windows are disjoint.
Regenerating changes what every method test measures: re-run benchmarks/test_margins.py afterwards and check
that each margin is still at least twice its spread (benchmarks/results/test_margins.md).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "tokens.json"
SHARED = HERE.parents[2] / "shared" / "data"
WIKI_TEST = SHARED / "wikitext-2-raw" / "wiki.test.raw"
WIKI_VALID = SHARED / "wikitext-2" / "valid.txt"
TEST_CHARS = 100_000
TEST_TOKENS = 3072
CALIB_WINDOWS, CALIB_SEQLEN = 20, 128


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make(tok) -> dict:
    from lowbit.quant.api import calibration_windows
    from lowbit.text import read_text, tokenize_text

    test = tokenize_text(tok, read_text(WIKI_TEST)[:TEST_CHARS])[:TEST_TOKENS]
    calib = calibration_windows(tok, WIKI_VALID, CALIB_WINDOWS, CALIB_SEQLEN, seed=0).windows
    return {
        "about": "Frozen token ids for the method tests; regenerate with tests/data/make_tokens.py (its docstring "
                 "says what each list is).",
        "tokenizer": "SmolLM2-135M-Instruct (the default model's GGUF), add_special_tokens=False",
        "made_with": {p: md.version(p) for p in ("torch", "transformers", "tokenizers", "gguf")},
        "test": {"source": "wikitext-2-raw/wiki.test.raw", "sha256": _sha256(WIKI_TEST),
                 "chars": TEST_CHARS, "ids": test.tolist()},
        "calib": {"source": "wikitext-2/valid.txt", "sha256": _sha256(WIKI_VALID), "seed": 0,
                  "windows": calib.tolist()},
    }


def dump(data: dict) -> str:
    """JSON with one window (or 128 test ids) per line, so a diff of the file is readable."""
    def rows(ids, n=128):
        return "[\n" + ",\n".join("      " + json.dumps(ids[i: i + n], separators=(",", ":"))[1:-1]
                                  for i in range(0, len(ids), n)) + "\n    ]"
    test, calib = data["test"], data["calib"]
    head = {k: v for k, v in data.items() if k not in ("test", "calib")}
    parts = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in head.items()]
    def meta(d, skip):
        return "".join(f"{json.dumps(k)}: {json.dumps(v)}, " for k, v in d.items() if k != skip)
    parts.append(f'  "test": {{{meta(test, "ids")}"ids": {rows(test["ids"])}}}')
    windows = "[\n" + ",\n".join("      " + json.dumps(w, separators=(",", ":")) for w in calib["windows"]) + "\n    ]"
    parts.append(f'  "calib": {{{meta(calib, "windows")}"windows": {windows}}}')
    return "{\n" + ",\n".join(parts) + "\n}\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare with tokens.json instead of writing it")
    args = ap.parse_args(argv)
    from lowbit.models.loader import default_model_path, load

    _, tok = load(default_model_path(), dtype="fp32")
    data = make(tok)
    if args.check:
        old = json.loads(OUT.read_text())
        same = {k: old[k]["ids" if k == "test" else "windows"] == data[k]["ids" if k == "test" else "windows"]
                for k in ("test", "calib")}
        print(f"{OUT}: " + ", ".join(f"{k} {'unchanged' if v else 'DIFFERS'}" for k, v in same.items())
              + f" with {data['made_with']} (file made with {old['made_with']})")
        return 0 if all(same.values()) else 1
    text = dump(data)
    assert json.loads(text) == data
    OUT.write_text(text)
    print(f"wrote {OUT} ({len(text):,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
