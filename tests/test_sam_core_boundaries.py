"""sam_core stands alone: it imports nothing of ours and none of peft / accelerate / fastapi /
albumentations, and does not even mention peft (wrapped layers reach its fast decoder through
registered `LinearView`s, which `samadapt.adapters` provides)."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import samadapt.sam_core

SAM_CORE = Path(samadapt.sam_core.__path__[0])
FORBIDDEN = ("peft", "accelerate", "fastapi", "albumentations", "samadapt.adapters", "samadapt.recipes")


def _sources():
    files = sorted(SAM_CORE.rglob("*.py"))
    assert len(files) >= 10 and SAM_CORE / "fast" / "decoder.py" in files
    return files


def _imported(tree: ast.AST, path: Path):
    """Absolute module names imported anywhere in the file (relative imports resolved)."""
    pkg = ["samadapt", "sam_core"] + list(path.relative_to(SAM_CORE).parent.parts)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = pkg[: len(pkg) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            yield mod
            yield from (f"{mod}.{a.name}" for a in node.names)


def test_sam_core_source_mentions_no_peft():
    hits = [f"{p.relative_to(SAM_CORE)}:{i}" for p in _sources()
            for i, line in enumerate(p.read_text().splitlines(), 1) if "peft" in line.lower()]
    assert not hits, hits


def test_sam_core_imports_none_of_the_forbidden_packages():
    bad = []
    for p in _sources():
        for mod in _imported(ast.parse(p.read_text()), p):
            if any(mod == f or mod.startswith(f + ".") for f in FORBIDDEN):
                bad.append((str(p.relative_to(SAM_CORE)), mod))
    assert not bad, bad


def test_importing_sam_core_loads_none_of_them():
    """At run time too: a fresh interpreter that imports every sam_core module has none loaded."""
    code = (
        "import pkgutil, sys, importlib, samadapt.sam_core as s\n"
        "for m in pkgutil.walk_packages(s.__path__, 'samadapt.sam_core.'): importlib.import_module(m.name)\n"
        f"print(sorted(n for n in sys.modules if n.split('.')[0] in {FORBIDDEN[:4]!r} "
        "or n.startswith(('samadapt.adapters', 'samadapt.recipes'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout
