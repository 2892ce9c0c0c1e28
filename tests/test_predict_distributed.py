"""`samadapt predict` under `accelerate launch --num_processes 2` (the DDP config, which on CPU starts 2
processes through torchrun; recipes/distributed.py): each process predicts and writes its own share
of a folder -- every input's files written once, none missing, names as a lone run gives them, masks
equal to a lone run's -- and both processes really ran (each reports its own share, as rank k of 2).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from samadapt.recipes.errors import UserError
from samadapt.recipes.shard import my_share, process_share
from samadapt.sam_core import build_sam

ROOT = Path(__file__).resolve().parents[1]
DDP = ROOT / "recipes" / "configs" / "accelerate" / "ddp.yaml"



def test_process_share_reads_the_launchers_and_refuses_nonsense():
    assert process_share({}) == (0, 1)
    assert process_share({"RANK": "3", "WORLD_SIZE": "4"}) == (3, 4)
    assert process_share({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"}) == (1, 2)
    for bad in ({"RANK": "2", "WORLD_SIZE": "2"}, {"RANK": "x", "WORLD_SIZE": "2"}):
        with pytest.raises(UserError, match="unset them to run alone"):
            process_share(bad)
    shares = [my_share(range(7), r, 3) for r in range(3)]
    assert sorted(sum(shares, [])) == list(range(7))


def test_predict_on_two_processes_writes_every_input_once(tmp_path):
    torch.manual_seed(0)
    core = tmp_path / "core.pth"
    torch.save(build_sam("tiny").state_dict(), core)
    data = tmp_path / "images"
    (data / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"img{i}.png" for i in range(7)] + ["img0.jpg"]  # odd count; two inputs share a stem
    for n in names:
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(data / n)
    args = [str(data), "--base", str(core), "--box", "8,8,50,40", "--no-overlay"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")

    alone = tmp_path / "alone"
    run = subprocess.run([sys.executable, "-m", "samadapt.recipes.cli", "predict", *args, "--out", str(alone)],
                         capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr

    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(DDP), "--num_processes", "2",
           "-m", "samadapt.recipes.cli", "predict", *args, "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    reports = sorted(line for line in run.stderr.splitlines() if " image(s) written to " in line)
    # both processes ran, each its own share: 8 inputs -> 4 + 4
    assert reports == [f"process 1/2: 4 image(s) written to {out}", f"process 2/2: 4 image(s) written to {out}"], \
        run.stderr[-2000:]
    written = sorted(f for f in os.listdir(out) if f.endswith(".png"))
    want = sorted(f for f in os.listdir(alone) if f.endswith(".png"))
    assert len(want) == len(names) and written == want  # none missing, none extra, same names as alone
    # the run file: one per process (each knows its share), together the lone run's records
    assert sorted(f for f in os.listdir(out) if f.endswith(".json")) == ["masks-1of2.json", "masks-2of2.json"]
    shares = [json.loads((out / f"masks-{k}of2.json").read_text()) for k in (1, 2)]
    lone = json.loads((alone / "masks.json").read_text())
    key = lambda rec: json.dumps(rec, sort_keys=True)  # noqa: E731
    assert sorted(map(key, shares[0] + shares[1])) == sorted(map(key, lone)) and all(shares)
    assert not [f for f in written if f.startswith(".")]  # no temporary file left
    for f in want:
        a, b = np.array(Image.open(alone / f)), np.array(Image.open(out / f))
        assert np.array_equal(a, b), f
