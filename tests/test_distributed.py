"""Distributed training on 2 CPU processes over gloo, launched as users launch it: `accelerate launch
--config_file recipes/configs/accelerate/{ddp,fsdp2}.yaml`. Every test first proves the group formed
(`metrics.json` `distributed.num_processes` is what was launched), then checks one behaviour.

Tolerance of "equal to a single process": the 2-process runs use a per-process batch of 2, the single
run a batch of 4 with the same seed, so each step sees the same 4 items and, the losses being per-image
means, the same mean gradient. What differs is float rounding: two half-batches summed and averaged by
the all-reduce instead of one batch. After 8 AdamW steps that was a max abs difference of 2.4e-6 (mean
3.6e-10); the tests allow 1e-4. DDP and FSDP2 average the same two gradients and were bit-identical.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "configs" / "accelerate"
SPY = ROOT / "tests" / "dist_spy.py"
N_TRAIN, N_EVAL, EPOCHS = 16, 5, 2  # 5 eval items over 2 processes: the last batch is padded
COMMON = ["base.pretrained_tiny=false", f"data.synthetic_train_size={N_TRAIN}", f"data.synthetic_eval_size={N_EVAL}",
          "eval.baseline=false", "eval.samples=1", "data.synthetic_image_size=128", "base.image_size=128",
          f"train.epochs={EPOCHS}", "train.checkpoint_every=2", "train.keep_checkpoints=10", "eval.batch_size=2"]
STEPS = EPOCHS * N_TRAIN // 4  # global batch 4
ATOL = 1e-4  # see the module docstring


def _env(**extra):
    return dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", **extra)


def _sets(extra=()):
    return sum([["--set", s] for s in [*COMMON, *extra]], [])


def _launch_cmd(config, out, *args, spy_dir=None, launch_args=(), extra=()):
    target = [str(SPY)] if spy_dir else ["-m", "samadapt.recipes.cli"]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
            *launch_args, *target, "train", "demo", "--out", str(out), "--quiet", *_sets(extra), *args]


def launch(config, out, *args, spy_dir=None, extra=(), timeout=300):
    """`accelerate launch --config_file CONFIG ... train demo` with a per-process batch of 2."""
    env = _env(SPY_DIR=str(spy_dir)) if spy_dir else _env()
    cmd = _launch_cmd(config, out, *args, spy_dir=spy_dir, extra=("train.batch_size=2", *extra))
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout, env=env)


def distributed(out):
    return json.loads((Path(out) / "metrics.json").read_text())["distributed"]


def max_diff(a, b):
    assert a.keys() == b.keys() and a
    return max((a[k] - b[k]).abs().max().item() for k in a)


def adapter(out):
    return load_file(str(Path(out) / "adapter.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One single-process run (batch 4) and one 2-process run per strategy (batch 2 each), with spies."""
    base = tmp_path_factory.mktemp("dist")
    out = {"base": base}
    r = subprocess.run([sys.executable, "-m", "samadapt.recipes.cli", "train", "demo", "--out", str(base / "single"),
                        "--quiet", *_sets(["train.batch_size=4"])], capture_output=True, text=True, cwd=ROOT,
                       timeout=300, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    out["single"] = base / "single"
    for strategy in ("ddp", "fsdp2"):
        spy = base / f"spy_{strategy}"
        spy.mkdir()
        r = launch(f"{strategy}.yaml", base / strategy, spy_dir=spy)
        assert r.returncode == 0, r.stderr[-4000:]
        out[strategy] = base / strategy
        out[f"{strategy}_log"] = r.stdout + r.stderr
        out[f"{strategy}_spy"] = [json.loads((spy / f"rank{i}.json").read_text()) for i in range(2)]
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_strategy_trains_on_two_processes_and_equals_one(runs, strategy):
    run = runs[strategy]
    assert distributed(run) == {"strategy": strategy, "num_processes": 2, "num_machines": 1}  # the group formed
    assert f"distributed: {strategy}, 2 processes on 1 machines (backend gloo)" in runs[f"{strategy}_log"]
    assert distributed(runs["single"]) == {"strategy": "single", "num_processes": 1, "num_machines": 1}
    assert sorted(f.name for f in run.glob("*.safetensors")) == ["adapter.safetensors"]
    diff = max_diff(adapter(runs["single"]), adapter(run))
    print(f"{strategy}: max abs difference to the single-process adapter {diff:.3g}")
    assert diff <= ATOL, diff
    if strategy == "fsdp2":  # the same two gradients averaged: the same bits as DDP
        assert max_diff(adapter(runs["ddp"]), adapter(run)) == 0.0


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_only_the_adapter_trains_and_checkpoints_hold_full_named_tensors(runs, strategy):
    """The frozen core is replicated (DDP) or sharded (FSDP2); only adapter tensors train and have optimizer
    state; a checkpoint holds every trained tensor whole, under the unwrapped core's names."""
    name = "camo-demo"
    for rank, spy in enumerate(runs[f"{strategy}_spy"]):
        params = spy["params"]
        frozen = {n: p for n, p in params.items() if not p["trainable"]}
        trained = {n: p for n, p in params.items() if p["trainable"]}
        assert frozen and trained and all(name in n for n in trained) and not any(name in n for n in frozen)
        sharded = strategy == "fsdp2"
        assert all(p["dtensor"] == sharded for p in params.values()), rank
        local = sum(p["local_numel"] for p in frozen.values())
        full = sum(p["numel"] for p in frozen.values())
        # FSDP2 shards along dim 0: each rank holds about half of the core, DDP all of it
        assert (abs(local - full / 2) < 0.05 * full) if sharded else local == full, (rank, local, full)
    single_ck = load_file(str(runs["single"] / "checkpoints" / f"step_{STEPS:08d}" / "trained.safetensors"))
    for step in (2, STEPS):
        ck = runs[strategy] / "checkpoints" / f"step_{step:08d}"
        tensors = load_file(str(ck / "trained.safetensors"))
        assert {k: v.shape for k, v in tensors.items()} == {k: v.shape for k, v in single_ck.items()}
        osd = torch.load(ck / "optimizer.pt", weights_only=True)
        assert osd["state"] and {k.removeprefix("sam.") for k in osd["state"]} <= set(tensors)
        for k, state in osd["state"].items():  # whole tensors, not shards
            assert state["exp_avg"].shape == tensors[k.removeprefix("sam.")].shape, k
        assert sorted(p.name for p in ck.iterdir()) == ["optimizer.pt", "position.json", "rng.pt", "scheduler.pt",
                                                        "trained.safetensors"]
    final = load_file(str(runs[strategy] / "checkpoints" / f"step_{STEPS:08d}" / "trained.safetensors"))
    assert max_diff(single_ck, final) <= ATOL


def test_each_process_gets_a_disjoint_shard_and_eval_counts_every_item_once(runs):
    for strategy in ("ddp", "fsdp2"):
        spies = runs[f"{strategy}_spy"]
        for epoch in range(EPOCHS):
            seen = [spy["train"][str(epoch)] for spy in spies]
            assert [len(s) for s in seen] == [N_TRAIN // 2] * 2, (strategy, epoch, seen)
            assert not set(seen[0]) & set(seen[1]), (strategy, epoch, seen)
            assert sorted(seen[0] + seen[1]) == list(range(N_TRAIN))
        assert spies[0]["train"]["0"] != spies[0]["train"]["1"]  # a new order each epoch
        evals = spies[0]["eval"][:3]  # the first evaluation's 3 batches, as gather_for_metrics gave them
        gathered = [i for batch in evals for i in batch]
        assert len(gathered) == N_EVAL and sorted(gathered) == list(range(N_EVAL)), (strategy, evals)


def _cut_at(src: Path, dst: Path, step: int) -> None:
    """A run directory as a run killed just after checkpoint `step` leaves it."""
    ck = src / "checkpoints" / f"step_{step:08d}"
    shutil.copytree(ck, dst / "checkpoints" / ck.name)
    shutil.copy(src / "recipe.yaml", dst / "recipe.yaml")


@pytest.mark.parametrize("saved, resumed", [("ddp", "fsdp2"), ("fsdp2", "ddp")])
def test_resume_across_strategies(runs, tmp_path, saved, resumed):
    """A checkpoint written under one strategy continues under the other to the uninterrupted adapter."""
    cut = tmp_path / "cut"
    _cut_at(runs[saved], cut, 4)
    r = launch(f"{resumed}.yaml", cut, "--resume")
    assert r.returncode == 0, r.stderr[-4000:]
    assert distributed(cut) == {"strategy": resumed, "num_processes": 2, "num_machines": 1}
    assert "resumed from" in r.stdout and f"step_{4:08d}" in r.stdout
    diff = max_diff(adapter(runs[saved]), adapter(cut))
    print(f"{saved} checkpoint resumed under {resumed}: max abs difference {diff:.3g}")
    assert diff == 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_machines_on_loopback_equal_one_machine(runs, tmp_path):
    """Two `accelerate launch` invocations, `--num_machines 2 --machine_rank 0|1`, one process each, meet on
    127.0.0.1 and train the adapter that one machine with 2 processes trains."""
    out, port = tmp_path / "two_nodes", _free_port()
    procs = []
    for rank in (0, 1):
        launch_args = ["--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
                       "--main_process_ip", "127.0.0.1", "--main_process_port", str(port)]
        cmd = _launch_cmd("ddp.yaml", out, launch_args=launch_args, extra=("train.batch_size=2",))
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [log[-3000:] for log in logs]
    assert distributed(out) == {"strategy": "ddp", "num_processes": 2, "num_machines": 2}
    assert "distributed: ddp, 2 processes on 2 machines (backend gloo)" in logs[0]
    diff = max_diff(adapter(runs["ddp"]), adapter(out))
    print(f"two machines vs one machine: max abs difference {diff:.3g}")
    assert diff == 0.0


def _rank_process(launcher: subprocess.Popen, rank: int):
    import psutil

    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "samadapt" in " ".join(child.cmdline()):
                return child
        except psutil.Error:
            continue
    return None


def test_a_killed_rank_ends_the_run_cleanly_and_resume_works(runs, tmp_path):
    """SIGKILL rank 1 mid-run: rank 0 stops within the timeout with one `error:` line naming the last
    good checkpoint, the checkpoint is whole, and `--resume` finishes with the uninterrupted adapter."""
    out = tmp_path / "killed"
    cmd = _launch_cmd("ddp.yaml", out, extra=("train.batch_size=2",))
    launcher = subprocess.Popen(cmd, cwd=ROOT, env=_env(SAMADAPT_DIST_TIMEOUT="60"), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (out / "checkpoints" / f"step_{2:08d}").exists():
        time.sleep(0.02)
    victim = _rank_process(launcher, 1)
    assert victim is not None and launcher.poll() is None, "the run ended before rank 1 could be killed"
    killed_at = time.time()
    victim.send_signal(signal.SIGKILL)
    log = launcher.communicate(timeout=120)[0]
    took = time.time() - killed_at
    print(f"the run ended {took:.1f} s after rank 1 was killed")
    assert launcher.returncode != 0 and took < 60, (launcher.returncode, took)
    errors = [ln for ln in log.splitlines() if ln.startswith("error: process 0 stopped")]
    assert errors and "the last good checkpoint is" in errors[0] and "--resume" in errors[0], log[-4000:]
    from samadapt.recipes.checkpointing import latest_checkpoint

    last = latest_checkpoint(out)
    assert last is not None and str(last) in errors[0]
    # whole: every trained tensor (the adapter file's tensors are stored name-free, so compare counts)
    assert len(load_file(str(last / "trained.safetensors"))) == len(adapter(runs["ddp"]))
    assert json.loads((last / "position.json").read_text())["step"] >= 2
    r = launch("ddp.yaml", out, "--resume")
    assert r.returncode == 0, r.stderr[-4000:]
    assert distributed(out) == {"strategy": "ddp", "num_processes": 2, "num_machines": 1}
    diff = max_diff(adapter(runs["ddp"]), adapter(out))
    print(f"resumed from {last.name} after the kill: max abs difference {diff:.3g}")
    assert diff == 0.0


def test_fsdp1_on_cpu_is_refused_with_the_fix(tmp_path):
    r = launch("fsdp1.yaml", tmp_path / "fsdp1", extra=("train.max_steps=1",))
    assert r.returncode != 0
    assert "error: FSDP1 (fsdp_version: 1) does not run on CPU; launch with" in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in "\n".join(ln for ln in r.stderr.splitlines() if "[rank" in ln)


VOLUME_SETS = ["base.arch=tiny", "base.image_size=64", "train.batch_size=4", "train.mixed_precision=no",
               "train.warmup_steps=0", "eval.every_epochs=1", "train.epochs=2", "train.checkpoint_every=2",
               "train.keep_checkpoints=10", "volume.phantoms_train=4", "volume.phantoms_test=1",
               "prompts.keep_prompts=0.3"]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_a_volume_recipe_trains_on_two_processes(tmp_path, strategy):
    """`samadapt train organs` under `accelerate launch` on 2 processes: the group forms, each process takes
    half the slices (half the steps per epoch of one process at the same per-process batch), the phantoms are
    written once, rank 0 alone writes the run's files, and the adapter it exports loads."""
    pytest.importorskip("nibabel")
    from samadapt import adapters
    from samadapt.recipes.model import load_base

    def cmd(out, launcher=True):
        train = ["-m", "samadapt.recipes.cli", "train", "organs", "--out", str(out), "--quiet",
                 *sum([["--set", s] for s in VOLUME_SETS], [])]
        if not launcher:
            return [sys.executable, *train]
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / f"{strategy}.yaml"),
                *train]

    two = subprocess.run(cmd(tmp_path / "two"), capture_output=True, text=True, cwd=ROOT, timeout=600, env=_env())
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run(cmd(tmp_path / "one", launcher=False), capture_output=True, text=True, cwd=ROOT,
                         timeout=600, env=_env())
    assert one.returncode == 0, one.stderr[-3000:]
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert m2["distributed"]["num_processes"] == 2 and m2["distributed"]["strategy"] == strategy, m2["distributed"]
    assert m1["distributed"]["num_processes"] == 1
    steps2 = [h["step"] for h in m2["history"]]
    steps1 = [h["step"] for h in m1["history"]]
    assert len(steps2) == len(steps1) == 2 and steps1[0] in (2 * steps2[0], 2 * steps2[0] + 1), (steps1, steps2)
    assert two.stdout.count("volumes: ") == 1 and "in use by another run" not in two.stderr  # rank 0 logs and locks
    last = sorted((tmp_path / "two" / "checkpoints").iterdir())[-1]
    assert last.name == f"step_{steps2[-1]:08d}"
    # the schedule was counted in the group's steps: the cosine ends at 0 on the last one, as on one process
    for run, ck in (("two", last), ("one", sorted((tmp_path / "one" / "checkpoints").iterdir())[-1])):
        lr = torch.load(ck / "scheduler.pt", weights_only=True)["scheduler"]["_last_lr"][0]
        assert lr < 1e-9, (run, lr)
    sam = load_base(image_size=64)  # the recipe's base: the pretrained tiny core
    name = adapters.load(sam, tmp_path / "two" / "adapter.safetensors")
    assert adapters.attached(sam) == [name]
