"""Distributed training through Accelerate: the accelerator a launch asks for, what formed, and the
strategy-independent pieces (full parameters, optimizer state by name) that checkpoints and exports need.

What `accelerate launch --config_file recipes/configs/accelerate/{ddp,fsdp2}.yaml` does on a machine
without GPUs (Accelerate 1.15, torch 2.14; tests/test_distributed.py runs each):

* a `MULTI_GPU` or `FSDP` config goes through `torch.distributed.run` (torchrun) and starts
  `num_processes` processes; `MULTI_CPU` and `--cpu` go through Accelerate's simple launcher, which
  starts ONE process whatever `--num_processes` says (the launcher expects mpirun or one launch per node);
* the launched processes do not learn the config's `use_cpu`, and without a GPU `Accelerator()` then
  forms no group at all (`DistributedType.NO`: each process trains alone on all the data). `build_accelerator`
  passes `cpu=True` when there is no CUDA device, so the processes form a `MULTI_CPU` group over gloo;
* Accelerate builds FSDP only on accelerator devices: on CPU an FSDP config becomes `MULTI_CPU`, i.e.
  plain DDP. `build_accelerator` turns it back into FSDP2 (torch's `fully_shard` runs on CPU over gloo);
  FSDP1 does not run on CPU (torch's FSDP1 refuses Accelerate's `device_id` there) and is refused with
  the fix.
"""
import contextlib
import os
import signal
from datetime import timedelta
from typing import Any, Dict, Iterator, Optional

import torch
from torch import nn

from .errors import TrainingError

TIMEOUT_ENV = "SAMADAPT_DIST_TIMEOUT"  # seconds a collective may wait for a silent peer
DEFAULT_TIMEOUT_S = 600.0


def group_timeout() -> timedelta:
    """How long a process waits in a collective for another process before it fails (`SAMADAPT_DIST_TIMEOUT`
    seconds, default 600): a peer that hangs (or a node that vanished without closing its sockets) ends
    the run with an error instead of a hang.

    Example:
        >>> import os
        >>> os.environ.pop("SAMADAPT_DIST_TIMEOUT", None) and None
        >>> group_timeout().total_seconds()
        600.0
    """
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        seconds = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise TrainingError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds; set e.g. {TIMEOUT_ENV}=600") from None
    if seconds <= 0:
        raise TrainingError(f"{TIMEOUT_ENV}={raw!r} must be positive; set e.g. {TIMEOUT_ENV}=600")
    return timedelta(seconds=seconds)


def build_accelerator(**kwargs):
    """The run's `Accelerator`, forming the group the launch asked for (see the module docstring).

    Args:
        **kwargs: passed to `accelerate.Accelerator` (mixed precision, accumulation, logging, ...).

    Returns:
        The accelerator; `describe(accelerator)` says what formed.

    Raises:
        TrainingError: FSDP1 was asked for on CPU.
    """
    from accelerate import Accelerator
    from accelerate.utils import (
        DistributedDataParallelKwargs,
        DistributedType,
        FullyShardedDataParallelPlugin,
        InitProcessGroupKwargs,
    )

    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    if fsdp and cpu and os.environ.get("FSDP_VERSION", "1") == "1":
        raise TrainingError("FSDP1 (fsdp_version: 1) does not run on CPU; launch with "
                            "--config_file recipes/configs/accelerate/fsdp2.yaml (or ddp.yaml) instead")
    handlers = list(kwargs.pop("kwargs_handlers", []))
    handlers.append(InitProcessGroupKwargs(timeout=group_timeout()))
    # which trainable tensors a step reaches depends on the recipe (the IoU head without an IoU loss term,
    # the multimask tokens without multimask): DDP must not wait for gradients that never come
    handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    from accelerate.state import AcceleratorState

    # AcceleratorState is a process-wide singleton that refuses a second run's other mixed precision
    # ("restart your runtime"): a Python caller (a notebook, a comparison) trains several recipes in one
    # process, so each run starts from a fresh state; the process group (PartialState) is kept.
    AcceleratorState._reset_state()
    accelerator = Accelerator(cpu=cpu, kwargs_handlers=handlers, **kwargs)
    if fsdp and accelerator.distributed_type == DistributedType.MULTI_CPU:
        # Accelerate's FSDP branch is for accelerator devices only; on CPU it silently falls back to
        # DDP. FSDP2 (fully_shard over gloo) runs on CPU, so put back what the launch asked for.
        # (PartialState too: every later AcceleratorState() copies its distributed_type back)
        from accelerate import PartialState

        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()
        PartialState().distributed_type = DistributedType.FSDP
        accelerator.state.distributed_type = DistributedType.FSDP
    return accelerator


def strategy(accelerator, model: Optional[nn.Module] = None) -> str:
    """`single`, `ddp`, `fsdp1`, `fsdp2` or Accelerate's own name for anything else (e.g. `deepspeed`).

    Args:
        accelerator: the run's accelerator.
        model: the prepared model: when given, what wraps it decides (what really happened), not the state.
    """
    from accelerate.utils import DistributedType
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.nn.parallel import DistributedDataParallel

    if model is not None:
        if is_fsdp2(model):
            return "fsdp2"
        if isinstance(model, FullyShardedDataParallel):
            return "fsdp1"
        if isinstance(model, DistributedDataParallel):
            return "ddp"
    kind = accelerator.distributed_type
    if kind == DistributedType.NO:
        return "single"
    if kind == DistributedType.FSDP:
        return f"fsdp{accelerator.state.fsdp_plugin.fsdp_version}"
    if str(kind.value).startswith("MULTI_"):
        return "ddp"
    return str(kind.value).lower()


def describe(accelerator, model: Optional[nn.Module] = None) -> Dict[str, Any]:
    """What formed, from Accelerate's state: `{strategy, num_processes, num_machines}` (machines from the
    launcher's `LOCAL_WORLD_SIZE`: processes on this machine) plus the `backend` (gloo, nccl, or None).

    Args:
        accelerator: the run's accelerator.
        model: the prepared model (see `strategy`).

    Example:
        >>> from accelerate import Accelerator
        >>> d = describe(Accelerator(cpu=True))
        >>> d["strategy"], d["num_processes"], d["num_machines"]
        ('single', 1, 1)
    """
    n = accelerator.num_processes
    local = int(os.environ.get("LOCAL_WORLD_SIZE", n) or n)
    return {"strategy": strategy(accelerator, model), "num_processes": n,
            "num_machines": max(1, n // max(1, local)), "backend": getattr(accelerator.state, "backend", None)}


def is_fsdp2(model: nn.Module) -> bool:
    """Whether `model` (the prepared model) is sharded by torch's FSDP2 (`fully_shard`)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def full_parameters(model: nn.Module) -> Iterator[None]:
    """Inside, every parameter of the prepared `model` is the full tensor on every process, under its own
    name: FSDP2 unshards (all-gathers) the sharded DTensors and reshards on exit; DDP and single-process
    models already hold full tensors. What evaluates, exports and checkpoints runs inside it, so a saved
    adapter never holds one rank's shard. Every process must enter it (it is a collective).

    Args:
        model: the prepared model (`accelerator.prepare`).
    """
    from torch.distributed.fsdp import FSDPModule

    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]  # each wrapped block has its own group
    for m in sharded:
        m.unshard()
    try:
        yield
    finally:
        for m in sharded:
            m.reshard()


def optimizer_state(model: nn.Module, optimizer) -> Dict[str, Any]:
    """The optimizer's state as full tensors keyed by parameter name (torch's `get_optimizer_state_dict`),
    the same under every strategy: a DDP checkpoint resumes under FSDP2 and back. A collective: every
    process calls it; with more than one process only rank 0 receives the state (`{}` elsewhere).

    Args:
        model: the prepared model.
        optimizer: the torch optimizer (Accelerate's wrapper unwrapped).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    opts = StateDictOptions(full_state_dict=True, cpu_offload=distributed)
    return get_optimizer_state_dict(model, optimizer, options=opts)


def load_optimizer_state(model: nn.Module, optimizer, state: Dict[str, Any]) -> None:
    """Load `optimizer_state`'s result into the optimizer of `model`, sharding it as this run's strategy
    does. With more than one process only rank 0 needs `state` (it is broadcast from there).

    Args:
        model: the prepared model.
        optimizer: the torch optimizer.
        state: the state by parameter name (`{}` on ranks other than 0 of a group).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    # not strict: a trainable parameter that never got a gradient (e.g. a head no loss term reaches) has
    # no state in the uninterrupted run either (AdamW creates it at the first step with a gradient)
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=distributed, strict=False)
    set_optimizer_state_dict(model, optimizer, state, options=opts)


PEER_FAILURE_WORDS = ("connection", "closed", "timed out", "timeout", "gloo", "nccl", "broken pipe", "reset by peer")


def is_peer_failure(e: BaseException) -> bool:
    """Whether `e` is how a collective fails when another process died or hangs (a closed socket, a
    timeout), as opposed to a bug in this process.

    Example:
        >>> is_peer_failure(RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer"))
        True
        >>> is_peer_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
        False
    """
    if isinstance(e, torch.distributed.DistError):
        return True
    text = str(e).lower()
    return any(w in text for w in PEER_FAILURE_WORDS)


@contextlib.contextmanager
def peer_failures(accelerator, last_good) -> Iterator[None]:
    """Turn the ways a run ends when another process of the group dies into one `TrainingError` line:
    the launcher's SIGTERM (torchrun stops the others when one exits) and a collective that fails or
    times out (`SAMADAPT_DIST_TIMEOUT`). The message names the last good checkpoint and `--resume`.

    Args:
        accelerator: the run's accelerator (nothing changes for a single process).
        last_good: called to get the last good checkpoint (a path or None).
    """
    if accelerator.num_processes == 1:
        yield
        return

    def message(what: str) -> str:
        ck = last_good()
        kept = f"the last good checkpoint is {ck}; relaunch with --resume" if ck else "no checkpoint was written yet"
        return f"process {accelerator.process_index} stopped: {what}; {kept}"

    def on_sigterm(signum, frame):
        raise TrainingError(message("the launcher sent SIGTERM (another process of the group failed)"))

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    except TrainingError:
        raise
    except (RuntimeError, OSError) as e:
        if not is_peer_failure(e):  # a bug of this process: its own traceback, not a peer's story
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise TrainingError(message(f"a collective failed ({first})")) from e
    finally:
        signal.signal(signal.SIGTERM, previous)
