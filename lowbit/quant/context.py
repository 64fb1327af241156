"""What a method's hooks see of the block being quantized (BlockContext), and the one block runner.

The walk makes one BlockContext per decoder block and hands it to every hook of that block; a method runs
the block, one of its stages or a module of it over calibration hidden states through `ctx.run`, in the
walk's batches, instead of a batched forward of its own.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

BATCH = 8   # calibration windows per forward of a block (or stage)


class _Stop(Exception):
    """Raised by a hook once the Linears a pass is for have all run: the rest of the block is not needed."""


@torch.no_grad()
def run_block(block: nn.Module | None, xs: torch.Tensor, kw: dict | None, device, batch: int = BATCH,
              stop_after: dict[str, nn.Module] | None = None, fn=None) -> torch.Tensor | None:
    """The block (or fn(x, cos, sin), one of its stages or modules) over hidden states xs [N, S, d],
    `batch` windows at a time, each batch moved to `device`; kw: the RoPE tables {"cos", "sin"} for `batch`
    windows (None: fn gets cos = sin = None). Outputs [N, S, d'] are written where xs lives.

    stop_after: a statistics pass only needs these modules' inputs, so each batch stops once they have all
    run (the statistics are the same as a full pass's; a true-sequential GPTQ pass for q/k/v then costs
    almost nothing instead of a whole block). Returns None then."""
    ran: set[str] = set()
    handles = []
    for name, mod in (stop_after or {}).items():
        def hook(_m, _args, _out, _name=name):
            ran.add(_name)
            if len(ran) == len(stop_after):
                raise _Stop
        handles.append(mod.register_forward_hook(hook))
    out = None
    try:
        for i in range(0, xs.shape[0], batch):
            x = xs[i: i + batch].to(device)                              # [b, S, d]
            cos, sin = (kw["cos"][: x.shape[0]], kw["sin"][: x.shape[0]]) if kw is not None else (None, None)
            ran.clear()
            try:
                y = (fn or block)(x, cos, sin)
            except _Stop:
                continue
            if out is None:  # written in place: peak memory is xs and one output, not a list plus its cat
                out = torch.empty((xs.shape[0], *y.shape[1:]), dtype=y.dtype, device=xs.device)
            out[i: i + y.shape[0]] = y
    finally:
        for h in handles:
            h.remove()
    return out if not stop_after else None                               # [N, S, d']


def sum_sq_err(out: torch.Tensor, ref: torch.Tensor, batch: int = BATCH) -> float:
    """Σ (out - ref)² over [N, ...] tensors, summed in float32 one `batch` of rows at a time (as the
    runner produced them) and in Python floats across batches, so long runs keep their precision."""
    return sum((out[i: i + batch].float() - ref[i: i + batch].float()).pow(2).sum().item()
               for i in range(0, out.shape[0], batch))


@dataclass
class BlockContext:
    """One decoder block as a method's hooks see it; the walk makes one per block."""

    index: int                          # the block's position in the model (0 = first)
    block: nn.Module
    arch: Any                           # the model's lowbit.models.arch.Arch (model.arch): layout, attention, norms
    device: Any = "cpu"                 # where the block runs
    rope: dict | None = None            # RoPE tables {"cos", "sin"} [batch, S, head_dim] on the device
    batch: int = BATCH                  # calibration windows per forward
    scratch: dict = field(default_factory=dict)   # a method's notes from one hook of this block to the next

    @property
    def layout(self):
        """The block's BlockLayout (its Linears, input groups, sequential groups, residual stages)."""
        return self.arch.layout

    def run(self, xs: torch.Tensor, fn=None, stop_after: dict[str, nn.Module] | None = None):
        """run_block of this block (or fn(x, cos, sin)) over xs [N, S, d] -> outputs [N, S, d'] where xs
        lives (None with stop_after)."""
        return run_block(self.block, xs, self.rope, self.device, self.batch, stop_after, fn)
