"""House rules of the code base, checked: names, sizes, docstring dialect."""
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sam_core", "adapters", "recipes")
MAX_LINES = 500
OLD_TOP_LEVEL = re.compile(r"^\s*(?:import|from)\s+(sam_core|adapters|recipes)\b", re.M)


def _package_files():
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _python_sources():
    for p in sorted(ROOT.rglob("*.py")):
        if not {".venv", ".lsvenv", "build", ".git"} & set(p.relative_to(ROOT).parts):
            yield p, p.read_text(encoding="utf-8")
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(nb.read_text(encoding="utf-8"))["cells"]
        yield nb, "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")


def test_packages_found():
    assert len(_package_files()) > 20


def test_nothing_imports_the_old_top_level_names():
    bad = [f"{p.relative_to(ROOT)}: {m.group(0).strip()}" for p, text in _python_sources()
           for m in OLD_TOP_LEVEL.finditer(text)]
    assert not bad, "import these as samadapt.<name>:\n" + "\n".join(bad)


def test_long_modules_say_why():
    bad = []
    for p in _package_files():
        lines = p.read_text(encoding="utf-8").splitlines()
        if len(lines) > MAX_LINES and not any(line.startswith("# why") for line in lines[:15]):
            bad.append(f"{p.relative_to(ROOT)} ({len(lines)} lines)")
    assert not bad, f"modules over {MAX_LINES} lines need a '# why ...' line at the top, or a split:\n" + "\n".join(
        bad
    )


def test_one_docstring_dialect():
    """Google style with Markdown backticks: no reST roles or double backticks in the packages."""
    rest = re.compile(r":(?:class|func|meth|data|attr|mod|obj|exc):`|``[^`\n]+``")
    bad = [f"{p.relative_to(ROOT)}:{i}: {line.strip()[:80]}" for p in _package_files()
           for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if rest.search(line)]
    assert not bad, "use Markdown backticks (`name`), not reST:\n" + "\n".join(bad[:40])
