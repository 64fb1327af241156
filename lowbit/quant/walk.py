"""The one layer walk: quantize a model block by block on calibration activations (GPTQ-style driver).

Only the current block lives on the accelerator; the calibration hidden states of all windows are kept
on the CPU between blocks. After a block is quantized its outputs are recomputed with the quantized
block, so every later block calibrates on the inputs it will really see.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from lowbit.device import check_device
from lowbit.quant.context import BATCH, BlockContext, run_block
from lowbit.quant.registry import BlockReport

__all__ = ["BATCH", "BlockContext", "LayerReport", "QuantReport", "block_inputs", "quantize_model", "run_block"]


@dataclass
class LayerReport:
    block: int
    name: str                   # e.g. "self_attn.q_proj"
    kind: str                   # replacement class
    fp16_bytes: int
    stored_bytes: int
    weight_rel_err: float       # ||W_q - W||² / ||W||²
    output_rel_mse: float | None = None   # ||X W_qᵀ - X Wᵀ||² / ||X Wᵀ||² on calibration rows
    format_bytes: int | None = None       # packed size of the format when the layer holds it unpacked (simulation)
    extra: dict = field(default_factory=dict)


@dataclass
class QuantReport:
    method: dict
    layers: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0
    peak_memory_bytes: int = 0
    # per block, what the method's prepare_block / finish_block reported ({"block": i, ...}): AWQ's and
    # SmoothQuant's chosen α and losses, ZeroQuant's LKD log
    blocks: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"method": self.method, "seconds": self.seconds, "peak_memory_bytes": self.peak_memory_bytes,
                "layers": [asdict(r) for r in self.layers], "blocks": self.blocks}

    def add_block(self, index: int, rep: BlockReport | None) -> None:
        """Record what a block hook returned: its entry, and the numbers for that block's layer rows."""
        if rep is None:
            return
        if rep.entry:
            self.blocks.append({"block": index, **rep.entry})
        for r in self.layers:
            if r.block == index and r.name in rep.layer_extra:
                r.extra.update(rep.layer_extra[r.name])

    def extra_grid(self, key: str) -> dict[int, dict[str, float]]:
        """{block: {kind: value}} of one numeric entry of the layers' `extra` (empty when none has it)."""
        out: dict[int, dict[str, float]] = {}
        for r in self.layers:
            if key in r.extra:
                out.setdefault(r.block, {})[r.name.split(".")[-1]] = float(r.extra[key])
        return out

    def by_kind(self) -> dict[str, dict[str, float]]:
        """Per Linear kind (q_proj, down_proj, ...): bytes and mean errors over blocks."""
        out: dict[str, dict[str, float]] = {}
        for r in self.layers:
            k = out.setdefault(r.name.split(".")[-1], {"fp16_bytes": 0, "stored_bytes": 0, "n": 0,
                                                       "weight_rel_err": 0.0, "output_rel_mse": 0.0})
            k["fp16_bytes"] += r.fp16_bytes
            k["stored_bytes"] += r.stored_bytes
            k["n"] += 1
            k["weight_rel_err"] += r.weight_rel_err
            k["output_rel_mse"] += r.output_rel_mse or 0.0
        for k in out.values():
            k["weight_rel_err"] /= k["n"]
            k["output_rel_mse"] /= k["n"]
        return out


class RowSample:
    """Keeps up to `n` input rows of a Linear (for the error report), spread over the calibration set."""

    def __init__(self, n: int = 2048, seed: int = 0):
        self.n, self.rows, self.seen = n, [], 0
        self.g = torch.Generator().manual_seed(seed)

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])                                  # [rows, in]
        take = max(1, self.n // 64)  # a few rows from every batch, so late windows are represented too
        idx = torch.randperm(x.shape[0], generator=self.g)[:take]
        self.rows.append(x[idx.to(x.device)].detach().float().cpu())
        self.seen += x.shape[0]

    def tensor(self) -> torch.Tensor:
        return torch.cat(self.rows)[: self.n]                           # [n, in]


class InputCapture:
    """Keeps every input row a Linear sees, in order, in one preallocated [N, S, in] tensor (CPU)."""

    def __init__(self, n_windows: int):
        self.n, self.at, self.buf = n_windows, 0, None

    def update(self, x: torch.Tensor) -> None:
        if self.buf is None:
            self.buf = torch.empty((self.n, *x.shape[1:]), dtype=x.dtype)   # [N, S, in]
        self.buf[self.at: self.at + x.shape[0]] = x
        self.at += x.shape[0]


@dataclass
class _Sinks:
    """What one Linear's calibration inputs feed: the method's statistics, the report's row sample, and
    optionally a full capture."""
    stats: object | None
    rows: RowSample
    capture: InputCapture | None = None

    def update(self, x: torch.Tensor) -> None:
        for s in (self.stats, self.rows, self.capture):
            if s is not None:
                s.update(x)


def _named_linears(block: nn.Module, names) -> dict[str, nn.Linear]:
    return {n: block.get_submodule(n) for n in names}


def _sinks(ctx: BlockContext, method, linears: dict[str, nn.Linear]) -> tuple[dict[str, _Sinks], dict]:
    """Sinks per Linear, and the Linears to hook. When the method's statistics depend on the inputs only,
    Linears reading the same input (q/k/v, gate/up) share one sink, fed once: one Hessian, not three."""
    share = {}
    if method.shares_input_stats:
        share = {c: producer for producer, consumers in ctx.layout.input_groups for c in consumers}
    sinks, hooked, by_input = {}, {}, {}
    for n, lin in linears.items():
        key = share.get(n, n)
        if key not in by_input:
            by_input[key] = _Sinks(method.collector(ctx, n, lin), RowSample())
            hooked[n] = lin
        sinks[n] = by_input[key]
    return sinks, hooked


def _hook_inputs(modules: dict[str, nn.Module], sinks: dict[str, _Sinks]):
    """Forward pre-hooks feeding each module's input to its sinks; returns the handles."""
    handles = []
    for name, mod in modules.items():
        def hook(_m, args, _name=name):
            sinks[_name].update(args[0])
        handles.append(mod.register_forward_pre_hook(hook))
    return handles


@torch.no_grad()
def block_inputs(model, windows: torch.Tensor, batch: int = BATCH) -> tuple[torch.Tensor, dict]:
    """Hidden states entering the first block for windows [N, S] (CPU), and the per-block kwargs (RoPE)."""
    xs = []
    for i in range(0, windows.shape[0], batch):
        x, _, _, _ = model.embed(windows[i: i + batch].to(model.device))
        xs.append(x.cpu())
    S = windows.shape[1]
    _, cos, sin, _ = model.embed(windows[:1, :1].to(model.device).expand(batch, 1).clone(),
                                 positions=torch.arange(S, device=model.device).expand(batch, S))
    return torch.cat(xs), {"cos": cos, "sin": sin}                       # [N, S, d]


def _weight_rel_err(old: nn.Linear, new: nn.Module) -> float:
    w = old.weight.detach().float()
    wq = new.dequantized_weight().float() if hasattr(new, "dequantized_weight") else new.weight.float()
    return ((wq - w).pow(2).sum() / w.pow(2).sum().clamp_min(1e-30)).item()


def _output_rel_mse(old: nn.Linear, new: nn.Module, x: torch.Tensor) -> float:
    dev = old.weight.device
    x = x.to(dev, old.weight.dtype)
    ref = old(x).float()
    return ((new(x).float() - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-30)).item()


def _fp16_bytes(m: nn.Linear) -> int:
    return 2 * (m.weight.numel() + (m.bias.numel() if m.bias is not None else 0))


def _stored_bytes(m: nn.Module) -> int:
    """Bytes a quantized layer stores; an unquantized Linear counts as the fp16 baseline."""
    return int(m.nbytes()) if hasattr(m, "nbytes") else _fp16_bytes(m)


def _format_bytes(m: nn.Module) -> int:
    """Bytes of the layer's weight format when packed (what bits/weight counts)."""
    return int(m.format_nbytes()) if hasattr(m, "format_nbytes") else _stored_bytes(m)


def _quantize_group(ctx: BlockContext, method, linears: dict[str, nn.Linear], sinks, report: QuantReport) -> None:
    """Replace each Linear of one group by the method's quantized module, with a report row for it."""
    from lowbit.layers import swap_linear

    for n, lin in linears.items():
        sk = sinks.get(n)
        res = method.quantize_linear(ctx, n, lin, sk.stats if sk is not None else None)
        new = res.layer
        rows = sk.rows.tensor() if sk is not None else None                # [n_rows, in] for the report
        report.layers.append(LayerReport(
            block=ctx.index, name=n, kind=type(new).__name__, fp16_bytes=_fp16_bytes(lin),
            stored_bytes=_stored_bytes(new), format_bytes=_format_bytes(new),
            weight_rel_err=_weight_rel_err(lin, new),
            output_rel_mse=_output_rel_mse(lin, new, rows) if rows is not None else None,
            extra=dict(res.extra)))
        swap_linear(ctx.block, n, new)


def _whole_block(ctx: BlockContext, method, xs, report):
    """Statistics from whole-block passes (one per group); returns the quantized block's outputs (or None)."""
    layout = ctx.layout
    groups = layout.sequential if method.true_sequential else (layout.linears,)
    targets = None
    for gi, group in enumerate(groups):
        linears = _named_linears(ctx.block, group)
        sinks = {}
        if xs is not None:
            sinks, hooked = _sinks(ctx, method, linears)
            full = gi == 0 and method.needs_targets   # the float block's outputs are wanted
            handles = _hook_inputs(hooked, sinks)
            out = ctx.run(xs, stop_after=None if full else linears)
            for h in handles:
                h.remove()
            if full:
                targets = out                          # the float block's outputs [N, S, d]
        _quantize_group(ctx, method, linears, sinks, report)
    if xs is None:
        return None
    report.add_block(ctx.index, method.finish_block(ctx, xs if method.needs_inputs else None, targets))
    return ctx.run(xs)                                                    # quantized outputs [N, S, d]


def _staged_block(ctx: BlockContext, method, xs, report):
    """True-sequential statistics one residual stage at a time (layout.stages): a group's pass runs only
    its stage, from that stage's quantized input, and stops after the group. When a stage's last group is
    its output Linear alone, that pass also captures the Linear's inputs, so the stage output is
    x + Linear(captured) and attention runs once for its statistics and never again."""
    block, layout, b = ctx.block, ctx.layout, ctx.batch
    targets = ctx.run(xs) if method.needs_targets else None
    h, start = xs, 0                                                      # h: the current stage's input
    for fn_name, out_name in layout.stages:
        end = layout.linears.index(out_name) + 1
        stage, names, start = getattr(block, fn_name), set(layout.linears[start:end]), end
        capture = None
        for group in (g for g in layout.sequential if set(g) <= names):
            linears = _named_linears(block, group)
            sinks, hooked = _sinks(ctx, method, linears)
            # the buffer is [N, S, in]: only when that is no bigger than the hidden states themselves
            if group == (out_name,) and linears[out_name].in_features <= h.shape[-1]:
                capture = sinks[out_name].capture = InputCapture(h.shape[0])
            handles = _hook_inputs(hooked, sinks)
            ctx.run(h, fn=stage, stop_after=linears)
            for hd in handles:
                hd.remove()
            _quantize_group(ctx, method, linears, sinks, report)
        if capture is None:
            h = ctx.run(h, fn=stage)                                      # [N, S, d]
            continue
        out_linear, buf = block.get_submodule(out_name), capture.buf       # buf [N, S, in]
        y = torch.empty_like(h) if (h is xs and method.needs_inputs) else h   # else in place: h is not read again
        with torch.no_grad():
            for j in range(0, h.shape[0], b):   # the runner's batch, so the sums are a whole pass's
                r = h[j: j + b].to(ctx.device) + out_linear(buf[j: j + b].to(ctx.device))
                y[j: j + b] = r.to(y.device)
        h = y
    report.add_block(ctx.index, method.finish_block(ctx, xs if method.needs_inputs else None, targets))
    return h                                                              # quantized outputs [N, S, d]


def quantize_model(model, method, windows: torch.Tensor | None = None, device: str | None = None,
                   progress: bool = True) -> QuantReport:
    """Quantize every block Linear of `model` in place with `method`; windows [N, S] are calibration data."""
    from tqdm.auto import tqdm

    from lowbit.errors import LowbitError

    if method.needs_calibration and windows is None:
        raise LowbitError(f"--method {method.name} needs calibration data: pass --calib FILE")
    layout = model.arch.layout
    device = check_device(device or str(model.device))
    blocks = model.get_submodule(layout.blocks)
    report = QuantReport(method=method.describe())
    t0 = time.perf_counter()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    xs, kw = block_inputs(model, windows) if windows is not None else (None, None)
    staged = method.true_sequential and bool(layout.stages) and xs is not None
    bar = tqdm(range(len(blocks)), desc=f"quantize {method.name}", unit="block", disable=not progress)
    for i in bar:
        block = blocks[i]
        home = next(block.parameters()).device
        block.to(device)
        if kw is not None:
            kw = {k: v.to(device) for k, v in kw.items()}
        ctx = BlockContext(index=i, block=block, arch=model.arch, device=device, rope=kw)
        if xs is not None:   # function-preserving (scale folding) or nothing
            report.add_block(i, method.prepare_block(ctx, xs))
        walk = _staged_block if staged else _whole_block
        xs = walk(ctx, method, xs, report)                                # quantized outputs feed the next block
        block.to(home)
        last = report.layers[-len(layout.linears):]
        bar.set_postfix(err=f"{sum(r.output_rel_mse or r.weight_rel_err for r in last) / len(last):.2e}")
    report.seconds = time.perf_counter() - t0
    if device.startswith("cuda"):
        report.peak_memory_bytes = torch.cuda.max_memory_allocated()
    else:
        import resource  # peak resident set of the whole process (Linux reports KiB)
        report.peak_memory_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return report
