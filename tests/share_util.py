"""Helpers for the sharing tests: a plain HTTP file server on 127.0.0.1 that records request headers,
pointing huggingface_hub at a local `FakeHub`, and adapter files whose tensors are not zero.
"""
import contextlib
import functools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import torch

from samadapt import adapters

TOKEN = "hf_testtoken_0123456789abcdef"  # what the tests pass as HF_TOKEN; must never be printed


@contextlib.contextmanager
def file_server(folder: Path) -> Iterator[Tuple[str, List[Dict[str, str]]]]:
    """Serve `folder` over http on 127.0.0.1; yields (base URL, the headers of every request)."""
    seen: List[Dict[str, str]] = []

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            seen.append(dict(self.headers))
            super().do_GET()

        def do_HEAD(self):
            seen.append(dict(self.headers))
            super().do_HEAD()

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    server.daemon_threads = True
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def point_hub_here(monkeypatch, hub_url: str, home: Path, token: str = TOKEN, offline: bool = False) -> None:
    """What a user sets in the environment (HF_ENDPOINT, HF_TOKEN, HF_HOME, HF_HUB_OFFLINE) for this process.

    huggingface_hub reads its cache folders and offline flag once, at import; the constants are set to
    what those variables would have given (samadapt reads HF_ENDPOINT at call time).
    """
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_ENDPOINT", hub_url)
    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    else:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)


def cli_env(hub_url: str, home: Path, token: str = TOKEN, offline: bool = False) -> Dict[str, str]:
    """The environment for a `samadapt` subprocess talking to the local Hub."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(OMP_NUM_THREADS="1", HF_ENDPOINT=hub_url, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1")
    if token:
        env["HF_TOKEN"] = token
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


def make_adapter(sam, path: Path, name: str = "cod", seed: int = 0, kind: str = "lora", **meta) -> Path:
    """Attach a `kind` adapter, give every tensor random values (a fresh LoRA changes nothing), save, detach."""
    cfg = adapters.config(kind, r=4, targets=["qkv", "mlp.fc1"]) if kind == "lora" else adapters.config(kind)
    adapters.attach(sam, cfg, name=name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapters.adapter_parameters(sam, name):
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    meta.setdefault("domain", "camouflage")
    out = adapters.save(sam, path, name=name, **meta)
    adapters.detach(sam, name)
    return out
