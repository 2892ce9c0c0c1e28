"""Which share of a job this process does when a launcher started several (`accelerate launch
--num_processes N`, torchrun, mpirun): inputs are split by position, so every process derives the
same split from the same input list, with nothing exchanged between them.

`samadapt predict` uses it: output names are decided over the whole input list first (so two inputs
of one stem in different shares still get different names), then each process predicts and writes
its own share -- every input once, none twice.
"""
import os
from typing import Mapping, Optional, Sequence, Tuple, TypeVar

from .errors import UserError

T = TypeVar("T")

# (rank, size) variables, in the order looked at: torchrun / accelerate launch, then Open MPI, then MPICH / Intel MPI
_LAUNCHERS = (("RANK", "WORLD_SIZE"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("PMI_RANK", "PMI_SIZE"))


def process_share(env: Optional[Mapping[str, str]] = None) -> Tuple[int, int]:
    """(rank, number of processes) this process was launched as; (0, 1) when started alone.

    Args:
        env: the environment to read (default `os.environ`).

    Raises:
        UserError: the launcher's variables are not whole numbers with 0 <= rank < size.

    Example:
        >>> process_share({}), process_share({"RANK": "1", "WORLD_SIZE": "2"})
        ((0, 1), (1, 2))
    """
    env = os.environ if env is None else env
    for rank_var, size_var in _LAUNCHERS:
        if size_var in env:
            raw_rank, raw_size = env.get(rank_var, "0"), env[size_var]
            try:
                rank, size = int(raw_rank), int(raw_size)
            except ValueError:
                rank, size = -1, 0
            if not 0 <= rank < size:
                raise UserError(f"{rank_var}={raw_rank!r} and {size_var}={raw_size!r} do not describe a process of "
                                f"a launch (0 <= rank < size); unset them to run alone")
            return rank, size
    return 0, 1


def my_share(items: Sequence[T], rank: int, size: int) -> list:
    """The positions of `items` process `rank` of `size` handles: every `size`-th one from `rank`.

    Example:
        >>> my_share("abcde", 0, 2), my_share("abcde", 1, 2)
        ([0, 2, 4], [1, 3])
    """
    return list(range(rank, len(items), size))
