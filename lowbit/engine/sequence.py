"""One request as the engine sees it: its tokens, sampling params, status, generator and timing."""
from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

import torch

from lowbit.config import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"      # queued (new, or preempted and waiting to be recomputed)
    RUNNING = "running"      # holds blocks; prefilling (maybe in chunks) or decoding
    FINISHED = "finished"


_arrival_counter = itertools.count()


@dataclass(eq=False)
class Sequence:
    """A request. `token_ids` = prompt + output; `num_computed` of them have their KV in the paged cache.

    After preemption `num_computed` drops to 0 and the whole of `token_ids` (generated tokens included)
    is prefilled again ("recompute"); the output list is kept, so the user sees no difference.
    """

    request_id: int
    prompt_ids: list[int]
    params: SamplingParams
    prompt: str | None = None
    output_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None     # "eos" | "stop" | "length" | "abort"
    num_computed: int = 0
    num_preemptions: int = 0
    text: str = ""
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finish_time: float | None = None
    order: int = field(default_factory=lambda: next(_arrival_counter))  # FIFO / preemption priority
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        self.prompt_ids = list(self.prompt_ids)

    def get_generator(self, device: torch.device) -> torch.Generator | None:
        """The request's own RNG (seeded from params.seed on first use, on the logits' device), or None."""
        if self.generator is None and self.params.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(self.params.seed)
        return self.generator

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    @property
    def num_uncomputed(self) -> int:
        return len(self) - self.num_computed
