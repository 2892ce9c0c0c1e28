"""CPU threads that give way when the machine is busy: the OpenMP wait policy the CLI starts with.

torch's CPU kernels run on an OpenMP team of `torch.get_num_threads()` threads (the cores, by
default). Between parallel regions the idle threads of GNU OpenMP spin before they sleep. When
another process is busy on one of the cores, the spinning threads compete with it for that core
and each of the many small parallel regions of a training step waits for a thread that is not
running: the tiny core's demo training slows many-fold. With `OMP_WAIT_POLICY=PASSIVE` the idle
threads sleep at once and the run keeps most of its speed (benchmarks/cpu_encoder.py `threads`;
the measured figures are in benchmarks/RESULTS.md).

So `samadapt` sets `OMP_WAIT_POLICY=PASSIVE` when it starts, before torch (and with it the OpenMP
runtime, which reads the variable once when it loads) is imported, unless the user has chosen a
wait policy themselves (`OMP_WAIT_POLICY`, `GOMP_SPINCOUNT` or `KMP_BLOCKTIME` set). The knob:
`OMP_WAIT_POLICY=ACTIVE samadapt ...` restores spinning (a little faster on cores nothing else
uses), and `OMP_NUM_THREADS=N` sets the thread count. Library users set the same variables before
importing torch. This module imports nothing heavy.
"""
import os
import sys
from typing import MutableMapping, Optional

__all__ = ["USER_KNOBS", "configure_openmp", "openmp_summary"]

USER_KNOBS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def configure_openmp(environ: Optional[MutableMapping[str, str]] = None) -> Optional[str]:
    """Set `OMP_WAIT_POLICY=PASSIVE` unless the user chose a wait policy, while it can still apply.

    Args:
        environ: the environment to change (None: `os.environ`, which child processes inherit).

    Returns:
        The policy set (`"PASSIVE"`), or None when nothing was set: the user chose one, or torch
        is already imported in this process (the OpenMP runtime has read its settings then).

    Example:
        >>> env = {}
        >>> configure_openmp(env), env
        ('PASSIVE', {'OMP_WAIT_POLICY': 'PASSIVE'})
        >>> configure_openmp({"OMP_WAIT_POLICY": "ACTIVE"}) is None
        True
    """
    env = os.environ if environ is None else environ
    if any(env.get(k) for k in USER_KNOBS):
        return None
    if environ is None and "torch" in sys.modules:
        return None  # too late for this process; setting it would only mislead child processes' logs
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    return "PASSIVE"


def openmp_summary() -> str:
    """`2 threads, OMP_WAIT_POLICY=PASSIVE` (threads as torch has them now; the policy as set).

    Example:
        >>> "thread" in openmp_summary()
        True
    """
    import torch

    policy = next((f"{k}={os.environ[k]}" for k in USER_KNOBS if os.environ.get(k)), "OpenMP's default wait policy")
    n = torch.get_num_threads()
    return f"{n} thread{'s' if n != 1 else ''}, {policy}"
