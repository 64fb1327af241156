"""The public API reads like the ecosystem's: `from lowbit import LLM, SamplingParams, load, quantize`."""
from __future__ import annotations

import subprocess
import sys


def test_top_level_names_are_the_real_objects():
    import lowbit
    from lowbit import LLM, SamplingParams, load, quantize
    from lowbit.engine.llm import LLM as EngineLLM
    from lowbit.models.loader import load as loader_load
    from lowbit.quant.api import quantize as api_quantize
    assert (LLM, load, quantize) == (EngineLLM, loader_load, api_quantize)
    assert SamplingParams is lowbit.config.SamplingParams
    for name in lowbit.__all__:
        assert getattr(lowbit, name) is not None


def test_import_lowbit_is_light():
    """`import lowbit` loads neither the engine nor the methods (they come on first use)."""
    code = ("import sys, lowbit; heavy = [m for m in ('lowbit.engine', 'lowbit.quant', 'lowbit.models') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_load_quantize_save_load_generate(smollm2_4, tmp_path):
    """The README's round trip through the top-level names, on the real model cut to 4 blocks."""
    import copy

    import torch

    from lowbit import LLM, SamplingParams, load, quantize
    from lowbit.layers import WeightOnlyLinear

    model, tok = copy.deepcopy(smollm2_4[0]), smollm2_4[1]
    result = quantize(model, "rtn", bits=4, group_size=128, progress=False)
    out = result.save(model, tok, tmp_path / "q", save_dtype=None)
    loaded, tok2 = load(out)
    assert sum(isinstance(m, WeightOnlyLinear) for m in loaded.modules()) == 4 * 7
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    a = LLM((model, tok), max_num_seqs=1).generate(["The capital of France is"], params)[0]
    b = LLM((loaded, tok2), max_num_seqs=1).generate(["The capital of France is"], params)[0]
    assert a.outputs[0].token_ids == b.outputs[0].token_ids and len(a.outputs[0].token_ids) == 8
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)
