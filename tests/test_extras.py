"""Inference alone needs no training or serving stack: with those packages made unimportable, the
Python API and `samadapt predict` / `inspect` work, and `train` / `serve` say which extra to install."""
import json
import subprocess
import sys
import textwrap

import numpy as np
from PIL import Image

# what the `train` and `serve` extras bring (accelerate is not here: peft itself depends on it)
BLOCKED = ("albumentations", "fastapi", "uvicorn", "starlette", "pydantic", "tensorboard", "multipart",
           "python_multipart")

# As if not installed: importing raises ModuleNotFoundError, and availability probes
# (`importlib.util.find_spec`, used by libraries to decide what to import) answer None.
PRELUDE = textwrap.dedent(f"""
    import importlib.abc, importlib.util, sys
    BLOCKED = {BLOCKED!r}

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
            return None

    _find_spec = importlib.util.find_spec

    def find_spec(name, package=None):
        if name.split(".")[0] in BLOCKED:
            return None
        return _find_spec(name, package)

    importlib.util.find_spec = find_spec
    sys.meta_path.insert(0, Block())
""")


def _python(code, tmp_path):
    return subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=600)


def test_inference_api_and_cli_without_training_or_serving_stack(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    p = _python("""
        import json, sys
        import numpy as np
        from samadapt import adapters
        from samadapt.sam_core import SamPredictor, build_sam
        from samadapt.recipes.cli import main

        sam = build_sam("tiny")
        adapters.attach(sam, [adapters.config("lora", r=2), adapters.config("bottleneck", width=4)], name="dom",
                        decoder="lora")
        adapters.save(sam, "dom.safetensors", name="dom")
        fresh = build_sam("tiny")
        fresh.load_state_dict(sam.core_state_dict(), strict=True)
        adapters.load(fresh, "dom.safetensors")
        pred = SamPredictor(fresh)
        pred.set_image(np.zeros((40, 50, 3), np.uint8))
        masks, _, _ = pred.predict(box=np.array([5, 5, 30, 30]), multimask_output=False)
        bank = adapters.AdapterBank(fresh)
        bank_masks, _, _ = bank.predict(np.zeros((40, 50, 3), np.uint8), adapter="dom", box=[5, 5, 30, 30],
                                        multimask_output=False)
        rc_inspect = main(["inspect", "dom.safetensors"])
        rc_predict = main(["predict", "a.png", "--out", "out", "--box", "4,4,40,30"])
        leaked = [m for m in BLOCKED if m in sys.modules]
        print(json.dumps({"masks": list(masks.shape), "same": bool((bank_masks == masks).all()),
                          "inspect": rc_inspect, "predict": rc_predict, "leaked": leaked}))
    """, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out == {"masks": [1, 40, 50], "same": True, "inspect": 0, "predict": 0, "leaked": []}, out
    assert (tmp_path / "out" / "a.png").is_file()
    # the blocker really blocks
    assert "blocked by the test" in _python("import fastapi", tmp_path).stderr


def test_train_and_serve_name_the_missing_extra(tmp_path):
    (tmp_path / "ad").mkdir()
    for argv, extra in ((["train", "demo", "--out", "run"], "train"), (["serve", "--adapters", "ad"], "serve")):
        p = _python(f"""
            import sys
            from samadapt.recipes.cli import main
            sys.exit(main({argv!r}))
        """, tmp_path)
        assert p.returncode == 2, (argv, p.stderr[-2000:])
        assert "Traceback" not in p.stderr, p.stderr
        line = p.stderr.strip().splitlines()[-1]
        assert line.startswith("error: ") and f"samadapt[{extra}]" in line, line
    assert not (tmp_path / "run").exists()  # nothing started, nothing written
