"""AdapterBank: one frozen core serving many domain adapters, loaded on first use, LRU-evicted,
with a per-(image, adapter) embedding cache and batched calls that mix adapters.
"""
import hashlib
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from samadapt.sam_core import ImageEmbedding, SamPredictor

from .base import AdapterError, activate, attached, detach, is_valid_name
from .io import inspect as inspect_file
from .io import load as load_file


def image_key(image: np.ndarray) -> str:
    """Content hash of an image array (shape, dtype and bytes)."""
    a = np.ascontiguousarray(image)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{a.shape}|{a.dtype}".encode())
    h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def listed_files(directory: Optional[Path], sources: Dict[str, Path]) -> Dict[str, Path]:
    """Adapter name -> local file: the catalogue's `sources`, then `directory`'s `<name>.safetensors`
    (listed now; a catalogue name shadows a file of the same name). The listing of `AdapterBank.files`,
    also used where no bank exists (the Ray engine's ingress).

    Example:
        >>> import tempfile
        >>> listed_files(Path(tempfile.mkdtemp()), {})
        {}
    """
    out = dict(sources)
    if directory is not None:
        for p in sorted(Path(directory).glob("*.safetensors")):
            if is_valid_name(p.stem) and p.stem not in out:
                out[p.stem] = p
    return out


def listed_file(directory: Optional[Path], sources: Dict[str, Path], name: str) -> Optional[Path]:
    """The local file adapter `name` loads from under `listed_files`' rules, or None.

    Example:
        >>> listed_file(None, {"cod": Path("cod.safetensors")}, "cod").name
        'cod.safetensors'
    """
    if name in sources:
        return sources[name]
    if directory is not None and is_valid_name(name):
        p = Path(directory) / f"{name}.safetensors"
        return p if p.is_file() else None
    return None


class AdapterBank:
    """Many named adapters resident on one frozen SAM; requests name the adapter they want.

    Adapters come from `directory` (`<name>.safetensors`, loaded on first use) or are attached
    beforehand. At most `capacity` loaded adapters stay resident (least recently used evicted).
    Calls are thread-safe: the model runs one call at a time under a lock, and image embeddings
    are cached per (image, adapter) -- an embedding made under one adapter is never reused for
    another.

    Adapters may also come from a `catalogue`: a YAML/JSON file (or a dict) mapping names to sources
    (`path`, `http(s)://...`, `hf://org/repo/file[@revision]`, each optionally with a `sha256` pin; see
    `sources.load_catalogue`). Remote sources are fetched (through huggingface_hub's cache) and pins
    checked when the bank is made, so a bad entry fails at start-up, not on a request; a catalogue name
    shadows a directory file of the same name.

    Args:
        sam: the frozen `Sam`.
        directory: folder of adapter files (optional).
        capacity: most adapters loaded from the directory kept at once.
        cache_size: most (image, adapter) embeddings kept.
        catalogue: name -> source file or mapping (optional).
        allow_base_mismatch: load adapters made for other base weights too.
        precision: the image encoder's precision on a CPU, `auto`, `bf16` or `fp32` (None:
            `$SAMADAPT_PRECISION`, else `auto`; see `SamPredictor`); `route` says what was taken.

    Example:
        >>> import numpy as np
        >>> from samadapt import adapters
        >>> from samadapt.sam_core import build_sam
        >>> sam = build_sam("tiny")
        >>> adapters.attach(sam, adapters.config("bottleneck"), name="b")
        >>> bank = adapters.AdapterBank(sam)
        >>> masks, scores, low = bank.predict(np.zeros((64, 64, 3), np.uint8), adapter="b", box=[8, 8, 40, 40])
        >>> masks.shape
        (3, 64, 64)
    """

    def __init__(self, sam: nn.Module, directory: Optional[Union[str, os.PathLike]] = None,
                 capacity: int = 8, cache_size: int = 32,
                 catalogue: Optional[Union[str, os.PathLike, Dict[str, Any]]] = None,
                 allow_base_mismatch: bool = False, precision: Optional[str] = None) -> None:
        from .sources import load_catalogue, resolve

        if capacity < 1:
            raise AdapterError(f"capacity={capacity} must be at least 1")
        self.sam = sam
        self.directory = Path(directory) if directory is not None else None
        if self.directory is not None and not self.directory.is_dir():
            raise AdapterError(f"adapter directory {self.directory} does not exist; create it or pass another")
        self.capacity = capacity
        self.cache_size = cache_size
        self.allow_base_mismatch = allow_base_mismatch
        # catalogue name -> local file (fetched and checked now)
        self.sources: Dict[str, Path] = {}
        if catalogue is not None:
            for name, (src, pin) in load_catalogue(catalogue).items():
                self.sources[name] = resolve(src, sha256=pin)
        self._lock = threading.RLock()
        self._loaded: "OrderedDict[str, Tuple[float, int]]" = OrderedDict()  # name -> file (mtime, size)
        self._pinned = set(attached(sam))  # attached by the caller: never evicted
        self._cache: "OrderedDict[Tuple[str, Optional[str], Any], ImageEmbedding]" = OrderedDict()
        self._predictor = SamPredictor(sam, precision=precision)
        # the embeddings whose decoder state (channels-last copy + DecoderImageCache) is kept, so
        # interleaved requests keep their prompt-independent products
        self._recent: "OrderedDict[int, ImageEmbedding]" = OrderedDict()
        self.decoder_state_size = 4
        self.stats = {"loads": 0, "evictions": 0, "cache_hits": 0, "cache_misses": 0}

    @property
    def route(self):
        """The image encoder's route (`SamPredictor.route`: device, precision, attention, why)."""
        return self._predictor.route

    # ------------------------------------------------------------------ catalogue
    def available(self) -> Dict[str, Dict[str, Any]]:
        """Adapters this bank can serve: name -> metadata (files are re-listed on every call, so a
        file dropped into the directory appears and a removed one disappears).
        """
        out: Dict[str, Dict[str, Any]] = {n: {"source": "attached"} for n in sorted(self._pinned)}
        for name, p in self.files().items():
            if name not in out:
                try:
                    out[name] = inspect_file(p)
                except AdapterError as e:
                    out[name] = {"error": str(e)}
        return out

    def files(self) -> Dict[str, Path]:
        """The local file of every adapter the bank can load, by name: the catalogue's, then the
        directory's (listed now).
        """
        return listed_files(self.directory, self.sources)

    def path_of(self, name: str) -> Optional[Path]:
        """The local file adapter `name` would load from (catalogue or directory), or None."""
        return listed_file(self.directory, self.sources, name)

    def _file(self, name: str) -> Path:
        if not is_valid_name(name):
            raise AdapterError(f"adapter name {name!r} is not valid; use a name from the listing")
        path = self.path_of(name)
        if path is None:
            where = f" in {self.directory}" if self.directory is not None else ""
            raise AdapterError(f"no adapter named {name!r}{where}; available: {sorted(self.available())}")
        return path

    def _ensure(self, name: Optional[str]) -> Any:
        """Make adapter `name` resident; returns a version token for the embedding cache."""
        if name is None or name in self._pinned:
            return 0
        path = self._file(name)
        st = path.stat()
        version = (st.st_mtime_ns, st.st_size)
        if name in self._loaded:
            if self._loaded[name] == version:
                self._loaded.move_to_end(name)
                return version
            self._evict(name)  # the file changed on disk: reload it
        while len(self._loaded) >= self.capacity:
            self._evict(next(iter(self._loaded)))
        load_file(self.sam, path, name=name, activate=False, allow_base_mismatch=self.allow_base_mismatch)
        self._loaded[name] = version
        self.stats["loads"] += 1
        return version

    def _evict(self, name: str) -> None:
        from .base import active

        if active(self.sam) == name:
            activate(self.sam, None)
        detach(self.sam, name)
        self._loaded.pop(name, None)
        for key in [k for k in self._cache if k[1] == name]:
            del self._cache[key]
        self.stats["evictions"] += 1

    def preload(self, name: str) -> None:
        """Make adapter `name` resident now (loaded from its file if it is not), as a request for it would.

        Raises:
            AdapterError: no such adapter, or its file does not fit this core.
        """
        with self._lock:
            self._ensure(name)

    def evict(self, name: str) -> bool:
        """Unload adapter `name` (loaded from a file; adapters attached by the caller stay) and drop its
        cached embeddings. Returns whether it was resident.

        Example:
            >>> from samadapt import adapters
            >>> from samadapt.sam_core import build_sam
            >>> adapters.AdapterBank(build_sam("tiny")).evict("absent")
            False
        """
        with self._lock:
            if name not in self._loaded:
                return False
            self._evict(name)
            return True

    def resident(self) -> List[str]:
        """Names of the adapters on the core now: those attached by the caller, then the loaded ones
        from least to most recently used.
        """
        with self._lock:
            return sorted(self._pinned) + list(self._loaded)

    # ------------------------------------------------------------------ embeddings
    def _embeddings(self, images: Sequence[np.ndarray], keys: Sequence[str], name: Optional[str], version) -> list:
        """One `ImageEmbedding` per image under adapter `name`; misses are encoded in one batch."""
        out: List[Any] = [None] * len(images)
        todo = []
        same: Dict[str, List[int]] = {}  # an image repeated in one call is encoded once
        for i, key in enumerate(keys):
            ck = (key, name, version)
            if ck in self._cache:
                self._cache.move_to_end(ck)
                out[i] = self._cache[ck]
                self.stats["cache_hits"] += 1
            elif key in same:
                same[key].append(i)
            else:
                same[key] = [i]
                todo.append(i)
        if todo:
            self.stats["cache_misses"] += len(todo)
            activate(self.sam, name)
            with torch.inference_mode():
                made = self._predictor.encode([images[i] for i in todo])
            for emb, i in zip(made, todo):
                emb.features = emb.features.clone()  # its own storage, not a view of the batch
                self._cache[(keys[i], name, version)] = emb
                for k in same[keys[i]]:
                    out[k] = emb
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return out

    def _decode(self, name: Optional[str], emb: Any,
                prompts: Dict[str, Any]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        activate(self.sam, name)
        self._predictor.set_embedding(emb)
        # the decoder's per-image products live in the embedding's own cache; only the most recent
        # few keep theirs, so the cache's memory stays that of the embeddings
        self._recent.pop(id(emb), None)
        self._recent[id(emb)] = emb
        while len(self._recent) > self.decoder_state_size:
            _, old = self._recent.popitem(last=False)
            old.decoder_cache.clear()
            old.channels_last = None
        with torch.inference_mode():
            return self._predictor.predict(**prompts)

    # ------------------------------------------------------------------ public calls
    def predict(self, image: np.ndarray, adapter: Optional[str] = None, image_id: Optional[str] = None,
                **prompts: Any) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`SamPredictor.predict` on `image` under `adapter` (None: the plain core).

        Prompts: point_coords, point_labels, box, mask_input, multimask_output, return_logits.
        `image_id` names the image for the cache (default: a hash of its pixels).
        """
        return self.predict_batch([dict(prompts, image=image, adapter=adapter, image_id=image_id)])[0]

    def predict_batch(self, items: Sequence[Dict[str, Any]],
                      mode: str = "mixed") -> List[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Many requests at once; items may name different adapters; results come back in the order given.

        Every embedding not in the cache is computed in one encoder pass over all the items, each
        adapter's modules on its own items' rows only (`adapters.mixed`); then each item's prompts
        are decoded under its adapter (its decoder copy or decoder LoRA included).

        Args:
            items: dicts with `image` (H x W x 3 uint8), optional `adapter` (None: the plain core),
                `image_id`, and `SamPredictor.predict`'s prompts.
            mode: `mixed` (one encoder pass), `grouped` (one pass per adapter) or `single` (one pass
                per image); all three give the same results (the last two are for comparison). A batch
                naming more adapter files than `capacity` runs in parts of at most `capacity` adapters.

        Returns:
            one (masks, scores, low-res logits) per item.

        Example:
            >>> import numpy as np
            >>> from samadapt import adapters
            >>> from samadapt.sam_core import build_sam
            >>> sam = build_sam("tiny")
            >>> adapters.attach(sam, adapters.config("bottleneck"), name="b")
            >>> bank = adapters.AdapterBank(sam)
            >>> im = np.zeros((64, 64, 3), np.uint8)
            >>> out = bank.predict_batch([dict(image=im, adapter="b", box=[8, 8, 40, 40]),
            ...                           dict(image=im, box=[4, 4, 30, 30])])
            >>> [m.shape for m, _, _ in out]
            [(3, 64, 64), (3, 64, 64)]
        """
        if mode not in ("mixed", "grouped", "single"):
            raise AdapterError(f"predict_batch mode={mode!r} is not one of 'mixed', 'grouped', 'single'")
        for i, it in enumerate(items):
            if "image" not in it:
                raise AdapterError(f"request {i} has no 'image'")
        with self._lock:
            names = [it.get("adapter") for it in items]
            loaded = [n for n in dict.fromkeys(names) if n is not None and n not in self._pinned]
            if len(loaded) > self.capacity:  # more adapter files than fit at once: in parts that fit
                part_of = {n: k // self.capacity for k, n in enumerate(loaded)}
                parts: Dict[int, List[int]] = {}
                for i, n in enumerate(names):
                    parts.setdefault(part_of.get(n, 0), []).append(i)
                results: List[Any] = [None] * len(items)
                for idx in parts.values():
                    for i, r in zip(idx, self.predict_batch([items[i] for i in idx], mode=mode)):
                        results[i] = r
                return results
            # every adapter resident for the pass: at most `capacity` distinct ones, so loading one never
            # evicts another of this batch (each use moves it to the recent end)
            versions = {name: self._ensure(name) for name in dict.fromkeys(names)}
            keys = [it.get("image_id") or image_key(it["image"]) for it in items]
            entries = self._embeddings_mixed([it["image"] for it in items], keys, names, versions, mode)
            results = []
            for it, name, entry in zip(items, names, entries):
                prompts = {k: v for k, v in it.items() if k not in ("image", "adapter", "image_id")}
                results.append(self._decode(name, entry, prompts))
        return results

    def _embeddings_mixed(self, images: Sequence[np.ndarray], keys: Sequence[str], names: Sequence[Optional[str]],
                          versions: Dict[Optional[str], Any], mode: str) -> list:
        """One `ImageEmbedding` per item under its own adapter; the misses are encoded in one mixed
        pass (`mode="mixed"`), one pass per adapter (`grouped`) or one per image (`single`).
        """
        from .mixed import route

        out: List[Any] = [None] * len(images)
        todo: Dict[Tuple[str, Optional[str], Any], List[int]] = {}  # one encoding per (image, adapter)
        for i, (key, name) in enumerate(zip(keys, names)):
            ck = (key, name, versions[name])
            if ck in self._cache:
                self._cache.move_to_end(ck)
                out[i] = self._cache[ck]
                self.stats["cache_hits"] += 1
            else:
                todo.setdefault(ck, []).append(i)
        if not todo:
            return out
        self.stats["cache_misses"] += len(todo)
        # adapters in contiguous runs: each adapter's rows are then one slice of every routed tensor
        order = sorted(todo, key=lambda ck: (ck[1] is not None, ck[1] or ""))
        if mode == "mixed":
            batches = [order]
        elif mode == "grouped":
            batches = [[ck for ck in order if ck[1] == n] for n in dict.fromkeys(ck[1] for ck in order)]
        else:
            batches = [[ck] for ck in order]
        for batch in batches:
            imgs = [images[todo[ck][0]] for ck in batch]
            owners = [ck[1] for ck in batch]
            with torch.inference_mode():
                if len(set(owners)) == 1:  # one adapter: the ordinary pass
                    activate(self.sam, owners[0])
                    made = self._predictor.encode(imgs)
                else:
                    with route(self.sam, owners):
                        made = self._predictor.encode(imgs)
            for ck, emb in zip(batch, made):
                emb.features = emb.features.clone()  # its own storage, not a view of the batch
                self._cache[ck] = emb
                for i in todo[ck]:
                    out[i] = emb
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return out

    def has_embedding(self, image: np.ndarray, adapter: Optional[str] = None, image_id: Optional[str] = None) -> bool:
        """Whether `image`'s embedding under `adapter` is cached now (a prompt on it needs no encoder
        pass). Answers without waiting on a running model call: a hint, true or stale by a moment.

        Example:
            >>> import numpy as np
            >>> from samadapt import adapters
            >>> from samadapt.sam_core import build_sam
            >>> bank, im = adapters.AdapterBank(build_sam("tiny")), np.zeros((32, 32, 3), np.uint8)
            >>> before = bank.has_embedding(im); _ = bank.embedding(im); before, bank.has_embedding(im)
            (False, True)
        """
        if adapter is None or adapter in self._pinned:
            version: Any = 0
        else:
            path = self.path_of(adapter)
            loaded = self._loaded.get(adapter)
            if path is None or loaded is None:
                return False
            try:
                st = path.stat()
            except OSError:
                return False
            version = (st.st_mtime_ns, st.st_size)
            if loaded != version:
                return False
        return (image_id or image_key(image), adapter, version) in self._cache

    def embedding(self, image: np.ndarray, adapter: Optional[str] = None,
                  image_id: Optional[str] = None) -> torch.Tensor:
        """The (cached) image embedding under `adapter`."""
        with self._lock:
            version = self._ensure(adapter)
            key = image_id or image_key(image)
            return self._embeddings([image], [key], adapter, version)[0].features

    def generate(self, image: np.ndarray, adapter: Optional[str] = None, image_id: Optional[str] = None,
                 **generator_args: Any) -> List[Dict[str, Any]]:
        """Automatic masks for everything in `image` under `adapter` (None: the plain core).

        The whole image's embedding comes from the bank's cache (computed once per image and
        adapter); the model is held for the whole call, so no other request switches adapters
        meanwhile.

        Args:
            image: H x W x 3 uint8.
            adapter: adapter name, or None.
            image_id: names the image for the cache (default: a hash of its pixels).
            **generator_args: `SamAutomaticMaskGenerator` settings (points_per_side,
                pred_iou_thresh, stability_score_thresh, output_mode, ...).

        Returns:
            `SamAutomaticMaskGenerator.generate`'s list of mask records.

        Example:
            >>> import numpy as np
            >>> from samadapt import adapters
            >>> from samadapt.sam_core import build_sam
            >>> bank = adapters.AdapterBank(build_sam("tiny"))
            >>> found = bank.generate(np.zeros((64, 64, 3), np.uint8), points_per_side=4)
            >>> isinstance(found, list)
            True
        """
        from samadapt.sam_core import SamAutomaticMaskGenerator

        with self._lock:
            version = self._ensure(adapter)
            key = image_id or image_key(image)
            emb = self._embeddings([image], [key], adapter, version)[0]
            activate(self.sam, adapter)
            generator_args.setdefault("precision", self._predictor.precision)  # crops: the bank's route
            gen = SamAutomaticMaskGenerator(self.sam, **generator_args)
            with torch.inference_mode():
                return gen.generate(image, embedding=emb)
