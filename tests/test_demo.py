"""The embedded default: a camouflage adapter on the frozen pretrained tiny core must beat the frozen
core on held-out synthetic camouflage images by a wide margin. A wrong loss sign, a frozen adapter
or an adapter that is never activated would fail this."""
import json

import pytest

from recipes.config import load_recipe
from recipes.trainer import TINY_CORE, train

pytestmark = pytest.mark.skipif(not TINY_CORE.is_file(), reason=f"{TINY_CORE} missing")

# a shorter version of recipes/demo.yaml (same model, data domain, loss and optimiser)
SHORT = ["train.epochs=2", "data.synthetic_train_size=160", "data.synthetic_eval_size=24", "eval.samples=2"]


def test_adapter_beats_frozen_core_on_camouflage(tmp_path):
    cfg = load_recipe("demo", SHORT)
    res = train(cfg, out_dir=str(tmp_path / "run"), progress=False, log=lambda *a: None)
    frozen = res["baseline"]["eval"]
    adapted = res["adapted"]["eval"]
    print("frozen", frozen)
    print("adapted", adapted)
    assert adapted["s_measure"] - frozen["s_measure"] >= 0.15, (frozen, adapted)
    assert adapted["mae"] < frozen["mae"]
    # the exported file carries the same metrics and the resolved recipe
    import adapters
    info = adapters.inspect(tmp_path / "run" / "adapter.safetensors")
    assert info["metrics"]["eval"]["s_measure"] == pytest.approx(adapted["s_measure"])
    assert "camouflage" in info["recipe"]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["baseline"]["eval"] == frozen
