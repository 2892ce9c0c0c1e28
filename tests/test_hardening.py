"""Hardening, proved by generated input rather than a list: every recipe value and every adapter-file field
either works or is refused with one `error:` line (exit 2, no traceback), and nothing outside the run's own
files changes. Then the faults: two runs on one folder, a full disk, a read-only one, foreign files.

The property tests run the CLI in-process (`recipes.cli.main`): an exception escaping `main` is exactly what a
user would see as a traceback. Their examples are derandomized (the same ones in every CI run; set
`HYPOTHESIS_PROFILE=fuzz` for a longer random search).
"""
import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file, save_file

from samadapt import adapters
from samadapt.recipes import config as recipe_config
from samadapt.recipes.cli import main
from samadapt.sam_core import build_sam

ROOT = Path(__file__).resolve().parents[1]
settings.register_profile("ci", derandomize=True, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("fuzz", max_examples=500, deadline=60_000,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)


def examples(n: int) -> int:
    """`n` examples in CI; ten times as many under the `fuzz` profile."""
    return n if PROFILE == "ci" else 10 * n

# a run that takes a couple of seconds: the tiny core (random weights), 64 px synthetic images, one step
CHEAP = ["base.pretrained_tiny=false", "data.synthetic_train_size=4", "data.synthetic_eval_size=2",
         "data.synthetic_image_size=64", "base.image_size=64", "train.max_steps=1", "train.batch_size=2",
         "eval.batch_size=2", "eval.samples=1", "eval.baseline=false", "train.warmup_steps=0"]


# ---------------------------------------------------------------------------- helpers
def snapshot(root: Path, skip: Path) -> dict:
    """Every file under `root` but `skip`, by relative path -> sha256 (what "nothing else changed" compares)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and skip not in p.parents:
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_main(argv):
    """`main(argv)` with its stdout/stderr captured; an exception escaping it fails the test (a traceback)."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def error_lines(stderr: str) -> list:
    return [ln for ln in stderr.splitlines() if ln.startswith("error:")]


def assert_clean_refusal(code, stderr, what):
    assert code == 2, (what, code, stderr[-2000:])
    lines = error_lines(stderr)
    assert len(lines) == 1, (what, stderr[-2000:])
    assert "Traceback" not in stderr and len(lines[0]) < 1000, (what, stderr[-2000:])


@contextlib.contextmanager
def sandbox(tmp: Path):
    """A working folder with the user's own files in it; yields (folder, the run's --out)."""
    tmp.mkdir(parents=True, exist_ok=True)
    user = tmp / "mine"
    user.mkdir(exist_ok=True)
    (user / "NOTES.txt").write_text("keep me")
    (user / "adapter.safetensors").write_bytes(b"not yours")
    old = os.getcwd()
    os.chdir(tmp)
    try:
        yield tmp, tmp / "run"
    finally:
        os.chdir(old)


# ---------------------------------------------------------------------------- strategies: recipe values
LEAVES = [".".join(p) for p in recipe_config._paths(recipe_config.SCHEMA)]
# keys whose valid values can make a run slow: valid draws stay in a cheap range
CHEAP_VALID = {
    "data.synthetic_train_size": st.integers(1, 6), "data.synthetic_eval_size": st.integers(1, 3),
    "data.synthetic_image_size": st.integers(16, 96), "base.image_size": st.sampled_from([64, 80, 128]),
    "train.epochs": st.integers(1, 2), "train.max_steps": st.one_of(st.none(), st.integers(1, 2)),
    "train.batch_size": st.integers(1, 4), "train.grad_accum": st.integers(1, 2), "eval.batch_size": st.integers(1, 4),
    "eval.samples": st.integers(0, 2), "data.num_workers": st.just(0), "prompts.correction_rounds": st.integers(0, 2),
    "prompts.n_pos": st.integers(0, 4), "prompts.n_neg": st.integers(0, 4), "train.log_every": st.integers(1, 5),
    "eval.every_epochs": st.integers(1, 3), "train.checkpoint_every": st.integers(0, 3),
    "train.keep_checkpoints": st.integers(0, 3), "train.warmup_steps": st.integers(0, 5),
    "adapter.decoder_r": st.integers(1, 8),
    "adapter.kinds": st.sampled_from([[{"kind": "lora", "r": 2}], [{"kind": "bottleneck", "width": 8}], []]),
    "eval.metrics": st.lists(st.sampled_from(sorted(recipe_config.METRICS)), min_size=1, max_size=3),
    "eval.select": st.sampled_from(sorted(recipe_config.METRICS)),
    # the valid values that would leave the sandbox or take minutes are only tried as wrong ones
    "base.arch": st.just("tiny"), "train.compile": st.just(False), "base.checkpoint": st.none(),
    "data.root": st.none(), "output.dir": st.none(), "data.synthetic": st.sampled_from(["camouflage", "objects"]),
    "train.full_core": st.just(False),
    # volume runs: a phantom or two of the cheapest kind (a volume run on phantoms is its own, longer test)
    "volume.phantoms_train": st.integers(0, 1), "volume.phantoms_test": st.integers(1, 1),
    "volume.slice_batch": st.integers(1, 4),
}
HOSTILE = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**12), 10**12), st.sampled_from([0, -1, 2**63, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([float("nan"), float("inf"), -0.0, 1e300]),
    # (not "/": a folder path is read as a dataset, and the whole filesystem is a valid, slow one)
    st.text(max_size=12), st.sampled_from(["../../escape", "/no/such/dir", "", "yes", "1e-4", "[unclosed"]),
    st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def _valid(key: str):
    if key in CHEAP_VALID:
        return CHEAP_VALID[key]
    path = tuple(key.split("."))
    if path in recipe_config.CHOICES:
        return st.sampled_from(recipe_config.CHOICES[path])
    default = recipe_config._default(list(path))
    rule = recipe_config.RANGES.get(path)
    if isinstance(default, bool):
        return st.booleans()
    if isinstance(default, float) or path in recipe_config.RANGES and isinstance(rule.lo, float):
        lo = rule.lo if rule and rule.lo is not None else -1e3
        hi = rule.hi if rule and rule.hi is not None else 1e3
        return st.floats(lo, hi, allow_nan=False, allow_infinity=False)
    if isinstance(default, str):
        return st.text(alphabet="abcdefghij-_0123456789", min_size=1, max_size=8)
    return HOSTILE


@st.composite
def overrides(draw):
    keys = draw(st.lists(st.sampled_from(LEAVES + ["train.learning_rate", "nope", "loss.focal_x"]), min_size=1,
                         max_size=3, unique=True))
    out = []
    for k in keys:
        value = draw(_valid(k) if draw(st.booleans()) and k in LEAVES else HOSTILE)
        text = value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True)
        text = text.strip().removesuffix("...").strip()
        out.append(f"{k}={text}")
    return out


@settings(max_examples=examples(40))
@given(sets=overrides())
def test_any_recipe_value_runs_or_is_refused_in_one_line(tmp_path_factory, sets):
    """`samadapt train` with any generated `--set` values: exit 0 (a real run, adapter written) or exit 2 with one
    `error:` line; never a traceback, and nothing outside the run directory changes."""
    with sandbox(tmp_path_factory.mktemp("recipe")) as (root, out):
        before = snapshot(root, out)
        code, _, err = run_main(["train", "demo", "--out", out, "--quiet",
                                 *sum([["--set", s] for s in CHEAP + sets], [])])
        assert snapshot(root, out) == before, sets
        event(f"exit {code}")
        if code == 0:
            assert (out / "adapter.safetensors").is_file() and (out / "metrics.json").is_file()
        else:
            assert_clean_refusal(code, err, sets)
            assert not list(out.glob("**/*.tmp")) and not list(out.glob("**/.tmp-*")), sets


def test_the_recipe_property_sees_both_outcomes(tmp_path):
    """The precondition of the property above: its inputs include runs that train and values that are refused
    (a generator that only made errors would pass it vacuously)."""
    outcomes = {}
    for sets in (["train.lr=0.001"], ["train.lr=nan"], ["eval.every_epochs=0"], ["train.learning_rate=1"]):
        with sandbox(tmp_path / str(len(outcomes))) as (_, out):
            outcomes[sets[0]] = run_main(["train", "demo", "--out", out, "--quiet",
                                          *sum([["--set", s] for s in CHEAP + sets], [])])
    assert outcomes["train.lr=0.001"][0] == 0
    for k in ("train.lr=nan", "eval.every_epochs=0", "train.learning_rate=1"):
        assert_clean_refusal(outcomes[k][0], outcomes[k][2], k)
    assert "did you mean 'train.lr'" in outcomes["train.learning_rate=1"][2]
    assert "must be a finite number" in outcomes["train.lr=nan"][2]


# ---------------------------------------------------------------------------- adapter files
@pytest.fixture(scope="module")
def adapter_env(tmp_path_factory):
    d = tmp_path_factory.mktemp("adapter_fuzz")
    torch.manual_seed(0)
    sam = build_sam("tiny").eval()
    core = d / "core.pth"
    torch.save(sam.state_dict(), core)
    adapters.attach(sam, [adapters.config("lora", r=2), adapters.config("bottleneck", width=8)], name="good",
                    decoder="lora", decoder_r=2)
    good = adapters.save(sam, d / "good.safetensors", name="good", domain="test", metrics={"iou": 0.5})
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as f:
        meta = dict(f.metadata())
    img = d / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(img)
    return {"dir": d, "core": core, "meta": meta, "tensors": load_file(str(good)), "img": img}


JSON_FIELDS = ("config", "decoder", "base", "metrics")
JSONISH = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=False),
                                 st.text(max_size=6)),
                       lambda kids: st.one_of(st.lists(kids, max_size=3),
                                              st.dictionaries(st.sampled_from(["kind", "r", "alpha", "policy",
                                                                               "arch", "image_size", "fingerprint",
                                                                               "targets", "x"]), kids, max_size=3)),
                       max_leaves=8)


@st.composite
def adapter_file_edits(draw, meta):
    """A valid file's metadata and tensors with some fields replaced: wrong JSON types, settings, garbage."""
    edits = {}
    for k in draw(st.lists(st.sampled_from(sorted(set(meta) | {"format", "extra"})), min_size=1, max_size=3,
                           unique=True)):
        how = draw(st.sampled_from(["json", "text", "drop", "tweak"]))
        if how == "json":
            edits[k] = json.dumps(draw(JSONISH))
        elif how == "text":
            edits[k] = draw(st.text(max_size=20))
        elif how == "drop":
            edits[k] = None
        elif k in JSON_FIELDS and k in meta:  # one value inside a valid structure made wrong
            obj = json.loads(meta[k])
            target = obj[0] if isinstance(obj, list) and obj else obj
            if isinstance(target, dict) and target:
                target[draw(st.sampled_from(sorted(target)))] = draw(JSONISH)
            edits[k] = json.dumps(obj)
    tensor_edit = draw(st.sampled_from(["none", "nan", "inf", "int", "shape", "extra", "missing"]))
    return edits, tensor_edit


def _write_edited(env, path: Path, edits, tensor_edit):
    meta = dict(env["meta"])
    for k, v in edits.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    tensors = {k: v.clone() for k, v in env["tensors"].items()}
    first = sorted(tensors)[0]
    if tensor_edit == "nan":
        tensors[first].view(-1)[0] = float("nan")
    elif tensor_edit == "inf":
        tensors[first].view(-1)[-1] = float("inf")
    elif tensor_edit == "int":
        tensors[first] = tensors[first].to(torch.int32)
    elif tensor_edit == "shape":
        tensors[first] = torch.zeros(3, 5)
    elif tensor_edit == "extra":
        tensors["blocks.0.attn.qkv.surprise"] = torch.zeros(2)
    elif tensor_edit == "missing":
        del tensors[first]
    save_file(tensors, str(path), metadata=meta)


@settings(max_examples=examples(60))
@given(data=st.data())
def test_any_adapter_file_loads_or_is_refused_in_one_line(adapter_env, tmp_path_factory, data):
    """An adapter file with any generated metadata (wrong JSON types, odd settings, missing fields) or damaged
    tensors (NaN, infinity, integers, wrong shapes, extra or missing tensors): `samadapt inspect`, `predict
    --adapter` and `adapters.load` either work or refuse it with one line (an `AdapterError` in Python), and a
    refused load leaves the model as it was."""
    edits, tensor_edit = data.draw(adapter_file_edits(adapter_env["meta"]))
    d = tmp_path_factory.mktemp("file")
    path = d / "edited.safetensors"
    _write_edited(adapter_env, path, edits, tensor_edit)
    what = (edits, tensor_edit)

    code, _, err = run_main(["inspect", path])
    if code != 0:
        assert_clean_refusal(code, err, what)

    sam = build_sam("tiny")
    sam.load_state_dict(torch.load(adapter_env["core"], weights_only=True))
    before = {k: v.clone() for k, v in sam.state_dict().items()}
    try:
        adapters.load(sam, path)
        loaded = True
    except adapters.AdapterError as e:
        assert str(e).strip() and "\n" not in str(e).strip(), what
        loaded = False
        assert adapters.attached(sam) == [] and sam.state_dict().keys() == before.keys(), what
        assert all(torch.equal(v, before[k]) for k, v in sam.state_dict().items()), what
    event("loaded" if loaded else "refused")
    if tensor_edit in ("nan", "inf", "int", "shape", "extra", "missing"):
        assert not loaded, what  # damaged tensors never load

    out = d / "out"
    code, _, err = run_main(["predict", adapter_env["img"], "--base", adapter_env["core"], "--adapter", path,
                             "--out", out, "--no-overlay"])
    if code == 0:
        assert loaded and (out / "img.png").is_file(), what
    else:
        assert_clean_refusal(code, err, what)
        assert not out.exists(), what


def test_the_adapter_property_sees_both_outcomes(adapter_env, tmp_path):
    """Precondition: an unedited file loads; the issue's wrong-typed files are refused by name."""
    sam = build_sam("tiny")
    sam.load_state_dict(torch.load(adapter_env["core"], weights_only=True))
    ok = tmp_path / "ok.safetensors"
    _write_edited(adapter_env, ok, {}, "none")
    assert adapters.load(sam, ok) == "good"
    cases = {"base as a list": {"base": json.dumps(["tiny", 256])}, "decoder as a list": {"decoder": "[]"},
             "config as an object": {"config": json.dumps({"kind": "lora"})},
             "alpha abc": {"config": json.dumps([{"kind": "lora", "r": 2, "alpha": "abc"},
                                                 {"kind": "bottleneck", "width": 8}])}}
    for what, edits in cases.items():
        p = tmp_path / f"{what.replace(' ', '_')}.safetensors"
        _write_edited(adapter_env, p, edits, "none")
        with pytest.raises(adapters.AdapterFormatError, match="metadata"):
            adapters.inspect(p)
        code, _, err = run_main(["inspect", p])
        assert_clean_refusal(code, err, what)
    nan = tmp_path / "nan.safetensors"
    _write_edited(adapter_env, nan, {}, "nan")
    assert adapters.inspect(nan)["non_finite"]
    with pytest.raises(adapters.AdapterFormatError, match="NaN or infinity"):
        adapters.load(build_sam("tiny"), nan, allow_base_mismatch=True)


def test_merged_core_save_and_load(adapter_env, tmp_path):
    """Saving while merged records the unmerged core's fingerprint (the file loads on its own base); loading on
    a merged core says to unmerge first."""
    sam = build_sam("tiny")
    sam.load_state_dict(torch.load(adapter_env["core"], weights_only=True))
    fp = sam.fingerprint
    adapters.attach(sam, adapters.config("lora", r=2), name="m")
    with torch.no_grad():
        for n, p in sam.named_parameters():
            if "lora_B" in n:
                p.normal_()  # a LoRA that changes the weights when merged
    adapters.merge(sam, "m")
    assert sam.fingerprint != fp  # the precondition: merging changed the core
    path = adapters.save(sam, tmp_path / "m.safetensors", name="m")
    assert adapters.inspect(path)["base"]["fingerprint"] == fp
    with pytest.raises(adapters.AdapterError, match="merged into the core; call adapters.unmerge"):
        adapters.load(sam, adapter_env["dir"] / "good.safetensors")
    fresh = build_sam("tiny")
    fresh.load_state_dict(torch.load(adapter_env["core"], weights_only=True))
    assert adapters.load(fresh, path) == "m"


# ---------------------------------------------------------------------------- faults
def cli(*args, cwd=ROOT, **kw):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "samadapt.recipes.cli", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def train_args(out, *extra):
    """`samadapt train demo` on the cheap settings; later `--set`s (extra) win."""
    return ["train", "demo", "--out", out, "--quiet", *sum([["--set", s] for s in CHEAP + list(extra)], [])]


def test_two_runs_on_one_out(tmp_path):
    """While a run trains, a second on the same --out exits 2 naming the first's pid and host, and the first
    finishes with its own files."""
    out = tmp_path / "run"
    first = cli(*train_args(out, "train.max_steps=300", "train.checkpoint_every=50"))  # about 20 s
    deadline = time.time() + 120
    while not ((out / ".lock").is_file() and f"pid {first.pid}" in (out / ".lock").read_text()):
        assert first.poll() is None and time.time() < deadline, first.communicate()
        time.sleep(0.2)
    second = cli(*train_args(out, "train.max_steps=2"))
    _, err2 = second.communicate(timeout=300)
    assert first.poll() is None, "the first run must still be running when the second is refused"
    _, err1 = first.communicate(timeout=600)
    assert first.returncode == 0, err1[-2000:]
    assert_clean_refusal(second.returncode, err2, "second run")
    assert f"in use by another run (pid {first.pid} on " in err2
    assert json.loads((out / "metrics.json").read_text())["history"][-1]["step"] == 300


def test_resume_right_after_a_kill_is_exact(tmp_path):
    """SIGKILL mid-run (the out-of-memory killer, a preempted job), with data loader workers: an immediate
    --resume continues and ends with the adapter of a run that was never killed. (The forked workers share
    the run's lock and may outlive it for a moment; `test_a_lock_left_to_a_dead_runs_children_is_waited_for`
    covers that case deterministically.)"""
    import signal

    steps = ["train.max_steps=24", "train.checkpoint_every=2", "data.num_workers=2", "data.synthetic_train_size=8"]
    out = tmp_path / "run"
    first = cli(*train_args(out, *steps))
    deadline = time.time() + 300
    while not list((out / "checkpoints").glob("step_*/position.json")):
        assert first.poll() is None and time.time() < deadline, first.communicate()
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert first.returncode == -signal.SIGKILL  # the precondition: killed, not finished
    resumed = cli(*train_args(out, *steps), "--resume")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-2000:]
    clean = cli(*train_args(tmp_path / "clean", *steps))
    _, err = clean.communicate(timeout=600)
    assert clean.returncode == 0, err[-2000:]
    a = load_file(str(out / "adapter.safetensors"))
    b = load_file(str(tmp_path / "clean" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


_HOLD_THEN_DIE = """
import os, sys, time
from pathlib import Path
from samadapt.recipes.rundir import run_lock
with run_lock(Path(sys.argv[1])):
    if os.fork() == 0:  # a child sharing the lock, like a data loader worker
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1), os.dup2(null, 2)  # not the caller's pipes: it reads up to the parent's exit only
        time.sleep(float(sys.argv[2]))
        os._exit(0)
    print(os.getpid(), flush=True)
    os._exit(0)  # the run dies without unlocking; its child still holds the lock
"""


def _locked(run_dir: Path) -> bool:
    import fcntl

    with open(run_dir / ".lock") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


@pytest.mark.parametrize("child_lives", [2.0, 20.0])
def test_a_lock_left_to_a_dead_runs_children_is_waited_for(tmp_path, monkeypatch, child_lives):
    """The lock file names a dead run but its forked children still hold the lock: the next run waits for them
    (up to `ORPHAN_WAIT_S`) instead of saying the folder is in use; past that it says who holds it."""
    from samadapt.recipes import rundir

    monkeypatch.setattr(rundir, "ORPHAN_WAIT_S", 8.0)
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-c", _HOLD_THEN_DIE, str(out), str(child_lives)], capture_output=True,
                       text=True, timeout=60)
    dead = int(r.stdout.split()[0])
    t0 = time.monotonic()
    # the precondition: the named run is gone, and still the lock is held
    assert not Path(f"/proc/{dead}").exists() and _locked(out)
    assert (out / ".lock").read_text() == f"pid {dead} on {os.uname().nodename}"
    assert rundir.lock_holder(out) is None  # no live run holds it: a pre-check (--resume's) lets it through
    if child_lives < 8.0:
        with rundir.run_lock(out):
            assert (out / ".lock").read_text() == f"pid {os.getpid()} on {os.uname().nodename}"
        assert time.monotonic() - t0 > 1.0  # it did wait for the child
    else:
        from samadapt.recipes.errors import TrainingError

        with pytest.raises(TrainingError, match=f"still locked by processes the ended run \\(pid {dead} on "):
            with rundir.run_lock(out):
                pass
        assert _locked(out)


def _mount_tmpfs(where: Path, options: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or 'not permitted'})")


@pytest.fixture
def mounts():
    made = []
    yield made
    for m in reversed(made):
        subprocess.run(["umount", "-l", str(m)], capture_output=True)


def test_disk_full_during_a_checkpoint_then_resume_is_exact(tmp_path, mounts):
    """A tmpfs too small for the second checkpoint: exit 2 with one line saying the disk is full and which
    checkpoint is intact; after freeing space (a bigger tmpfs) --resume ends with the adapter of a run that
    never hit the wall."""
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "size=6m")
    mounts.append(disk)
    steps = ["train.max_steps=4", "train.checkpoint_every=1", "train.keep_checkpoints=2"]
    full = cli(*train_args(disk / "run", *steps))
    _, err = full.communicate(timeout=600)
    assert_clean_refusal(full.returncode, err, "disk full")
    line = error_lines(err)[0]
    assert "No space left on device" in line and "is intact" in line and "--resume" in line, line
    assert not list((disk / "run" / "checkpoints").glob(".tmp-*"))
    subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
    resumed = cli(*train_args(disk / "run", *steps), "--resume")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-2000:]
    clean = cli(*train_args(tmp_path / "clean", *steps))
    _, err = clean.communicate(timeout=600)
    assert clean.returncode == 0, err[-2000:]
    a = load_file(str(disk / "run" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "clean" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_read_only_out_and_a_file_as_out(tmp_path, mounts, adapter_env):
    """A read-only --out (train, demo, predict, eval --json) and an --out that is a file: exit 2 before any
    work, one line naming the path, nothing written."""
    ro = tmp_path / "ro"
    _mount_tmpfs(ro, "size=1m,ro")
    mounts.append(ro)
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    cases = {
        "train read-only": (train_args(ro / "run"), "read-only"),
        "train into a file": (train_args(a_file / "run"), "is a file"),
        "demo read-only": (["demo", "--quick", "--out", ro / "demo"], "read-only"),
        "predict read-only": (["predict", adapter_env["img"], "--base", adapter_env["core"], "--out", ro / "p"],
                              "not writable"),
        "eval --json read-only": (["eval", "--set", "data.synthetic_eval_size=2", "--json", ro / "m.json"],
                                  "read-only"),
        "eval --json a folder": (["eval", "--json", tmp_path], "is a folder"),
    }
    for what, (argv, words) in cases.items():
        t0 = time.time()
        code, _, err = run_main(argv)
        assert_clean_refusal(code, err, what)
        assert words in error_lines(err)[0], (what, err)
        assert time.time() - t0 < 60, what  # refused up front, not after the work
    assert list(ro.iterdir()) == [] and a_file.read_text() == "mine"


def test_foreign_files_are_never_removed(tmp_path):
    """The demo and train refuse an --out holding files they did not write (the old demo removed the folder
    whenever it had checkpoints/); an earlier run's own files are replaced only by the demo, which owns them."""
    out = tmp_path / "x"
    (out / "checkpoints").mkdir(parents=True)
    (out / "NOTES.txt").write_text("keep")
    for argv in (["demo", "--quick", "--out", out], train_args(out)):
        code, _, err = run_main(argv)
        assert_clean_refusal(code, err, argv[0])
        assert "NOTES.txt" in error_lines(err)[0]
    assert (out / "NOTES.txt").read_text() == "keep" and (out / "checkpoints").is_dir()


def test_resume_after_a_shape_change_names_the_tensor(tmp_path):
    """--resume with a recipe whose LoRA rank changed (same tensor names, other shapes) exits 2 naming a tensor
    and both shapes; the checkpoint is left as it was."""
    out = tmp_path / "run"
    r4 = "adapter.kinds=[{kind: lora, r: 4}]"
    assert run_main(train_args(out, r4, "train.max_steps=2", "train.checkpoint_every=1"))[0] == 0
    before = snapshot(out, out / "logs")
    code, _, err = run_main(train_args(out, r4.replace("r: 4", "r: 8"), "train.max_steps=4") + ["--resume"])
    assert_clean_refusal(code, err, "resume r 8")
    line = error_lines(err)[0]
    assert "shapes differ" in line and "(4, " in line and "(8, " in line and "recipe.yaml" in line, line
    assert snapshot(out, out / "logs") == before
