"""CPU threads that give way when the machine is busy: the OpenMP wait policy the CLI starts with.

torch's CPU kernels run on an OpenMP team of `torch.get_num_threads()` threads (the cores, by
default). Between parallel regions the idle threads spin before they sleep; GNU OpenMP's default
spin (`GOMP_SPINCOUNT` 300000, a few milliseconds) is what makes a small model fast on idle cores
and slow beside another busy process: the spinning threads compete with it for a core, and each of
the many small parallel regions of a training step waits for a thread that is not running. Not
spinning at all (`OMP_WAIT_POLICY=PASSIVE`) keeps most of the speed under load but pays a wake-up
on every region when the cores are idle.

So `samadapt` starts with a short spin, `GOMP_SPINCOUNT=3000` (GNU OpenMP, which torch's Linux
wheels use; tens of microseconds), and `KMP_BLOCKTIME=0` (LLVM and Intel OpenMP, as on macOS: the
passive equivalent, not measured here), set before torch (and with it the OpenMP runtime, which
reads them once when it loads) is imported, unless the user has chosen a wait policy themselves
(`OMP_WAIT_POLICY`, `GOMP_SPINCOUNT` or `KMP_BLOCKTIME` set). The tiny core's demo training on the
2-core machine of benchmarks/RESULTS.md (`cpu_encoder.py threads`, steps/s idle / beside one busy
process): OpenMP's default 7.80 / 0.97, passive 5.08 / 3.98, active 7.96 / 2.55, 3000 spins
6.79 / 3.22 -- 0.85 of the best idle rate and 0.81 of the best busy one, where passive and active
each keep only 0.64 on their weak side.

The knobs: `OMP_WAIT_POLICY=ACTIVE samadapt ...` (dedicated cores), `OMP_WAIT_POLICY=PASSIVE`
(cores shared with other heavy work), `GOMP_SPINCOUNT=N` for anything between, and
`OMP_NUM_THREADS=N` for the thread count. Library users set the same variables before importing
torch. This module imports nothing heavy.
"""
import os
import sys
from typing import MutableMapping, Optional

__all__ = ["SETTINGS", "USER_KNOBS", "configure_openmp", "openmp_summary"]

USER_KNOBS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
# spins before an idle GNU OpenMP thread sleeps (about 30 microseconds by the runtime's own estimate of
# 100000 spins per millisecond), and the LLVM/Intel runtime's passive equivalent
SETTINGS = {"GOMP_SPINCOUNT": "3000", "KMP_BLOCKTIME": "0"}


def configure_openmp(environ: Optional[MutableMapping[str, str]] = None) -> Optional[str]:
    """Set a short OpenMP spin (`SETTINGS`) unless the user chose a wait policy, while it can still apply.

    Args:
        environ: the environment to change (None: `os.environ`, which child processes inherit).

    Returns:
        The settings made (`"GOMP_SPINCOUNT=3000 KMP_BLOCKTIME=0"`), or None when nothing was set:
        the user chose a policy, or torch is already imported in this process (the OpenMP runtime
        has read its settings then).

    Example:
        >>> env = {}
        >>> configure_openmp(env), env
        ('GOMP_SPINCOUNT=3000 KMP_BLOCKTIME=0', {'GOMP_SPINCOUNT': '3000', 'KMP_BLOCKTIME': '0'})
        >>> configure_openmp({"OMP_WAIT_POLICY": "ACTIVE"}) is None
        True
    """
    env = os.environ if environ is None else environ
    if any(env.get(k) for k in USER_KNOBS):
        return None
    if environ is None and "torch" in sys.modules:
        return None  # too late for this process; setting it would only mislead child processes' logs
    env.update(SETTINGS)
    return " ".join(f"{k}={v}" for k, v in SETTINGS.items())


def openmp_summary() -> str:
    """`2 threads, GOMP_SPINCOUNT=3000` (threads as torch has them now; the wait setting as set).

    Example:
        >>> "thread" in openmp_summary()
        True
    """
    import torch

    policy = next((f"{k}={os.environ[k]}" for k in USER_KNOBS if os.environ.get(k)), "OpenMP's default wait policy")
    n = torch.get_num_threads()
    return f"{n} thread{'s' if n != 1 else ''}, {policy}"
