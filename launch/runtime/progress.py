"""Rank-0 progress bars: throughput in images per second and an ETA."""
from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm


class TrainProgress:
    """Counts images, so tqdm's rate reads img/s and its ETA covers the remaining steps."""

    def __init__(self, *, enabled: bool, start_step: int, max_steps: int, images_per_step: int, desc: str):
        self.images_per_step = images_per_step
        self._bar = None
        if enabled:
            self._bar = tqdm(total=max_steps * images_per_step, initial=start_step * images_per_step,
                             unit="img", unit_scale=True, desc=desc, dynamic_ncols=True, file=sys.stderr,
                             smoothing=0.1, mininterval=1.0)

    def update(self, step: int, **postfix: Any) -> None:
        if self._bar is None:
            return
        self._bar.update(self.images_per_step)
        if postfix:
            self._bar.set_postfix({"step": step, **{k: (f"{v:.4g}" if isinstance(v, float) else v)
                                                   for k, v in postfix.items()}}, refresh=False)

    def write(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def task_bar(total: int, desc: str, unit: str = "it", enabled: bool = True):
    """A plain progress bar for one-pass work (precompute, sampling, evaluation)."""
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr, disable=not enabled,
                mininterval=1.0)
