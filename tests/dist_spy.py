"""`samadapt ...` with spies, for tests/test_distributed.py: run under `accelerate launch tests/dist_spy.py
train ...`. Each process writes `$SPY_DIR/rank{R}.json`: the training items it was given per epoch, the
evaluation indices that `gather_for_metrics` returned (main process), and how the prepared model holds
its parameters (sharded DTensor or full tensor, trainable or not). Nothing in the library changes."""
import json
import os
import sys
from collections import defaultdict

import accelerate

from samadapt.recipes import cli, train

record = {"train": defaultdict(list), "eval": [], "params": {}}
made = []


class SpyIndexed(train.IndexedDataset):
    def __init__(self, ds):
        super().__init__(ds)
        self.label = "train" if not made else "eval"  # train() builds the training loader first
        made.append(self)

    def __getitem__(self, i):
        if self.label == "train":
            record["train"][str(self.ds.epoch)].append(int(i))
        return super().__getitem__(i)


real_gather = accelerate.Accelerator.gather_for_metrics


def spy_gather(self, data, *a, **kw):
    out = real_gather(self, data, *a, **kw)
    if self.is_main_process:
        record["eval"].append([int(i) for i in out[3]])
    return out


real_describe = train.describe


def spy_describe(accelerator, model=None):
    from torch.distributed.tensor import DTensor

    for n, p in model.named_parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        record["params"][n] = {"dtensor": isinstance(p, DTensor), "trainable": p.requires_grad,
                               "numel": p.numel(), "local_numel": local.numel()}
    return real_describe(accelerator, model)


def dump():
    rank = os.environ.get("RANK", "0")
    with open(os.path.join(os.environ["SPY_DIR"], f"rank{rank}.json"), "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    train.IndexedDataset = SpyIndexed
    train.describe = spy_describe
    accelerate.Accelerator.gather_for_metrics = spy_gather
    try:
        code = cli.main(sys.argv[1:])
    finally:
        dump()
    sys.exit(code)
