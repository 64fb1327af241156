"""Shared fixtures: the real default model (SmolLM2-135M-Instruct from its GGUF), loaded once per session."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
WIKI_TEST = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"
WIKI_VALID = SHARED / "data" / "wikitext-2" / "valid.txt"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def wiki_test_path() -> Path:
    return WIKI_TEST


@pytest.fixture(scope="session")
def calib_path() -> Path:
    return WIKI_VALID


@pytest.fixture(scope="session")
def default_path() -> Path:
    from lowbit.models.loader import default_model_path
    return default_model_path()  # raises with the install command if the default model is missing


@pytest.fixture(scope="session")
def smollm2(default_path):
    """(model fp32, tokenizer) of the real SmolLM2-135M-Instruct."""
    from lowbit.models.loader import load
    return load(default_path, dtype="fp32")


@pytest.fixture(scope="session")
def hf_smollm2(default_path):
    """transformers' own LlamaForCausalLM on the same GGUF (its loader, its dequantizer): the oracle."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(default_path.parent), gguf_file=default_path.name,
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def wiki_ids(smollm2):
    """WikiText-2 test tokens (first 100k characters are plenty for tests)."""
    from lowbit.text import read_text, tokenize_text
    return tokenize_text(smollm2[1], read_text(WIKI_TEST)[:100_000])


@pytest.fixture(scope="session")
def frozen_test_ids():
    """The first 3072 WikiText-2 test tokens, frozen in tests/data/tokens.json (a tokenizer upgrade cannot move
    them): what the method tests evaluate on. ids [3072]."""
    from helpers import frozen_test_ids
    return frozen_test_ids()


@pytest.fixture(scope="session")
def frozen_calib():
    """frozen_calib(nsamples, seqlen, seed=0) -> Calibration: frozen WikiText-2 valid windows from
    tests/data/tokens.json (seed s: windows s*nsamples .. (s+1)*nsamples - 1, each cut to seqlen <= 128)."""
    from helpers import frozen_calib
    return frozen_calib


@pytest.fixture(scope="session")
def smollm2_4(smollm2):
    """The real SmolLM2 cut to its first 4 blocks (real weights, real embeddings and head): method tests
    that walk every block run 7x faster on it."""
    import copy
    model = copy.deepcopy(smollm2[0])
    model.model.layers = model.model.layers[:4]
    model.config = copy.deepcopy(model.config)
    model.config.num_layers = 4
    return model, smollm2[1]
