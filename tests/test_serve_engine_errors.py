"""`samadapt serve --engine ray` refuses bad flags, adapters and catalogues with the single-process
engine's `error:` line (exit 2, no traceback), before any Ray instance starts.

The routes both engines serve are one implementation (`recipes/serve/routes.py`); these are the
start-up checks around them. The answers themselves are compared on a live Ray instance in
tests/test_serve_ray.py (marker `ray`).
"""
import pytest

pytest.importorskip("fastapi")


def catalogue(tmp_path, pin: str):
    from samadapt import adapters
    from samadapt.sam_core import build_sam

    sam = build_sam("tiny")
    adapters.attach(sam, adapters.config("lora", r=2), name="cat_x")
    adapters.save(sam, tmp_path / "cat_x.safetensors", name="cat_x")
    path = tmp_path / "catalogue.yaml"
    path.write_text(f'cat_x:\n  source: cat_x.safetensors\n  sha256: "{pin}"\n')
    return path


def error_of(capsys, argv):
    from samadapt.recipes.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err), err
    return err[-1]


@pytest.mark.parametrize("case", ["pin", "missing", "max_queue", "precision_env"])
def test_ray_engine_refuses_what_the_single_process_engine_refuses(tmp_path, capsys, monkeypatch, case):
    ray = pytest.importorskip("ray")
    adapters_arg, extra = str(tmp_path), []
    if case == "pin":
        adapters_arg = str(catalogue(tmp_path, "0" * 64))
    elif case == "missing":
        adapters_arg = str(tmp_path / "absent")
    elif case == "max_queue":
        extra = ["--max-queue", "-1"]
    else:
        monkeypatch.setenv("SAMADAPT_PRECISION", "fp8")
    argv = ["serve", "--adapters", adapters_arg, "--port", "0", *extra]
    single = error_of(capsys, argv)
    on_ray = error_of(capsys, [*argv, "--engine", "ray"])
    assert single.startswith("error: ") and on_ray == single, (single, on_ray)
    assert not ray.is_initialized()  # refused before Ray started
    words = {"pin": "sha256", "missing": "does not exist", "max_queue": "--max-queue", "precision_env": "fp8"}
    assert words[case] in single, single
    print(f"\n{case}: {on_ray}")
