"""The parts of a training loop that image runs (`train`) and volume runs (`volumes`) share: the epoch
sampler, the asynchronous copy of a batch to the device, the non-finite-loss watch that reads nothing
back between log steps, and the measured step rate.
"""
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch.utils.data import Sampler

from .errors import TrainingError


class EpochSampler(Sampler):
    """A permutation that depends only on (seed, epoch).

    Example:
        >>> s = EpochSampler(5, seed=0); s.set_epoch(1); sorted(s) == list(range(5))
        True
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True) -> None:
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        """Pick the permutation of `epoch`."""
        self.epoch = epoch

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self):
        return self.n


def to_device(x: Any, device: torch.device) -> Any:
    """Copy a tensor, or a batch's tensors, to `device` asynchronously (the loader pins its batches on
    CUDA); other values pass through.

    Example:
        >>> b = to_device({"mask": torch.ones(1, 1, 2, 2), "name": ["a"]}, torch.device("cpu"))
        >>> b["mask"].device.type, b["name"]
        ('cpu', ['a'])
    """
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    return x.to(device, non_blocking=True) if torch.is_tensor(x) else x


class LossWatch:
    """Non-finite losses noticed without reading anything back from the device at every step.

    `see(loss, step)` keeps, on the loss's device, the first step whose loss was not finite and that
    loss; `check(last_good)` reads it (one synchronisation) and raises. The loop checks before it logs,
    writes a checkpoint, evaluates or exports, and at the end, so a non-finite step is reported with
    its own step number and no file is written from the state it left behind.

    Example:
        >>> w = LossWatch()
        >>> w.see(torch.tensor(0.5), 0); w.see(torch.tensor(float("nan")), 1); w.see(torch.tensor(1.0), 2)
        >>> try:
        ...     w.check(None)
        ... except TrainingError as e:
        ...     print(str(e).split(";")[0])
        loss became nan at step 1
    """

    def __init__(self) -> None:
        self.first: Optional[torch.Tensor] = None  # step of the first non-finite loss, -1 while none
        self.value: Optional[torch.Tensor] = None

    def see(self, loss: torch.Tensor, step: int) -> None:
        """Note this step's loss (a few kernels on its device, no synchronisation)."""
        loss = loss.detach().float()
        if self.first is None:
            self.first = torch.full((), -1, dtype=torch.int64, device=loss.device)
            self.value = torch.zeros((), dtype=torch.float32, device=loss.device)
        new = (self.first < 0) & ~torch.isfinite(loss)
        self.first = torch.where(new, step, self.first)
        self.value = torch.where(new, loss, self.value)

    def check(self, last_good: Optional[Path]) -> None:
        """Raise `TrainingError` when a loss seen so far was not finite (reads one value back)."""
        if self.first is None or int(self.first) < 0:
            return
        kept = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
        raise TrainingError(f"loss became {float(self.value)} at step {int(self.first)}; {kept}; "
                            "lower train.lr or check the data")


class StepRate:
    """The training rate, data loading included: images per second between synchronisation points the
    loop has anyway (its log steps), leaving out the first `warmup` steps (compilation, cudnn's autotune)
    and any span in which it evaluated or wrote a checkpoint.

    Example:
        >>> r = StepRate(images_per_step=4, warmup=1)
        >>> r.mark(1, 0.0); r.mark(3, 1.0); r.mark(5, 2.0); r.result()
        {'images_per_s': 8.0, 'steps': 4, 'seconds': 2.0, 'warmup_steps': 1}
        >>> r.pause(); r.mark(7, 9.0); r.mark(9, 10.0); r.result()["images_per_s"]
        8.0
    """

    def __init__(self, images_per_step: int, warmup: int = 5) -> None:
        self.images_per_step, self.warmup = images_per_step, warmup
        self.at: Optional[tuple] = None  # (step, time) of the last mark
        self.steps, self.seconds = 0, 0.0

    def mark(self, step: int, now: Optional[float] = None) -> None:
        """A synchronisation point after `step` optimizer steps."""
        now = time.perf_counter() if now is None else now
        if step < self.warmup:
            return
        if self.at is not None and step > self.at[0]:
            self.steps += step - self.at[0]
            self.seconds += now - self.at[1]
        self.at = (step, now)

    def pause(self) -> None:
        """The loop did something else (evaluation, a checkpoint): the next span starts at the next mark."""
        self.at = None

    def result(self) -> Dict[str, Any]:
        """`images_per_s`, over `steps` steps and `seconds` seconds (empty when no span was timed)."""
        if not self.steps or self.seconds <= 0:
            return {}
        return {"images_per_s": round(self.steps * self.images_per_step / self.seconds, 3), "steps": self.steps,
                "seconds": round(self.seconds, 6), "warmup_steps": self.warmup}
