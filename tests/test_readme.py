"""The README's Python snippet runs as written, and its command table is the CLI's `--help` usage."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from samadapt.recipes.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def using_it_snippet() -> str:
    section = README[README.index("## Using it"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_snippet_runs_as_written(tmp_path):
    """In a fresh interpreter, in a folder that holds only what a clone has (docs/example.jpg)."""
    code = using_it_snippet()
    assert "rgb =" in code and "docs/example.jpg" in code and "load_base()" in code  # what the issue found missing
    (tmp_path / "docs").mkdir()
    shutil.copy(ROOT / "docs" / "example.jpg", tmp_path / "docs" / "example.jpg")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert lines[0].startswith("(1, 320, 320) score "), r.stdout
    pixels = int(lines[0].split(", ")[-1].split()[0])
    assert 1500 < pixels < 5000, r.stdout  # the boxed shape (2,117 px), not the whole image or nothing
    n_auto = int(lines[1].split()[0])
    assert n_auto >= 1 and "'segmentation'" in lines[1] and "'predicted_iou'" in lines[1], r.stdout
    assert lines[2].startswith("(3, 320, 320)"), r.stdout
    assert (tmp_path / "my_adapters" / "cod.safetensors").is_file()
    assert not (ROOT / "adapters" / "cod.safetensors").exists()  # nothing written into the package's own folders


def test_cli_table_matches_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    table = {}
    for m in re.finditer(r"^\| `(samadapt (\w+)(?:[^`])*)` \|", README, re.M):
        table[m.group(2)] = m.group(1).replace("\\|", "|")  # a | inside a table cell is written \|
    assert set(table) == set(sub.choices), (sorted(table), sorted(sub.choices))
    for name, sp in sub.choices.items():
        usage = " ".join(sp.format_usage().split())[len("usage: "):].replace("[-h] ", "")
        assert table[name] == usage, f"README row of {name!r} differs from --help:\n{table[name]}\n{usage}"
