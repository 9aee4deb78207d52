"""Learning-rate schedule (pure). Step numbers start at 1: the first step already learns.

Megatron's scheduler evaluated at step 0 gives lr 0 to the first optimizer step under warmup
(one of the public SAMI code's defects); here step s of a w-step warmup uses lr * s / w.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_sami.errors import ConfigError


@dataclass
class LRSchedule:
    lr: float = 5e-7
    min_lr: float = 0.0
    warmup_steps: int = 0
    decay: str = "constant"  # constant | cosine | linear

    def __post_init__(self) -> None:
        if self.decay not in ("constant", "cosine", "linear"):
            raise ConfigError(f"lr_schedule.decay '{self.decay}' is unknown; use constant, cosine or linear.")
        if self.warmup_steps < 0 or self.lr < 0 or not 0 <= self.min_lr <= self.lr:
            raise ConfigError("lr_schedule needs warmup_steps >= 0 and 0 <= min_lr <= lr.")

    def at(self, step: int, total_steps: int) -> float:
        """Learning rate of optimizer step ``step`` (1-based) out of ``total_steps``."""
        if self.warmup_steps and step <= self.warmup_steps:
            return self.lr * step / self.warmup_steps
        if self.decay == "constant" or total_steps <= self.warmup_steps:
            return self.lr
        progress = (step - self.warmup_steps) / max(1, total_steps - self.warmup_steps)
        if self.decay == "linear":
            shape = 1.0 - progress
        else:
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr + (self.lr - self.min_lr) * shape
