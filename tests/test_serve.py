"""`samadapt serve` API, in-process (FastAPI TestClient) on the tiny core with three adapters.

  1. listing, health, OpenAPI schema and the page;
  2. uploads of any image mode decode to the RGB pixels PIL gives;
  3. /api/segment under every adapter and the plain core, with points, boxes, both and no prompt,
     PNG and RLE, equals `AdapterBank.predict` of the same request made directly;
  4. /api/auto equals `SamAutomaticMaskGenerator` run directly;
  5. a file dropped into the folder appears, a removed one disappears (and 404s), a broken or
     foreign one is listed as unusable and answers 409;
  6. every bad request gets its 4xx with a message, and the next good request still works.

The helpers at the top (`make_core_and_adapters`, `scene`, `png_bytes`, ...) are shared with
test_serve_load.py and test_serve_browser.py.
"""
import base64
import io
import shutil
from pathlib import Path
from typing import Dict, Sequence, Tuple

import numpy as np
import pytest
import torch
from PIL import Image

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from samadapt import adapters, sam_core  # noqa: E402
from samadapt.adapters import AdapterBank  # noqa: E402
from samadapt.recipes.model import load_base  # noqa: E402
from samadapt.recipes.serve import create_app  # noqa: E402
from samadapt.sam_core.amg_utils import rle_to_mask  # noqa: E402

SEED = 4321
NAMES = ("seg_a", "seg_b", "seg_c")
MAX_UPLOAD = 200_000
MAX_PIXELS = 250_000


# ----------------------------------------------------------------------------- shared helpers
def make_core_and_adapters(root: Path, names: Sequence[str] = NAMES, seed: int = SEED) -> Tuple[Path, Path]:
    """A tiny core checkpoint and a folder of LoRA adapters for it (perturbed so each one differs)."""
    root = Path(root)
    torch.manual_seed(seed)
    ckpt = root / "tiny_core.pth"
    torch.save(sam_core.build_sam("tiny").state_dict(), ckpt)
    folder = root / "adapters"
    folder.mkdir()
    sam = load_base(str(ckpt))
    for i, name in enumerate(names):
        adapters.attach(sam, adapters.config("lora", r=4), name=name)
        g = torch.Generator().manual_seed(seed + 1 + i)
        with torch.no_grad():
            for p in adapters.adapter_parameters(sam, name):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        adapters.save(sam, folder / f"{name}.safetensors", name=name, domain=f"test-{i}")
        adapters.detach(sam, name)
    return ckpt, folder


def scene(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A synthetic RGB image with a few objects on a textured background."""
    rng = np.random.default_rng(seed)
    img = rng.integers(20, 70, (h, w, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:h, :w]
    img[(yy - h * 0.45) ** 2 + (xx - w * 0.3) ** 2 < (min(h, w) * 0.22) ** 2] = (220, 60, 50)
    img[int(h * 0.2): int(h * 0.7), int(w * 0.6): int(w * 0.9)] = (40, 190, 90)
    img[int(h * 0.75): int(h * 0.9), int(w * 0.1): int(w * 0.8)] = (230, 210, 60)
    return img


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    return buf.getvalue()


def decode_masks(resp: Dict) -> np.ndarray:
    """C x H x W bool masks from a /api/segment response (either format)."""
    out = []
    for m in resp["masks"]:
        if isinstance(m, str):
            out.append(np.asarray(Image.open(io.BytesIO(base64.b64decode(m)))).astype(bool))
        else:
            out.append(rle_to_mask(m))
    return np.stack(out)


def mask_hash(mask: np.ndarray) -> str:
    """The page's `data-mask-hash`: 32-bit FNV-1a over the row-major 0/1 pixels."""
    h = 0x811C9DC5
    for b in np.asarray(mask, dtype=np.uint8).ravel().tolist():
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return f"{h:08x}"


def bank_kwargs(body: Dict) -> Dict:
    """The `AdapterBank.predict` prompts equivalent to a /api/segment body."""
    kw = {"multimask_output": body.get("multimask", True)}
    if body.get("points"):
        kw["point_coords"] = np.array([p[:2] for p in body["points"]], dtype=float)
        kw["point_labels"] = np.array([p[2] for p in body["points"]], dtype=int)
    if body.get("box") is not None:
        kw["box"] = np.array(body["box"], dtype=float)
    return kw


def best_mask(bank, img: np.ndarray, adapter, points=(), box=None, multimask: bool = True):
    """The bank's highest-scoring mask for a page's prompts (points as [x, y, label]) and how many it gave."""
    masks, scores, _ = bank.predict(img, adapter=adapter,
                                    **bank_kwargs({"points": list(points), "box": box, "multimask": multimask}))
    return masks[int(np.argmax(scores))], len(scores)


def assert_matches(resp: Dict, want: Tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    masks, scores, _ = want
    got = decode_masks(resp)
    assert got.shape == masks.shape
    assert np.array_equal(got, masks)
    assert np.array_equal(np.asarray(resp["scores"], dtype=np.float32), scores)
    assert resp["best"] == int(np.argmax(scores))


IMG = scene(96, 128, seed=1)
IMG2 = scene(120, 90, seed=2)
PROMPTS = [
    {"points": [[40, 45, 1]]},
    {"points": [[40, 45, 1], [100, 20, 0]], "multimask": False},
    {"box": [80, 15, 118, 70]},
    {"points": [[95, 40, 1]], "box": [70, 10, 120, 75]},
    {},  # promptless
    {"points": [[0, 0, 1], [128, 96, 0]]},  # the image corners are inside
]


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_core_and_adapters(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def client(env):
    ckpt, folder = env
    app = create_app(load_base(str(ckpt)), folder, max_upload_bytes=MAX_UPLOAD, max_pixels=MAX_PIXELS, image_cache=4)
    with TestClient(app, base_url="http://localhost") as c:
        yield c


@pytest.fixture(scope="module")
def ref_bank(env):
    ckpt, folder = env
    return AdapterBank(load_base(str(ckpt)), folder)


def upload(client, data: bytes, name: str = "x.png", ctype: str = "image/png"):
    return client.post("/api/images", files={"file": (name, data, ctype)})


@pytest.fixture(scope="module")
def image_id(client):
    r = upload(client, png_bytes(IMG))
    assert r.status_code == 200, r.text
    return r.json()["image_id"]


# ----------------------------------------------------------------------------- 1. listing, schema, page
def test_health_and_listing(client):
    h = client.get("/api/health").json()
    assert h["status"] == "ok" and h["arch"] == "tiny" and h["adapters"] == len(NAMES)
    assert h["max_upload_bytes"] == MAX_UPLOAD and h["max_pixels"] == MAX_PIXELS
    listing = client.get("/api/adapters").json()
    assert [a["name"] for a in listing["adapters"]] == list(NAMES)
    for i, a in enumerate(listing["adapters"]):
        assert a["compatible"] and a["error"] is None and a["source"] == "file"
        assert (
            a["kinds"] == ["lora"] and a["domain"] == f"test-{i}" and a["parameters"] > 0 and a["base_arch"] == "tiny"
        )


def test_openapi_documents_the_api(client):
    spec = client.get("/openapi.json").json()
    ops = {(path, m): op for path, item in spec["paths"].items() for m, op in item.items()}
    assert set(ops) == {("/api/health", "get"), ("/api/adapters", "get"), ("/api/images", "post"),
                        ("/api/segment", "post"), ("/api/auto", "post")}
    assert all(op.get("summary") for op in ops.values())
    schemas = spec["components"]["schemas"]
    for name in (
        "SegmentRequest",
        "SegmentResponse",
        "AutoRequest",
        "AutoResponse",
        "AdapterList",
        "ImageInfo",
        "ErrorBody",
    ):
        assert name in schemas, name
    props = schemas["SegmentRequest"]["properties"]
    assert {"image_id", "adapter", "points", "box", "multimask", "format"} <= set(props)
    assert "422" in ops["/api/segment", "post"]["responses"] and "413" in ops["/api/images", "post"]["responses"]


def test_page_is_self_contained(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "connect-src 'self'" in r.headers["content-security-policy"]
    html = r.text
    for needle in ('id="file"', 'id="adapter"', 'id="canvas"', 'id="status"', 'id="clear"', "data-mask-hash"):
        assert needle in html, needle
    assert "http://" not in html and "https://" not in html and "<script src" not in html and "@import" not in html


# ----------------------------------------------------------------------------- 2. uploads
def _encode(img: np.ndarray, mode: str, fmt: str) -> bytes:
    im = Image.fromarray(img)
    if mode == "RGBA":
        im = im.convert("RGBA")
        im.putalpha(Image.fromarray((np.arange(img.shape[1]) % 256).astype(np.uint8)[None].repeat(img.shape[0], 0)))
    elif mode == "I;16":
        im = Image.fromarray((img[..., 0].astype(np.uint16) * 200 + 7))
    elif mode != "RGB":
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    "mode,fmt",
    [
        ("RGB", "PNG"),
        ("L", "PNG"),
        ("RGBA", "PNG"),
        ("P", "PNG"),
        ("1", "PNG"),
        ("RGB", "JPEG"),
        ("CMYK", "TIFF"),
        ("I;16", "PNG"),
        ("RGB", "BMP"),
        ("RGB", "WEBP"),
    ],
)
def test_upload_any_mode_is_rgb(client, mode, fmt):
    data = _encode(IMG, mode, fmt)
    r = upload(client, data, name=f"x.{fmt.lower()}")
    assert r.status_code == 200, r.text
    info = r.json()
    assert (info["width"], info["height"]) == (128, 96) and info["format"] == fmt
    got = client.app.state.images.get(info["image_id"])
    im = Image.open(io.BytesIO(data))
    if mode == "I;16":
        a = np.asarray(im, dtype=np.float64)
        want = np.clip((a - a.min()) / (a.max() - a.min()) * 255 + 0.5, 0, 255).astype(np.uint8)
        want = np.repeat(want[..., None], 3, axis=2)
    else:
        want = np.asarray(im.convert("RGB"))
    assert got.dtype == np.uint8 and got.shape == (96, 128, 3)
    assert np.array_equal(got, want)
    assert upload(client, data).json()["image_id"] == info["image_id"]  # same pixels, same id


# ----------------------------------------------------------------------------- 3. segment == AdapterBank.predict
@pytest.mark.parametrize("adapter", [None, *NAMES])
def test_segment_equals_bank(client, ref_bank, image_id, adapter):
    for i, prompt in enumerate(PROMPTS):
        for fmt in ("png", "rle"):
            body = dict(prompt, image_id=image_id, adapter=adapter, format=fmt)
            r = client.post("/api/segment", json=body)
            assert r.status_code == 200, (i, r.text)
            resp = r.json()
            assert (resp["width"], resp["height"], resp["adapter"]) == (128, 96, adapter)
            assert len(resp["masks"]) == (1 if prompt.get("multimask") is False else 3)
            assert_matches(resp, ref_bank.predict(IMG, adapter=adapter, **bank_kwargs(body)))


def test_adapters_change_the_masks(client, image_id):
    results = {}
    for a in (None, *NAMES):
        r = client.post("/api/segment", json={"image_id": image_id, "adapter": a, "points": [[40, 45, 1]]}).json()
        results[a] = (decode_masks(r), tuple(r["scores"]))
    for a in NAMES:
        assert results[a][1] != results[None][1], a
        assert not np.array_equal(results[a][0], results[None][0]), a


def test_embeddings_are_computed_once_per_image_and_adapter(client, image_id):
    bank = client.app.state.bank
    body = {"image_id": image_id, "adapter": "seg_b", "points": [[10, 10, 1]]}
    assert client.post("/api/segment", json=body).status_code == 200
    misses = bank.stats["cache_misses"]
    for x in range(5, 120, 20):
        assert client.post("/api/segment", json=dict(body, points=[[x, 50, 1]])).status_code == 200
    assert bank.stats["cache_misses"] == misses


def test_second_image(client, ref_bank):
    iid = upload(client, png_bytes(IMG2)).json()["image_id"]
    body = {"image_id": iid, "adapter": "seg_c", "points": [[30, 50, 1]], "box": [5, 5, 80, 110]}
    assert_matches(
        client.post("/api/segment", json=body).json(), ref_bank.predict(IMG2, adapter="seg_c", **bank_kwargs(body))
    )


# ----------------------------------------------------------------------------- 4. auto == generator
@pytest.mark.parametrize("adapter", [None, "seg_b"])
def test_auto_equals_generator(env, client, image_id, adapter):
    ckpt, folder = env
    body = {"image_id": image_id, "adapter": adapter, "points_per_side": 4, "pred_iou_thresh": 0.0,
            "stability_score_thresh": 0.0}
    r = client.post("/api/auto", json=body)
    assert r.status_code == 200, r.text
    got = r.json()["masks"]
    sam = load_base(str(ckpt))
    if adapter:
        adapters.load(sam, folder / f"{adapter}.safetensors")
    gen = sam_core.SamAutomaticMaskGenerator(sam, points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                                             output_mode="uncompressed_rle")
    want = sorted(gen.generate(IMG), key=lambda m: -m["predicted_iou"])
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        assert set(g) == set(w)  # segment_anything's keys, no more, no fewer
        assert g["segmentation"] == w["segmentation"] and g["segmentation"]["size"] == [96, 128]
        assert g["bbox"] == w["bbox"] and g["area"] == w["area"] == int(rle_to_mask(g["segmentation"]).sum())
        assert g["predicted_iou"] == pytest.approx(w["predicted_iou"], abs=0)
        assert g["point_coords"] == w["point_coords"] and g["crop_box"] == list(w["crop_box"])
    assert [m["predicted_iou"] for m in got] == sorted((m["predicted_iou"] for m in got), reverse=True)
    capped = client.post("/api/auto", json=dict(body, max_masks=1)).json()["masks"]
    assert len(capped) == 1 and capped[0] == got[0]


# ----------------------------------------------------------------------------- 5. the folder is live
def test_dropped_and_removed_files(env, ref_bank, tmp_path):
    ckpt, folder = env
    d = tmp_path / "live"
    shutil.copytree(folder, d)
    c = TestClient(create_app(load_base(str(ckpt)), d), base_url="http://localhost")
    iid = upload(c, png_bytes(IMG)).json()["image_id"]
    names = lambda: [a["name"] for a in c.get("/api/adapters").json()["adapters"]]  # noqa: E731
    body = {"image_id": iid, "points": [[40, 45, 1]]}
    want_a = ref_bank.predict(IMG, adapter="seg_a", **bank_kwargs(body))

    shutil.copy(d / "seg_a.safetensors", d / "seg_new.safetensors")
    assert names() == ["seg_a", "seg_b", "seg_c", "seg_new"]
    assert_matches(c.post("/api/segment", json=dict(body, adapter="seg_new")).json(), want_a)
    assert_matches(c.post("/api/segment", json=dict(body, adapter="seg_a")).json(), want_a)

    (d / "seg_a.safetensors").unlink()
    assert names() == ["seg_b", "seg_c", "seg_new"]
    r = c.post("/api/segment", json=dict(body, adapter="seg_a"))
    assert r.status_code == 404 and "no adapter named 'seg_a'" in r.json()["detail"]
    assert_matches(c.post("/api/segment", json=dict(body, adapter="seg_new")).json(), want_a)

    # files that cannot be served: listed as such, and a clear 409
    (d / "broken.safetensors").write_bytes(b"\x00" * 40)
    (d / "not a name.safetensors").write_bytes(b"")
    other = sam_core.build_sam("tiny")  # other core weights
    adapters.attach(other, adapters.config("lora", r=4), name="foreign")
    adapters.save(other, d / "foreign.safetensors", name="foreign")
    listing = {a["name"]: a for a in c.get("/api/adapters").json()["adapters"]}
    assert sorted(listing) == ["broken", "foreign", "seg_b", "seg_c", "seg_new"]
    assert not listing["broken"]["compatible"] and listing["broken"]["error"]
    assert not listing["foreign"]["compatible"] and listing["foreign"]["error"] is None
    for name in ("broken", "foreign"):
        r = c.post("/api/segment", json=dict(body, adapter=name))
        assert r.status_code == 409 and name in r.json()["detail"], r.text
    assert_matches(c.post("/api/segment", json=dict(body, adapter="seg_new")).json(), want_a)


# ----------------------------------------------------------------------------- 6. bad requests
def _big_png() -> bytes:
    return png_bytes(np.zeros((600, 600, 3), np.uint8))  # 360,000 pixels, a few KB


BAD = [  # (id, path, request kwargs or callable(image_id) -> kwargs, status, text in detail)
    (
        "upload-too-big",
        "/api/images",
        {"files": {"file": ("x.png", b"\x89PNG" + b"0" * MAX_UPLOAD, "image/png")}},
        413,
        "limit",
    ),
    (
        "body-too-big",
        "/api/images",
        {"files": {"file": ("x.png", b"0" * (MAX_UPLOAD + 2**20 + 10), "image/png")}},
        413,
        "limit",
    ),
    ("too-many-pixels", "/api/images", {"files": {"file": ("x.png", _big_png(), "image/png")}}, 413, "360,000 pixels"),
    (
        "not-an-image",
        "/api/images",
        {"files": {"file": ("x.txt", b"hello, world", "text/plain")}},
        415,
        "not an image",
    ),
    ("empty-file", "/api/images", {"files": {"file": ("x.png", b"", "image/png")}}, 400, "empty"),
    ("truncated", "/api/images", {"files": {"file": ("x.png", png_bytes(IMG)[:300], "image/png")}}, 400, "truncated"),
    ("no-file-field", "/api/images", {"data": {"other": "1"}}, 422, "file"),
    (
        "unknown-adapter",
        "/api/segment",
        lambda i: {"json": {"image_id": i, "adapter": "nope"}},
        404,
        "no adapter named 'nope'",
    ),
    ("dotdot-adapter", "/api/segment", lambda i: {"json": {"image_id": i, "adapter": "../seg_a"}}, 400, "not valid"),
    (
        "path-adapter",
        "/api/segment",
        lambda i: {"json": {"image_id": i, "adapter": "seg_a/../../etc"}},
        400,
        "not valid",
    ),
    (
        "suffix-adapter",
        "/api/segment",
        lambda i: {"json": {"image_id": i, "adapter": "seg_a.safetensors"}},
        400,
        "not valid",
    ),
    ("empty-adapter", "/api/segment", lambda i: {"json": {"image_id": i, "adapter": ""}}, 400, "not valid"),
    ("long-adapter", "/api/segment", lambda i: {"json": {"image_id": i, "adapter": "a" * 65}}, 400, "not valid"),
    (
        "very-long-adapter",
        "/api/segment",
        lambda i: {"json": {"image_id": i, "adapter": "b" * 5000}},
        400,
        "not valid",
    ),
    (
        "control-char-adapter",
        "/api/segment",
        lambda i: {"json": {"image_id": i, "adapter": "seg_a\n"}},
        400,
        "not valid",
    ),
    (
        "point-outside",
        "/api/segment",
        lambda i: {"json": {"image_id": i, "points": [[10, 10, 1], [1000, 5, 1]]}},
        422,
        "points[1] = [1000, 5]",
    ),
    ("point-negative", "/api/segment", lambda i: {"json": {"image_id": i, "points": [[-3, 10, 0]]}}, 422, "-3"),
    ("box-outside", "/api/segment", lambda i: {"json": {"image_id": i, "box": [0, 0, 50, 97]}}, 422, "[50, 97]"),
    ("box-empty", "/api/segment", lambda i: {"json": {"image_id": i, "box": [50, 10, 20, 40]}}, 422, "empty"),
    ("bad-label", "/api/segment", lambda i: {"json": {"image_id": i, "points": [[1, 1, 2]]}}, 422, "0 or 1"),
    ("short-point", "/api/segment", lambda i: {"json": {"image_id": i, "points": [[1, 1]]}}, 422, "points"),
    ("many-points", "/api/segment", lambda i: {"json": {"image_id": i, "points": [[1, 1, 1]] * 65}}, 422, "points"),
    (
        "nan",
        "/api/segment",
        lambda i: {
            "content": '{"image_id": "%s", "points": [[NaN, 1, 1]]}' % i,
            "headers": {"content-type": "application/json"},
        },
        422,
        "finite",
    ),
    ("bad-format", "/api/segment", lambda i: {"json": {"image_id": i, "format": "jpeg"}}, 422, "format"),
    ("extra-field", "/api/segment", lambda i: {"json": {"image_id": i, "pointz": []}}, 422, "pointz"),
    ("unknown-image", "/api/segment", lambda i: {"json": {"image_id": "0" * 32}}, 404, "unknown image id"),
    ("no-image-id", "/api/segment", lambda i: {"json": {"points": []}}, 422, "image_id"),
    (
        "malformed-json",
        "/api/segment",
        lambda i: {"content": b'{"image_id": ', "headers": {"content-type": "application/json"}},
        422,
        "JSON",
    ),
    (
        "chunked-too-big",
        "/api/segment",
        lambda i: {"content": (b" " * 65536 for _ in range(20)), "headers": {"content-type": "application/json"}},
        413,
        "limit",
    ),
    (
        "huge-json",
        "/api/segment",
        lambda i: {"content": b" " * (2**20 + 1), "headers": {"content-type": "application/json"}},
        413,
        "limit",
    ),
    (
        "auto-too-dense",
        "/api/auto",
        lambda i: {"json": {"image_id": i, "points_per_side": 65}},
        422,
        "points_per_side",
    ),
    ("auto-zero", "/api/auto", lambda i: {"json": {"image_id": i, "points_per_side": 0}}, 422, "points_per_side"),
    ("auto-unknown-adapter", "/api/auto", lambda i: {"json": {"image_id": i, "adapter": "nope"}}, 404, "nope"),
    ("auto-unknown-image", "/api/auto", lambda i: {"json": {"image_id": "x"}}, 404, "unknown image id"),
]


@pytest.mark.parametrize("case", BAD, ids=[b[0] for b in BAD])
def test_bad_request_then_good_one(client, ref_bank, image_id, case):
    _, path, kwargs, status, text = case
    kwargs = kwargs(image_id) if callable(kwargs) else kwargs
    r = client.post(path, **kwargs)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and text in detail, detail
    good = {"image_id": image_id, "adapter": "seg_a", "points": [[40, 45, 1]], "box": [20, 20, 70, 80]}
    r = client.post("/api/segment", json=good)
    assert r.status_code == 200, r.text
    assert_matches(r.json(), ref_bank.predict(IMG, adapter="seg_a", **bank_kwargs(good)))


def test_other_http_errors_are_json(client):
    r = client.get("/api/nothing")
    assert r.status_code == 404 and r.json()["detail"]
    r = client.get("/api/segment")
    assert r.status_code == 405 and r.json()["detail"]


def test_forgotten_image_is_404_until_reuploaded(client, image_id):
    ids = [upload(client, png_bytes(scene(40, 40, seed=100 + k))).json()["image_id"] for k in range(4)]  # cache of 4
    r = client.post("/api/segment", json={"image_id": image_id})
    assert r.status_code == 404 and "unknown image id" in r.json()["detail"]
    assert client.post("/api/segment", json={"image_id": ids[-1]}).status_code == 200
    assert upload(client, png_bytes(IMG)).json()["image_id"] == image_id
    assert client.post("/api/segment", json={"image_id": image_id}).status_code == 200
