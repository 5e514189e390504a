"""The training order: one seeded permutation per epoch, dealt to the ranks, resumable part-way.

The order of epoch e is a function of (seed, e) alone, as DistributedSampler's: rank r of w takes
every w-th index, so the global batch of a step holds the same samples whatever w is. A resumed
run starts the epoch after the samples already trained on (`set_position`), with any number of
ranks: the rest of the permutation is dealt to them the same way.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler[int]):
    def __init__(self, size: int, rank: int, world_size: int, seed: int) -> None:
        self.size = size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.epoch = 0
        self.start = 0

    def set_position(self, epoch: int, start: int = 0) -> None:
        """Iterate epoch `epoch` from its `start`-th sample (0: the whole epoch)."""
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()[self.start :]
        # Pad by repeating the start of the order, as DistributedSampler does, so every rank takes as many.
        short = len(self) * self.world_size - len(order)
        order += (order * math.ceil(short / max(1, len(order))))[:short]
        return iter(order[self.rank :: self.world_size])

    def __len__(self) -> int:
        return math.ceil((self.size - self.start) / self.world_size)
