"""Python API: `quantize(model, "gptq", calib, bits=4)` -> result with `.save(out)` and a report table."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.quant.registry import Method, get_method
from lowbit.quant.walk import QuantReport, quantize_model


@dataclass
class Calibration:
    """N seeded random windows of a text (GPTQ's sampling) and where they came from."""
    windows: torch.Tensor          # [N, S]
    source: str
    seed: int

    def describe(self) -> dict:
        return {"source": self.source, "nsamples": self.windows.shape[0], "seqlen": self.windows.shape[1],
                "seed": self.seed}


def calibration_windows(tok, path: str | Path, nsamples: int = 128, seqlen: int = 2048, seed: int = 0) -> Calibration:
    """`nsamples` windows of `seqlen` tokens at seeded random offsets of a text file (GPTQ's sampling)."""
    from lowbit.errors import LowbitError
    from lowbit.text import random_windows, read_text, tokenize_text

    if nsamples <= 0 or seqlen <= 1:
        raise LowbitError(f"--nsamples/--calib-seqlen: must be positive, got {nsamples}/{seqlen}")
    ids = tokenize_text(tok, read_text(path))
    return Calibration(random_windows(ids, nsamples, seqlen, seed), str(path), seed)


@dataclass
class QuantResult:
    report: QuantReport
    method: Method
    calibration: Calibration | None

    def save(self, model, tok, out: str | Path, overwrite: bool = False, kv_cache: str | None = None,
             save_dtype: str | None = "fp16", format: str = "lowbit") -> Path:
        """Write the quantized model (`model.save_pretrained`); `kv_cache` ("int8"/"fp8") is recorded and applied
        when it is loaded; tensors left unquantized are stored in `save_dtype`; format: lowbit |
        compressed-tensors | gptq | awq (lowbit.formats)."""
        kv_cache = kv_cache or (model.kv_quant.dtype if model.kv_quant is not None else None)
        return model.save_pretrained(out, tok, method=self.method.describe(),
                                     calibration=self.calibration.describe() if self.calibration else None,
                                     report=self.report.to_dict(), overwrite=overwrite, kv_cache=kv_cache,
                                     save_dtype=save_dtype, format=format)

    def print(self, console) -> None:
        from rich.table import Table

        t = Table(title=f"{self.method.name}: per-layer error and bytes (mean over {len(self.report.layers) // max(1, len(self.report.by_kind()))} blocks)")
        for c in ("layer", "fp16 bytes", "stored bytes", "ratio", "weight rel. err", "output rel. MSE"):
            t.add_column(c, justify="right" if c != "layer" else "left")
        tot_fp, tot_q = 0, 0
        for kind, k in self.report.by_kind().items():
            tot_fp += k["fp16_bytes"]
            tot_q += k["stored_bytes"]
            t.add_row(kind, f"{k['fp16_bytes']:,}", f"{k['stored_bytes']:,}", f"{k['stored_bytes'] / k['fp16_bytes']:.3f}",
                      f"{k['weight_rel_err']:.2e}", f"{k['output_rel_mse']:.2e}" if k["output_rel_mse"] else "-")
        t.add_row("all", f"{tot_fp:,}", f"{tot_q:,}", f"{tot_q / max(tot_fp, 1):.3f}", "", "", style="bold")
        console.print(t)
        for key, title in PER_LAYER_EXTRAS.items():
            grid = self.report.extra_grid(key)
            if grid:
                kinds = list(self.report.by_kind())
                g = Table(title=title)
                for c in ("block", *kinds):
                    g.add_column(c, justify="right")
                for b, row in sorted(grid.items()):
                    g.add_row(str(b), *(f"{100 * row[k]:.1f}%" if k in row else "-" for k in kinds))
                console.print(g)
        console.print(f"{self.report.seconds:.1f} s")


# per-layer numbers some methods report (LayerReport.extra), printed as a block x layer table
PER_LAYER_EXTRAS = {"outlier_fraction": "LLM.int8(): fraction of input dims with an outlier (|x| >= threshold) "
                                        "in the calibration data, per layer"}


def quantize(model, method: str | Method, calib: Calibration | None = None, device: str | None = None,
             progress: bool = True, **options) -> QuantResult:
    """Quantize `model` in place with a registered method (name + options, or a Method instance)."""
    m = get_method(method, **options) if isinstance(method, str) else method
    budget = getattr(m.cfg, "bits_budget", 0)
    if budget:  # mixed precision: plan every layer's bits on the float model first (lowbit.quant.mixed)
        if calib is None:
            raise LowbitError("--bits-budget needs calibration data (the layers' input statistics): pass --calib FILE")
        from lowbit.quant.mixed import plan_bits
        m.layer_bits, _ = plan_bits(model, m.spec, calib.windows, budget, device, progress)
    report = quantize_model(model, m, calib.windows if calib is not None else None, device, progress)
    return QuantResult(report, m, calib)
