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
    """The shape of the learning rate over a run; the peak is ``optimizer.lr`` (one knob)."""

    min_lr: float = 0.0
    warmup_steps: int = 0
    decay: str = "constant"  # constant | cosine | linear

    def __post_init__(self) -> None:
        if self.decay not in ("constant", "cosine", "linear"):
            raise ConfigError(f"lr_schedule.decay '{self.decay}' is unknown; use constant, cosine or linear.")
        if self.warmup_steps < 0 or self.min_lr < 0:
            raise ConfigError("lr_schedule needs warmup_steps >= 0 and min_lr >= 0.")

    def check_peak(self, peak_lr: float) -> None:
        """Raises ConfigError when ``min_lr`` exceeds the peak learning rate ``peak_lr``."""
        if self.min_lr > peak_lr:
            raise ConfigError(f"lr_schedule.min_lr={self.min_lr} exceeds the peak optimizer.lr={peak_lr}; "
                              "lower min_lr or raise optimizer.lr.")

    def at(self, step: int, total_steps: int, peak_lr: float) -> float:
        """Learning rate of optimizer step ``step`` (1-based) out of ``total_steps``, for the peak
        ``peak_lr`` (``optimizer.lr``): linear warmup, then constant, cosine or linear decay to
        ``min_lr``. Same unit as ``peak_lr``."""
        if self.warmup_steps and step <= self.warmup_steps:
            return peak_lr * step / self.warmup_steps
        if self.decay == "constant" or total_steps <= self.warmup_steps:
            return peak_lr
        progress = (step - self.warmup_steps) / max(1, total_steps - self.warmup_steps)
        if self.decay == "linear":
            shape = 1.0 - progress
        else:
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr + (peak_lr - self.min_lr) * shape
