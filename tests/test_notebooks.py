"""The example notebooks run top to bottom without errors.

Each notebook is executed in a temporary copy (the committed file, with its outputs, is never touched) with
`SAMADAPT_NOTEBOOK_QUICK=1`, which shrinks every size (few steps, few images) so a notebook takes seconds.
"""
import shutil
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="notebook tests need nbformat (pip install -e '.[test]')")
nbclient = pytest.importorskip("nbclient", reason="notebook tests need nbclient (pip install -e '.[test]')")
pytest.importorskip("ipykernel", reason="notebook tests need ipykernel (pip install -e '.[test]')")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ["01_quickstart.ipynb", "02_swap_adapters.ipynb", "03_medical_volumes.ipynb"]
TINY_CORE = ROOT / "recipes" / "weights" / "tiny_generic.safetensors"
CELL_TIMEOUT = 300  # seconds per cell


@pytest.mark.skipif(not TINY_CORE.is_file(),
                    reason=f"the pretrained tiny core {TINY_CORE.relative_to(ROOT)} is missing; the notebooks load it")
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_without_errors(name, tmp_path, monkeypatch):
    committed = ROOT / "notebooks" / name
    before = committed.read_bytes()
    work = tmp_path / name
    shutil.copyfile(committed, work)

    nb = nbformat.read(str(work), as_version=4)
    # the kernel inherits this environment: quick sizes, and temporary files (saved adapters) under tmp_path
    monkeypatch.setenv("SAMADAPT_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3", allow_errors=False,
                                     resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{name}: a cell failed\n{e}", pytrace=False)
    finally:
        nbformat.write(nb, str(work))  # the executed copy, for a look after a failure

    errors = [(i, o.get("ename"), o.get("evalue")) for i, c in enumerate(nb.cells) if c.cell_type == "code"
              for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{name}: error outputs in cells {errors}"
    unexecuted = [
        i for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.source.strip() and c.execution_count is None
    ]
    assert not unexecuted, f"{name}: cells {unexecuted} did not run"
    assert committed.read_bytes() == before, f"{committed} was modified by the test"
