"""Where a slide's tasks run: in this process, in order (:class:`SerialExecutor`), or on a
Dask cluster with bounded submission (:class:`DaskExecutor`); and the two ways the phases
use them (:func:`mapped` for many tasks, :func:`one` for a single one).

Executors know no phase: a task that runs the network says so by being a
:class:`NetworkTask`, and the phase modules import this one, never the reverse.

``interrupt()`` (Ctrl-C) stops every slide in whatever phase it is: no task starts after
it, the Dask tasks in flight are cancelled, and each slide's thread gets
:class:`SlideInterrupted` at once instead of waiting for its running task to end.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

Task = Callable[[Any], Any]


class SlideInterrupted(BaseException):
    """Raised in a slide's client thread once the run is interrupted (Ctrl-C), at its next
    task result or progress report: a ``BaseException``, so the slide's own error handling
    does not record it as a failure; its finished tiles stay in ``.work`` for the re-run."""


@dataclass(frozen=True)
class NetworkTask:
    """``fn``, a task that runs the network: on a GPU layout it goes to the GPU workers
    (planning too: the fingerprint records the planning worker's runtime). ``stages``, if
    given, do the same work as three chained tasks (read, predict, post-process), which a
    layout with a CPU pool beside its GPUs runs there, the network stage on a GPU."""

    fn: Task
    stages: tuple[Task, Task, Task] | None = None

    def __call__(self, item: Any) -> Any:
        return self.fn(item)

    @property
    def __name__(self) -> str:  # Dask names the tasks' keys after it
        return getattr(self.fn, "__name__", type(self).__name__)


class SerialExecutor:
    """Runs tasks in this process, in order (tests, debugging, ``--workers 0``)."""

    def __init__(self) -> None:
        self._stop = threading.Event()

    def interrupt(self) -> None:
        """No task starts after this (a running one runs in the caller's thread, which the
        signal reaches itself)."""
        self._stop.set()

    def map(self, fn: Task, items: Iterable[Any]) -> Iterator[tuple[Any, Any]]:
        for item in items:
            if self._stop.is_set():
                raise SlideInterrupted("the run was interrupted")
            try:
                yield item, fn(item)
            except Exception as exc:  # reported per item, like the Dask executor
                log.debug("task failed", exc_info=True)
                yield item, exc


class DaskExecutor:
    """Bounded submission to a Dask client (backpressure, retries, per-item errors).

    ``predict_resources`` (e.g. ``{"GPU": 1}``) keeps the tasks that run the network
    (:class:`NetworkTask`) on the GPU workers. With ``post_resources`` as well
    (``{"POOL": 1}``: a local GPU layout's CPU pool), a network task with stages becomes
    three chained tasks: reading on the pool, the network on a GPU worker, post-processing
    on the pool, the windows and network outputs going worker to worker; ``max_in_flight``
    bounds the batches in flight, so windows and outputs never pile up beyond that many.
    """

    def __init__(self, client: Any, max_in_flight: int = 64, retries: int = 2,
                 predict_resources: dict[str, float] | None = None,
                 post_resources: dict[str, float] | None = None):
        self.client = client
        self.max_in_flight = max_in_flight
        self.retries = retries
        self.predict_resources = predict_resources
        self.post_resources = post_resources
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._live: weakref.WeakSet[Any] = weakref.WeakSet()  # futures not yet released

    def interrupt(self) -> None:
        """Cancel every task in flight and submit none after this: each slide waiting on
        one gets its result (cancelled) now, and :class:`SlideInterrupted` with it."""
        with self._lock:
            self._stop.set()
            futures = list(self._live)
        if futures:
            self.client.cancel(futures)

    def submit(self, fn: Task, *args: Any, **kwargs: Any) -> Any:
        """``client.submit``, recorded for :meth:`interrupt` (what ``bounded_map`` calls)."""
        with self._lock:
            if self._stop.is_set():
                raise SlideInterrupted("the run was interrupted")
            future = self.client.submit(fn, *args, **kwargs)
            self._live.add(future)
        return future

    @classmethod
    def for_layout(cls, client: Any, layout: Any, **kwargs: Any) -> DaskExecutor:
        """The executor for a cluster of ``layout`` (``None``: an attached scheduler,
        whose workers are unknown: no resources are asked for)."""
        from pipeline.cluster import post_resources, predict_resources

        return cls(client, predict_resources=predict_resources(layout),
                   post_resources=post_resources(layout), **kwargs)

    def map(self, fn: Task, items: Iterable[Any]) -> Iterator[tuple[Any, Any]]:
        from pipeline.cluster import TaskFailure, bounded_map

        base = fn.fn if isinstance(fn, NoRetry) else fn  # NoRetry wraps the single-task phases
        resources = self.predict_resources if isinstance(base, NetworkTask) else None
        then: list[tuple[Task, dict[str, float] | None]] = []
        if isinstance(base, NetworkTask) and base.stages and self.post_resources:
            read, predict, post = base.stages  # read -> predict -> post-process
            fn, resources = read, self.post_resources
            then = [(predict, self.predict_resources), (post, self.post_resources)]
        with contextlib.closing(bounded_map(self, fn, items, self.max_in_flight, retries=self.retries,
                                            resources=resources, then=then)) as results:
            for item, result in results:
                if self._stop.is_set():  # e.g. the task was cancelled by interrupt()
                    raise SlideInterrupted("the run was interrupted")
                yield item, result.exception if isinstance(result, TaskFailure) else result


@dataclass(frozen=True)
class NoRetry:
    """``fn`` with errors that cannot succeed on a retry (an unreadable file, bad settings:
    :class:`PipelineError`) returned instead of raised, so that Dask neither re-runs the
    task nor logs its traceback; the client raises them (:func:`one`)."""

    fn: Task

    def __call__(self, job: Any) -> Any:
        try:
            return self.fn(job)
        except PipelineError as exc:
            return exc

    @property
    def __name__(self) -> str:  # Dask names the tasks' keys after it
        return getattr(self.fn, "__name__", type(self).__name__)


@contextlib.contextmanager
def mapped(executor: Any, fn: Task, items: Iterable[Any]) -> Iterator[Iterator[tuple[Any, Any]]]:
    """``executor.map(fn, items)``, closed on any exit: a generator (``DaskExecutor``)
    then releases its queued futures at once, so the tasks of a slide that failed or was
    interrupted are cancelled now, not when the traceback that holds the generator is
    freed."""
    results = executor.map(fn, items)
    try:
        yield results
    finally:
        close = getattr(results, "close", None)
        if close is not None:
            close()


@contextlib.contextmanager
def completed(executor: Any, fn: Task, items: Iterable[Any]) -> Iterator[Iterator[tuple[Any, Any]]]:
    """:func:`mapped` whose (item, result) pairs raise a task's error where its result
    would come: a phase stops at its first failed task."""
    with mapped(executor, fn, items) as results:
        yield (_raised(pair) for pair in results)


def _raised(pair: tuple[Any, Any]) -> tuple[Any, Any]:
    if isinstance(pair[1], Exception):
        raise pair[1]
    return pair


def one(executor: Any, fn: Task, job: Any) -> Any:
    """``fn(job)`` as one task that is not retried for a :class:`PipelineError`; its error
    raised here."""
    with completed(executor, NoRetry(fn), [job]) as results:
        for _, result in results:
            return result
    raise RuntimeError("executor returned nothing")
