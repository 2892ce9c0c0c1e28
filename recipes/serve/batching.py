"""Dynamic batching for `samadapt serve`: concurrent requests that need an image embedding are
embedded together, in one mixed-adapter encoder pass (`AdapterBank.predict_batch`).

A request whose embedding is not cached joins the batcher's pending list and waits up to
`max_wait_s` for company (or until `max_batch` are pending) before it asks for the model; whoever
gets the model first takes the pending requests (itself first, then the oldest, at most
`max_batch`, at most the bank's capacity of distinct adapters) and runs them as one call; the
others find their answer ready and never take the model. Requests on a cached embedding do not
wait here: they run as before, at once.

It lives inside `ModelRunner`'s limits (`ModelRunner.run(..., batch=...)`): each request is admitted
to the bounded queue on its own (503 beyond), keeps its own time limit (504) and can be cancelled;
a batch stops at its next model step only when every request in it is cancelled, and requests
cancelled before it starts are left out.
"""
import threading
import time
from typing import Any, Callable, Dict, List, Optional

from .work import BatchToken, Cancelled, CancelToken, is_cancelled  # noqa: F401 -- BatchToken re-exported


class Pending:
    """One request waiting in the batcher: its bank item, its cancel token and, once run, its outcome."""

    def __init__(self, item: Dict[str, Any], token: CancelToken) -> None:
        self.item = item
        self.token = token
        self.arrived = time.monotonic()
        self.done = threading.Event()
        self.result: Any = None
        self.error: Optional[BaseException] = None


class EmbedBatcher:
    """Collects embedding requests and runs them in batches.

    Args:
        run_batch: runs a list of bank items at once, returning one result per item
            (`AdapterBank.predict_batch`).
        run_one: runs one item alone (`AdapterBank.predict`); used when a batch fails, so that one
            request's error is its own.
        max_batch: most requests embedded together (1: no batching).
        max_wait_s: longest a request waits for others before asking for the model.
        max_adapters: most distinct adapters in one batch (the bank's capacity).

    Raises:
        ValueError: `max_batch` below 1 or `max_wait_s` negative.

    Example:
        >>> b = EmbedBatcher(lambda items: [i["x"] * 2 for i in items], lambda i: i["x"] * 2, max_batch=4,
        ...                  max_wait_s=0.0)
        >>> b.max_batch, b.pending()
        (4, 0)
    """

    def __init__(self, run_batch: Callable[[List[Dict[str, Any]]], List[Any]],
                 run_one: Callable[[Dict[str, Any]], Any], max_batch: int = 8, max_wait_s: float = 0.005,
                 max_adapters: int = 8) -> None:
        if int(max_batch) < 1:
            raise ValueError(f"max_batch={max_batch!r} must be 1 (no batching) or more, such as 8")
        if not max_wait_s >= 0:
            raise ValueError(f"max_wait_s={max_wait_s!r} must be 0 or more seconds")
        self.run_batch, self.run_one = run_batch, run_one
        self.max_batch, self.max_wait_s, self.max_adapters = int(max_batch), float(max_wait_s), int(max_adapters)
        self._cond = threading.Condition()
        self._pending: List[Pending] = []
        self.stats = {"batches": 0, "batched_requests": 0, "largest_batch": 0}

    def pending(self) -> int:
        """Requests waiting for a batch now."""
        with self._cond:
            return len(self._pending)

    def join(self, item: Dict[str, Any], token: CancelToken) -> Pending:
        """Add a request; it then waits (`wait_for_company`) and runs (`take` by the model holder)."""
        p = Pending(item, token)
        with self._cond:
            self._pending.append(p)
            self._cond.notify_all()
        return p

    def leave(self, p: Pending) -> None:
        """Drop a request that gave up before it ran."""
        with self._cond:
            if p in self._pending:
                self._pending.remove(p)

    def wait_for_company(self, p: Pending) -> None:
        """Wait until `max_batch` requests are pending, `p` has waited `max_wait_s`, or it was run."""
        with self._cond:
            while not p.done.is_set() and len(self._pending) < self.max_batch:
                left = p.arrived + self.max_wait_s - time.monotonic()
                if left <= 0:
                    return
                p.token.check()
                self._cond.wait(min(left, 0.05))

    def take(self, p: Pending) -> List[Pending]:
        """The batch the model holder runs: `p` first, then the oldest live pending requests (empty
        when `p` was already run by another holder).
        """
        with self._cond:
            if p.done.is_set() or p not in self._pending:
                return []
            batch, names = [p], {p.item.get("adapter")}
            for q in self._pending:
                if len(batch) >= self.max_batch:
                    break
                if q is p or is_cancelled(q.token):
                    continue
                name = q.item.get("adapter")
                if name not in names and len([n for n in names | {name} if n is not None]) > self.max_adapters:
                    continue
                names.add(name)
                batch.append(q)
            for q in batch:
                self._pending.remove(q)
            return batch

    def run(self, batch: List[Pending]) -> None:
        """Run `batch` (the caller holds the model) and hand every member its outcome."""
        try:
            try:
                results = self.run_batch([q.item for q in batch])
                for q, r in zip(batch, results):
                    q.result = r
            except Cancelled as e:
                for q in batch:
                    q.error = e
            except Exception:  # noqa: BLE001 -- one member's bad input must not fail the others: run alone
                for q in batch:
                    if is_cancelled(q.token):
                        q.error = Cancelled(q.token.reason or "timeout", True)
                        continue
                    try:
                        q.result = self.run_one(q.item)
                    except BaseException as e:  # noqa: BLE001 -- handed to that request
                        q.error = e
            self.stats["batches"] += 1
            self.stats["batched_requests"] += len(batch)
            self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch))
        finally:
            for q in batch:
                if q.result is None and q.error is None:
                    q.error = Cancelled("shutdown", True)
                q.done.set()
            with self._cond:
                self._cond.notify_all()
