"""Task submission with a bounded number of futures (:func:`bounded_map`) and the one-line
report of a failed task.

Dask reports every failed task attempt on the worker as a multi-line "Compute Failed"
block with a traceback; :class:`QuietTaskErrors` drops those (unless ``debug``), because
:func:`bounded_map` logs one line per failed item itself.

"""

from __future__ import annotations

import logging
import threading
import traceback
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from distributed import Client, WorkerPlugin, as_completed

from pipeline.cluster.errors import JobSubmitError

log = logging.getLogger(__name__)

QUIET_PLUGIN_NAME = "wsi-nuclei-quiet-task-errors"
ITEM_REPR_CHARS = 120  # how much of a failed item's repr the one-line failure report shows
WAIT_POLL_S = 0.5  # how often a wait for results checks that the cluster can still get workers

T = TypeVar("T")


class TaskFailureFilter(logging.Filter):
    """Drops Dask's own reports of a failed task: the worker's multi-line "Compute Failed"
    block (key, task repr, exception, traceback; one per attempt) and the scheduler's
    "marked as failed because workers died". :func:`bounded_map` reports each failed item
    in one line instead (its traceback at DEBUG)."""

    PREFIXES = ("Compute Failed", "Task %s marked as failed")

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(self.PREFIXES))


TASK_FAILURE_FILTER = TaskFailureFilter()
_FILTERED_LOGGERS = ("distributed.worker", "distributed.scheduler")


_quiet_users = 0  # open_client calls of this process that want the filter (they may nest)
_quiet_lock = threading.Lock()


def quiet_task_errors(enable: bool = True) -> None:
    """Install (``enable``) or release :data:`TASK_FAILURE_FILTER` on Dask's worker and
    scheduler loggers of this process; it stays while any caller still wants it."""
    global _quiet_users
    with _quiet_lock:
        _quiet_users = max(0, _quiet_users + (1 if enable else -1))
        for name in _FILTERED_LOGGERS:
            logger = logging.getLogger(name)
            (logger.addFilter if _quiet_users else logger.removeFilter)(TASK_FAILURE_FILTER)


class QuietTaskErrors(WorkerPlugin):
    """:func:`quiet_task_errors` on every worker, including those that join later."""

    name = QUIET_PLUGIN_NAME

    def setup(self, worker: Any) -> None:
        quiet_task_errors(True)

    def teardown(self, worker: Any) -> None:
        quiet_task_errors(False)



# clusters started here that can get no more workers, and why (one line)
_NO_MORE_WORKERS: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def no_more_workers(cluster: Any, why: str) -> None:
    """Record that ``cluster`` gets no more workers (the first ``why`` stays): the waits of
    :func:`bounded_map` on its client end with :class:`JobSubmitError` instead of lasting forever."""
    _NO_MORE_WORKERS.setdefault(cluster, why)


def why_no_workers(client: Any) -> str | None:
    """Why the cluster of ``client`` (one started here) gets no more workers; None while it can."""
    cluster = getattr(client, "cluster", None)
    return None if cluster is None else _NO_MORE_WORKERS.get(cluster)


def _next_done(done: as_completed, client: Any) -> Any:
    """``next(done)``, or :class:`JobSubmitError` once ``client``'s cluster can get no more
    workers: nothing would ever run the tasks waited for."""
    while not done.has_ready():
        why = why_no_workers(client)
        if why is not None:
            raise JobSubmitError(why)
        with done.thread_condition:  # notified when a future completes
            done.thread_condition.wait(timeout=WAIT_POLL_S)
    return next(done)


@dataclass(frozen=True)
class TaskFailure:
    """The outcome of an item whose task failed (after its retries): yielded, not raised."""

    item: Any
    exception: BaseException
    traceback: str = ""

    def __str__(self) -> str:
        return f"{self.exception.__class__.__name__}: {self.exception}"


def _describe(item: Any) -> str:
    """A failed item in a log line: its repr, cut to ``ITEM_REPR_CHARS``."""
    text = repr(item)
    return text if len(text) <= ITEM_REPR_CHARS else text[:ITEM_REPR_CHARS - 3] + "..."


def bounded_map(client: Client, fn: Callable[[T], Any], items: Iterable[T], max_in_flight: int,
                *, retries: int = 0, resources: Mapping[str, float] | None = None,
                then: Sequence[tuple[Callable[[Any], Any], Mapping[str, float] | None]] = (),
                **submit_kwargs: Any) -> Iterator[tuple[T, Any]]:
    """``(item, fn(item))`` in completion order, with at most ``max_in_flight`` futures alive.

    ``items`` is consumed lazily, so a generator of a million tiles never becomes a million
    futures (scheduler memory, client memory). ``resources`` restricts the tasks to workers
    that advertise them (``{"GPU": 1}``: :func:`predict_resources`). A task that raises
    (after ``retries`` re-runs) or whose workers kept dying (``KilledWorker``) yields a
    :class:`TaskFailure` for its item and the others go on; each failure is logged as one
    WARNING line, its worker traceback at DEBUG. Keys are unique (``pure=False``) unless the
    caller passes ``pure``/``key``.

    ``then``: more tasks per item, chained, each ``(function, resources)`` applied to the
    previous one's result (e.g. read on the CPU pool, predict on a GPU worker, post-process
    on the pool); the result yielded is the last one's. Intermediate results go worker to
    worker, never through this client, and are freed once the next task has run; a failed
    task fails its item with its own error. ``max_in_flight`` counts items, not tasks.
    When the cluster can get no more workers (:func:`no_more_workers`: sbatch refused a job
    during the run), the wait raises :class:`JobSubmitError`.
    """
    if max_in_flight < 1:
        raise ValueError(f"max_in_flight must be >= 1, not {max_in_flight}")
    submit_kwargs.setdefault("pure", False)
    if resources:
        submit_kwargs["resources"] = dict(resources)
    later = {k: v for k, v in submit_kwargs.items() if k not in ("resources", "key")}
    stages = [(stage, {**later, **({"resources": dict(res)} if res else {})}) for stage, res in then]
    source = iter(items)
    pending: dict[str, T] = {}
    done = as_completed()
    owner: list[Client] = []  # the client of the futures (``client`` may wrap it)

    def submit_next() -> bool:
        try:
            item = next(source)
        except StopIteration:
            return False
        future = client.submit(fn, item, retries=retries, **submit_kwargs)
        for stage, options in stages:
            future = client.submit(stage, future, retries=retries, **options)
        pending[future.key] = item
        done.add(future)
        if not owner:
            owner.append(future.client)
        return True

    for _ in range(max_in_flight):
        if not submit_next():
            break
    try:
        while pending:
            future = _next_done(done, owner[0])
            item = pending.pop(future.key)
            outcome: Any
            if future.status == "finished":
                outcome = future.result()
            else:
                try:
                    exc = future.exception()
                    tb = "".join(traceback.format_tb(future.traceback()))
                except Exception as lost:  # cancelled: the scheduler forgot the task
                    exc, tb = lost, ""
                outcome = TaskFailure(item, exc, tb)
                log.warning("task %s failed: %s", _describe(item), " ".join(str(outcome).split()))
                if tb:
                    log.debug("traceback of the failed task %s (on the worker):\n%s",
                              _describe(item), tb)
            future.release()
            submit_next()  # refill before handing out the result: keep workers busy
            yield item, outcome
    finally:  # closed early: dropping the futures cancels the tasks not yet run
        pending.clear()
        done.clear()
