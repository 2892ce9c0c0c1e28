"""The prepared GPU benchmark of the trainer (`benchmarks/gpu_trainer.py`) runs every part at tiny sizes on
this CPU, so a session that is lent a GPU can spend its minutes on the run itself. Its speed figures mean
nothing here and are not looked at; what is checked is that each part produced what it reports.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_part_runs_at_tiny_sizes(tmp_path):
    js = tmp_path / "tiny.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, "gpu_trainer.py", "--tiny", "--device", "cpu", "--budget", "900",
                        "--json", str(js), "--work", str(tmp_path / "work")],
                       cwd=ROOT / "benchmarks", env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    res = json.loads(js.read_text())
    parts = res["parts"]
    assert set(parts) == {"headline", "encoder", "checkpointing", "resume", "vit_h", "serve"}, sorted(parts)
    # no-compile is a GPU-only row (compile is off on a CPU anyway)
    for name in ("headline", "checkpointing", "vit_h"):
        assert parts[name]["rc"] == 0 and parts[name]["speed"]["images_per_s"] > 0, parts[name]
        assert parts[name]["loss"]["first"][0] == 1, parts[name]["loss"]
    enc = parts["encoder"]
    assert enc["rc"] == 0 and enc["ours"]["train_ips"] > 0 and enc["anchor"]["train_ips"] > 0, enc
    rs = parts["resume"]
    assert rs["killed_after"] == "step_00000020" and rs["resumed"]["rc"] == 0, rs
    assert rs["equal_tensors"] == rs["tensors"] > 0, rs
    assert parts["serve"]["fp32_max_diff"] <= 1e-5, parts["serve"]
    logs = {p.name for p in Path(res["log_dir"]).iterdir()}
    assert {"headline.log", "resume_cut.log", "resume_cut_resumed.log", "gpu_train_infer.log"} <= logs, logs
    assert "trainer / encoder-only training rate" in r.stdout
