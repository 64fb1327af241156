"""One request as the engine sees it: its tokens, sampling params, status, generator and timing."""
from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from lowbit.config import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"      # queued (new, or preempted and waiting to be recomputed)
    RUNNING = "running"      # holds blocks; prefilling (maybe in chunks) or decoding
    FINISHED = "finished"


_arrival_counter = itertools.count()


class TokenLogprob(NamedTuple):
    """A generated token's log-probability under the model (before temperature / top-k / top-p) and the
    `SamplingParams.logprobs` most likely tokens at that position, best first."""
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


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
    output_logprobs: list[TokenLogprob] = field(default_factory=list)   # one per output id (params.logprobs)
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
    index: int = 0                       # which of the request's n completions this is
    # n > 1: the other completions, not yet forked; forked off this one when its prompt's prefill ends
    children: list[Sequence] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.prompt_ids = list(self.prompt_ids)

    @property
    def seq_id(self):
        """Block-manager key: the request id for the first completion, (request_id, index) for the others."""
        return self.request_id if self.index == 0 else (self.request_id, self.index)

    def get_generator(self, device: torch.device) -> torch.Generator | None:
        """The sequence's own RNG (seeded from params.seed on first use, on the logits' device), or None.
        Completion i > 0 of an n > 1 request gets a seed derived from (seed, i), so the n differ."""
        if self.generator is None and self.params.seed is not None:
            seed = self.params.seed
            if self.index:
                seed = (seed * 0x9E3779B97F4A7C15 + self.index * 0xBF58476D1CE4E5B9) % (2 ** 63)
            self.generator = torch.Generator(device=device).manual_seed(seed)
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
