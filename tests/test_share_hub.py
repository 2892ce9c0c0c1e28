"""Push and pull (issue 15) against `FakeHub`, a local endpoint laid out as the Hub serves it (the public
Hub is not reachable from the test machines), through huggingface_hub's real client:

- `adapters.hub.push` creates the repo (private when asked), a branch for `--revision`, and commits the
  file and a README.md whose YAML front matter huggingface_hub's `ModelCard` parses back with every field
  the issue lists; `pull` brings the same bytes back, refuses to overwrite a different local file;
- the CLI: `samadapt push` / `samadapt pull` in subprocesses with `HF_ENDPOINT`, `HF_TOKEN` and `HF_HOME`
  set as a user would, the token never printed; `HF_HUB_OFFLINE=1` re-pulls from the cache with the server
  gone; `samadapt serve --adapters catalogue.yaml` serves an `hf://` entry from a real server on 127.0.0.1.
"""
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fake_hub import FakeHub
from share_util import TOKEN, cli_env, make_adapter, point_hub_here

from samadapt import adapters
from samadapt.adapters.hub import pull, push
from samadapt.adapters.sources import SourceError
from samadapt.sam_core import load_sam

ROOT = Path(__file__).resolve().parents[1]


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def cli(*argv, env):
    return subprocess.run([sys.executable, "-m", "samadapt.recipes.cli", *map(str, argv)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def files(tmp_path_factory, pretrained_tiny_path):
    d = tmp_path_factory.mktemp("hubfiles")
    sam = load_sam(pretrained_tiny_path)
    a = make_adapter(sam, d / "cod.safetensors", "cod", seed=1, metrics={"eval": {"s_measure": 0.81, "mae": 0.05}},
                     recipe="name: camouflage\ntrain:\n  lr: 0.0003\n")
    b = make_adapter(sam, d / "cod_b.safetensors", "cod", seed=2)
    return sam, a, b, pretrained_tiny_path



def test_push_writes_file_and_model_card_parsed_by_modelcard(files, hub, tmp_path):
    from huggingface_hub import ModelCard

    sam, a, b, ckpt = files
    url = push(a, "org/cod", license="apache-2.0")
    assert url.startswith(f"{hub.url}/org/cod/commit/")
    repo = hub.repos["org/cod"]
    tree = repo.commits[repo.refs["main"]]
    assert tree["cod.safetensors"] == a.read_bytes()
    card = ModelCard(tree["README.md"].decode())  # parsed back by huggingface_hub
    d = card.data.to_dict()
    assert d["library_name"] == "samadapt" and d["license"] == "apache-2.0"
    assert {"samadapt", "segment-anything", "lora", "camouflage"} <= set(d["tags"])
    s = d["samadapt"]
    assert s["base"] == {"arch": "tiny", "image_size": 256, "fingerprint": sam.fingerprint,
                         "checkpoint": ckpt.name, "checkpoint_sha256": sha(ckpt)}
    assert s["domain"] == "camouflage" and s["metrics"] == {"eval": {"s_measure": 0.81, "mae": 0.05}}
    assert s["recipe"] == "name: camouflage\ntrain:\n  lr: 0.0003\n" and s["file_sha256"] == sha(a)
    assert hub.validated and hub.validated[-1]["library_name"] == "samadapt"  # what the Hub checks, too
    assert "| s_measure | 0.8100 |" in card.text and f'sha256="{sha(a)}"' in card.text
    assert all(auth == f"Bearer {TOKEN}" for m, _, auth in hub.requests if m == "POST")

    out = pull("org/cod", dest=tmp_path / "got")  # the repo's one .safetensors
    assert out == tmp_path / "got" / "cod.safetensors" and out.read_bytes() == a.read_bytes()
    assert pull("org/cod/cod.safetensors", dest=tmp_path / "got") == out  # same file there: fine


def test_push_revision_private_and_pull_refusals(files, hub, tmp_path, monkeypatch):
    _, a, b, _ = files
    push(a, "org/priv", private=True)
    push(b, "org/priv", revision="v2")
    repo = hub.repos["org/priv"]
    assert repo.private and set(repo.refs) == {"main", "v2"}
    assert repo.commits[repo.refs["v2"]]["cod_b.safetensors"] == b.read_bytes()
    assert "cod_b.safetensors" not in repo.commits[repo.refs["main"]]
    with pytest.raises(SourceError, match="2 .safetensors files"):  # v2 holds both: name one
        pull("org/priv", dest=tmp_path, revision="v2")
    got = pull("org/priv/cod_b.safetensors", dest=tmp_path / "v2", revision="v2", sha256=sha(b))
    assert got.read_bytes() == b.read_bytes()

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "cod.safetensors").write_bytes(b"the user's own file")
    with pytest.raises(SourceError, match="already exists"):
        pull("org/priv/cod.safetensors", dest=tmp_path / "mine")
    assert (tmp_path / "mine" / "cod.safetensors").read_bytes() == b"the user's own file"

    hub.add_repo("org/notadapter", {"x.safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "})
    with pytest.raises(adapters.AdapterFormatError):
        pull("org/notadapter", dest=tmp_path / "n")
    assert not (tmp_path / "n" / "x.safetensors").exists()

    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(SourceError, match="private") as ei:
        pull("org/priv/never_fetched.safetensors", dest=tmp_path / "anon")
    with pytest.raises(SourceError):
        push(a, "org/priv")  # no token: the Hub refuses the write
    assert TOKEN not in str(ei.value)


def main_cli(*argv):
    """`samadapt ARGV` by the CLI's own `main` in this process (exit status, stdout, stderr)."""
    import contextlib
    import io
    import types

    from samadapt.recipes.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def test_cli_push_pull_offline_and_errors(files, tmp_path, monkeypatch):
    _, a, _, _ = files
    hub = FakeHub(token=TOKEN)
    home = tmp_path / "home"
    try:
        with monkeypatch.context() as m:  # the variables a user sets; the CLI's main runs here
            point_hub_here(m, hub.url, home)
            run_push_pull(a, hub, tmp_path)
    finally:
        hub.close()
    # the server is gone: a new process with HF_HUB_OFFLINE=1 gets the file from the cache; a file never
    # fetched is one clear line
    env = cli_env(hub.url, home, offline=True)
    r = cli("pull", "me/cod/cod.safetensors", "--revision", "v1", "--out", tmp_path / "off", env=env)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "off" / "cod.safetensors").read_bytes() == a.read_bytes()
    r = cli("pull", "me/cod/other.safetensors", "--out", tmp_path / "off2", env=env)
    assert r.returncode == 2 and "not in the local cache" in r.stderr and "Traceback" not in r.stderr


def run_push_pull(a, hub, tmp_path):
    """push / pull through the CLI: results, refusals, and the token never printed."""
    cli = main_cli
    outs = []
    r = cli("push", a, "me/cod", "--private", "--revision", "v1", "--license", "mit")
    assert r.returncode == 0, r.stderr
    outs.append(r.stdout + r.stderr)
    assert "pushed cod.safetensors and README.md to me/cod@v1" in r.stdout
    assert hub.repos["me/cod"].private and "v1" in hub.repos["me/cod"].refs
    r = cli("pull", "me/cod", "--revision", "v1", "--out", tmp_path / "dl")
    assert r.returncode == 0, r.stderr
    outs.append(r.stdout + r.stderr)
    assert (tmp_path / "dl" / "cod.safetensors").read_bytes() == a.read_bytes()
    r = cli("pull", "me/cod/cod.safetensors", "--revision", "v1", "--sha256", "0" * 64, "--out",
            tmp_path / "dl2")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and sha(a) in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "dl2" / "cod.safetensors").exists()
    outs.append(r.stdout + r.stderr)
    r = cli("push", tmp_path / "missing.safetensors", "me/cod")
    assert r.returncode == 2 and "no such adapter file" in r.stderr
    outs.append(r.stdout + r.stderr)
    assert not any(TOKEN in o for o in outs)  # the token is sent, never printed


def test_serve_catalogue_with_hub_source(files, tmp_path):
    import httpx

    _, a, _, ckpt = files
    hub = FakeHub(token=TOKEN)
    hub.add_repo("org/cod", {"cod.safetensors": a.read_bytes()})
    cat = tmp_path / "adapters.yaml"
    local = tmp_path / "local.safetensors"
    shutil.copyfile(a, local)
    cat.write_text(f"cod: {{source: hf://org/cod/cod.safetensors, sha256: {sha(a)}}}\nmine: local.safetensors\n")
    env = cli_env(hub.url, tmp_path / "home")
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen([sys.executable, "-m", "samadapt.recipes.cli", "serve", "--adapters", str(cat),
                             "--port", "0", "--base", str(ckpt)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("samadapt serve: http://127.0.0.1:"), line + (proc.stdout.read() or "")
        assert "2 adapter(s)" in line
        url = line.split()[2]
        with httpx.Client(base_url=url, timeout=60) as http:
            listing = {x["name"]: x for x in http.get("/api/adapters").json()["adapters"]}
            assert set(listing) == {"cod", "mine"} and listing["cod"]["compatible"], listing
            assert listing["cod"]["domain"] == "camouflage"
    finally:
        proc.kill()
        proc.wait()
        hub.close()
    cat.write_text(f"cod: {{source: hf://org/cod/cod.safetensors, sha256: {'ab' * 32}}}\n")
    r = cli("serve", "--adapters", cat, "--port", "0", env=env)  # the cached file, a wrong pin: refused
    assert r.returncode == 2 and r.stderr.startswith("error: ") and sha(a) in r.stderr, r.stderr
