"""Shared fixtures: the tiny core, fresh or pretrained, built once where a test only reads it."""
import pytest
import torch

from samadapt.sam_core import build_sam


@pytest.fixture
def tiny_sam():
    """A fresh tiny core with seeded random weights (eval mode, CPU): the test may attach, train, merge."""
    torch.manual_seed(0)
    return build_sam("tiny").eval()


@pytest.fixture(scope="session")
def tiny_sam_shared():
    """One tiny core for the whole session, for tests that only read it (never attach or write to it)."""
    torch.manual_seed(0)
    return build_sam("tiny").eval()


@pytest.fixture(scope="session")
def pretrained_tiny_path():
    """The committed pretrained tiny core (the CLI's default `--base`)."""
    from samadapt.recipes.model import TINY_CORE

    assert TINY_CORE.is_file(), f"the pretrained tiny core is missing: {TINY_CORE}"
    return TINY_CORE


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A `FakeHub` on 127.0.0.1 (tests/fake_hub.py) that huggingface_hub in this process talks to, with
    share_util's `TOKEN` (the sharing tests)."""
    from fake_hub import FakeHub
    from share_util import TOKEN, point_hub_here

    h = FakeHub(token=TOKEN)
    point_hub_here(monkeypatch, h.url, tmp_path / "hf_home")
    yield h
    h.close()
