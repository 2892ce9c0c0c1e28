"""Bounded model work for `samadapt serve`: one model call at a time, a bounded queue, a time limit
per request, and cancellation that really stops the model.

Every request that needs the model goes through `ModelRunner.run`: it is admitted only while fewer
than `max_queue` others wait (else 503 with `Retry-After`), runs in its own worker thread, and is
cancelled when its time limit passes (504), when the client goes away, or when the server shuts
down (503). Cancelling is cooperative: forward pre-hooks on the core's prompt encoder (called
once per decoder batch, e.g. per batch of automatic-mask points) and on each image-encoder block
check the running request's `CancelToken` and raise `Cancelled`, so the work stops within one
model step instead of running on unseen.

Nothing here waits on the model to answer a question about it: `ModelRunner.state()` reads
counters only, so `/api/health` answers while a heavy request runs.
"""
import asyncio
import contextlib
import math
import threading
import time
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

from torch import nn

from .api import ApiError


class Cancelled(Exception):
    """Raised inside the model work when its request was cancelled.

    Args:
        reason: "timeout", "disconnect" or "shutdown".
        started: whether the model work had begun (False: it was still waiting its turn).
    """

    def __init__(self, reason: str, started: bool) -> None:
        super().__init__(f"cancelled: {reason}")
        self.reason = reason
        self.started = started


class CancelToken:
    """One request's cancel flag and deadline, checked by the model hooks between steps.

    Args:
        deadline: `time.monotonic()` after which `check` raises `Cancelled("timeout")`.

    Example:
        >>> import time
        >>> token = CancelToken(time.monotonic() + 60); token.check()
        >>> token.cancel("disconnect"); token.cancelled
        True
    """

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.reason: Optional[str] = None
        self.started = False

    @property
    def cancelled(self) -> bool:
        return self.reason is not None

    def cancel(self, reason: str) -> None:
        """Ask the work to stop at its next step; the first reason given is kept."""
        if self.reason is None:
            self.reason = reason

    def check(self) -> None:
        """Raise `Cancelled` if cancelled or past the deadline; otherwise return at once."""
        if self.reason is None and time.monotonic() > self.deadline:
            self.reason = "timeout"
        if self.reason is not None:
            raise Cancelled(self.reason, self.started)


class ModelRunner:
    """Runs model calls one at a time in worker threads, with a bounded queue, a time limit and
    cancellation between model steps.

    Args:
        sam: the core the calls drive; hooks on its prompt encoder and image-encoder blocks check
            the running request's cancel flag (and count the steps, see `state`).
        timeout: seconds a request may take, waiting for its turn included (504 when exceeded,
            503 when it never got its turn).
        max_queue: requests allowed to wait while one runs; one more is answered 503.
        grace: seconds to wait for cancelled work to reach its next step before answering anyway.

    Raises:
        ValueError: `timeout` not positive or `max_queue` negative.

    Example:
        >>> from samadapt.sam_core import build_sam
        >>> runner = ModelRunner(build_sam("tiny"), timeout=60, max_queue=4)
        >>> runner.state()["running"], runner.state()["queued"]
        (0, 0)
    """

    def __init__(self, sam: nn.Module, timeout: float = 60.0, max_queue: int = 8, grace: float = 5.0) -> None:
        if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"request timeout {timeout!r} must be a positive number of seconds, such as 60")
        if int(max_queue) < 0:
            raise ValueError(f"max_queue={max_queue!r} must be 0 (no waiting) or more")
        self.timeout = float(timeout)
        self.max_queue = int(max_queue)
        self.grace = float(grace)
        self._gate = threading.Lock()  # the model: one call at a time
        self._state = threading.Lock()  # the counters and the set of live tokens
        self._local = threading.local()  # the token of the request this worker thread runs
        self._tokens: "set[CancelToken]" = set()
        self._running = 0
        self._closing = False
        self._recent_s = 1.0  # moving average of a call's duration, for Retry-After
        self.stats = {"decoder_batches": 0, "encoder_blocks": 0, "completed": 0, "cancelled": 0, "refused": 0}
        # public torch seams (forward pre-hooks), no reach into the core: the prompt encoder runs once per
        # decoder call (one batch of automatic-mask points), each encoder block once per image encoding
        self._hooks = [sam.prompt_encoder.register_forward_pre_hook(self._on_decoder_batch)]
        for block in getattr(sam.image_encoder, "blocks", ()):
            self._hooks.append(block.register_forward_pre_hook(self._on_encoder_block))

    # ------------------------------------------------------------------ hooks (worker threads)
    def _on_decoder_batch(self, module, args) -> None:
        token = getattr(self._local, "token", None)
        if token is not None:
            token.check()
            self.stats["decoder_batches"] += 1  # only the gate holder gets here: no race

    def _on_encoder_block(self, module, args) -> None:
        token = getattr(self._local, "token", None)
        if token is not None:
            token.check()
            self.stats["encoder_blocks"] += 1

    # ------------------------------------------------------------------ state
    def state(self) -> Dict[str, int]:
        """Counters, read without waiting on the model: running, queued, and the `stats`.

        Example:
            >>> from samadapt.sam_core import build_sam
            >>> sorted(ModelRunner(build_sam("tiny")).state())[:3]
            ['cancelled', 'completed', 'decoder_batches']
        """
        with self._state:
            pending = len(self._tokens)
            running = self._running
        return dict(self.stats, running=running, queued=max(0, pending - running))

    def retry_after(self) -> int:
        """Seconds a refused client should wait: the queue ahead times a recent call's duration."""
        with self._state:
            pending = len(self._tokens)
        return int(min(max(1.0, math.ceil(self._recent_s * max(1, pending))), self.timeout))

    def cancel_all(self, reason: str = "shutdown", close: bool = False) -> None:
        """Cancel every admitted request (they stop at their next model step).

        Args:
            reason: reported to the requests ("shutdown" answers 503).
            close: also refuse new requests from now on (the server is stopping).
        """
        with self._state:
            self._closing = self._closing or close
            tokens = list(self._tokens)
        for token in tokens:
            token.cancel(reason)

    # ------------------------------------------------------------------ running
    def _admit(self) -> CancelToken:
        with self._state:
            if self._closing:
                raise ApiError(503, "the server is shutting down; retry against a running server",
                               headers={"Retry-After": "5"})
            if len(self._tokens) > self.max_queue:
                self.stats["refused"] += 1
                full = True
            else:
                full = False
                token = CancelToken(time.monotonic() + self.timeout)
                self._tokens.add(token)
        if full:
            wait = self.retry_after()
            raise ApiError(503, f"the server is busy: one request is running and {self.max_queue} are waiting "
                                f"(--max-queue {self.max_queue}); retry in {wait} s",
                           headers={"Retry-After": str(wait)})
        return token

    def _call(self, token: CancelToken, fn: Callable[[], Any]) -> Any:
        try:
            while not self._gate.acquire(timeout=0.05):
                token.check()  # waiting counts against the time limit, and a cancel ends the wait
            try:
                token.check()
                token.started = True
                with self._holding(token):
                    return fn()
            finally:
                self._gate.release()
        finally:
            with self._state:
                self._tokens.discard(token)

    @contextlib.contextmanager
    def _holding(self, token: Any) -> Iterator[None]:
        """While the model runs for `token` (one request's, or a batch's): counted as running, its token
        the one the model's cancel hooks check, and its time fed to the recent-duration estimate.
        """
        with self._state:
            self._running += 1
        self._local.token = token
        t0 = time.monotonic()
        try:
            yield
        finally:
            self._local.token = None
            self._recent_s = 0.7 * self._recent_s + 0.3 * (time.monotonic() - t0)
            with self._state:
                self._running -= 1

    def _call_batched(self, token: CancelToken, batcher: Any, item: Dict[str, Any]) -> Any:
        """`item`'s answer through `batcher` (`batching.EmbedBatcher`): wait for company, then either
        run a batch as the model holder or find the answer made by another holder's batch.
        """
        p = batcher.join(item, token)
        try:
            batcher.wait_for_company(p)
            while not p.done.is_set():
                if not self._gate.acquire(timeout=0.05):
                    token.check()  # waiting counts against the time limit, and a cancel ends the wait
                    continue
                try:
                    batch = batcher.take(p)
                    if not batch:
                        continue  # another holder ran it: the answer is ready
                    for q in batch:
                        q.token.started = True
                    with self._holding(BatchToken([q.token for q in batch])):
                        batcher.run(batch)
                finally:
                    self._gate.release()
        except BaseException:
            batcher.leave(p)
            raise
        finally:
            with self._state:
                self._tokens.discard(token)
        if p.error is not None:
            raise p.error
        return p.result

    async def run(self, fn: Callable[..., Any], receive: Optional[Callable] = None, what: str = "the request",
                  batch: Optional[Tuple[Any, Dict[str, Any]]] = None) -> Any:
        """Run `fn` (blocking model work) in a worker thread under the limits; returns its result.

        Args:
            fn: the model call (it runs with this request's cancel token checked at every model step).
                With `batch`, `fn(model)` instead, where `model()` returns the item's answer from the
                batcher (so the work after it, such as encoding the answer, runs outside the model).
            receive: the request's ASGI `receive` after its body was read; an `http.disconnect` from it
                cancels the work (the client went away).
            what: the request's name in error messages.
            batch: (`batching.EmbedBatcher`, bank item): the model work is this item, run in a batch
                with other requests' (dynamic batching); the same limits hold for each request.

        Returns:
            whatever `fn` returns; its exceptions are raised here.

        Raises:
            ApiError: 503 with `Retry-After` (queue full, never got its turn, shutting down), 504 (the
                work ran past the time limit).
        """
        token = self._admit()
        loop = asyncio.get_running_loop()
        done: "asyncio.Future[Any]" = loop.create_future()

        def finish(ok: bool, value: Any) -> None:
            if not done.done():
                done.set_result((ok, value))

        def worker() -> None:
            try:
                if batch is None:
                    result = (True, self._call(token, fn))
                else:
                    try:
                        result = (True, fn(lambda: self._call_batched(token, *batch)))
                    finally:  # also when fn never asked for the model
                        with self._state:
                            self._tokens.discard(token)
            except BaseException as e:  # noqa: BLE001 -- handed to the request's coroutine
                result = (False, e)
            try:
                loop.call_soon_threadsafe(finish, *result)
            except RuntimeError:  # the event loop is gone (server stopped): nobody to answer
                pass

        # a daemon thread, not an executor: an interpreter exit never waits for model work
        threading.Thread(target=worker, name="samadapt-model", daemon=True).start()
        watcher = asyncio.ensure_future(_wait_disconnect(receive)) if receive is not None else None
        try:
            waiting = {done} | ({watcher} if watcher else set())
            finished, _ = await asyncio.wait(waiting, timeout=self.timeout + 0.05,
                                             return_when=asyncio.FIRST_COMPLETED)
            if done not in finished:
                token.cancel("disconnect" if watcher is not None and watcher in finished else "timeout")
                await asyncio.wait({done}, timeout=self.grace)
        except asyncio.CancelledError:  # uvicorn cancels the request at shutdown, a test client on close
            token.cancel("shutdown")
            raise
        finally:
            if watcher is not None:
                watcher.cancel()
        if not done.done():  # the work did not reach a model step within the grace: answer anyway
            self.stats["cancelled"] += 1
            raise self._error(Cancelled(token.reason or "timeout", token.started), what)
        ok, value = done.result()
        if ok:
            self.stats["completed"] += 1
            return value
        if isinstance(value, Cancelled):
            self.stats["cancelled"] += 1
            raise self._error(value, what) from None
        raise value

    def _error(self, e: Cancelled, what: str) -> ApiError:
        if e.reason == "shutdown":
            return ApiError(503, f"{what} was stopped: the server is shutting down", headers={"Retry-After": "5"})
        if e.reason == "disconnect":  # nobody reads this answer; a 503 keeps the log honest
            return ApiError(503, f"{what} was cancelled: the client went away")
        if not e.started:
            wait = self.retry_after()
            return ApiError(503, f"{what} waited {self.timeout:g} s (--request-timeout) for its turn at the model "
                                 f"without getting it; the server is busy, retry in {wait} s",
                            headers={"Retry-After": str(wait)})
        return ApiError(504, f"{what} took longer than the {self.timeout:g} s limit (--request-timeout) and was "
                             f"stopped; ask for less work (a smaller image, fewer points_per_side) or raise the limit")


async def _wait_disconnect(receive: Callable) -> None:
    """Return when the client disconnects (the request body was already read)."""
    while True:
        message = await receive()
        if message.get("type") == "http.disconnect":
            return


class BatchToken:
    """The cancel token of a batch: `check` raises only when every member request is cancelled (or
    past its deadline), so one impatient client does not stop the others' work.

    Example:
        >>> import time
        >>> a, b = CancelToken(time.monotonic() + 60), CancelToken(time.monotonic() + 60)
        >>> t = BatchToken([a, b]); a.cancel("disconnect"); t.check()
        >>> b.cancel("timeout"); t.cancelled
        True
    """

    def __init__(self, tokens: Sequence[CancelToken]) -> None:
        self.tokens = list(tokens)
        self.started = True

    @property
    def cancelled(self) -> bool:
        return all(is_cancelled(t) for t in self.tokens)

    def check(self) -> None:
        """Raise `Cancelled` when no member still wants the answer."""
        if self.cancelled:
            raise Cancelled(self.tokens[0].reason or "timeout", True)


def is_cancelled(token: CancelToken) -> bool:
    """Whether `token` is cancelled or past its deadline (its `check` raises)."""
    try:
        token.check()
    except Cancelled:
        return True
    return False
