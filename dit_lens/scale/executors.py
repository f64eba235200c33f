"""Executors: run a list of independent items in this process, or as Ray tasks on workers that each
hold one copy of the model.

An item runs as ``fn(lens, shared, item)``: `fn` a module-level function (shipped to workers by
reference), `shared` what every item needs (sent once, through Ray's object store), `item` one
cell's worth of work. `LocalExecutor.map` and `RayExecutor.map` both yield ``(index, result)`` as
items finish; the caller puts results in place and shows progress, so the output does not depend on
which worker ran what, or in which order.

A Ray worker loads the model once (from the folder the lens came from, or from a copy of an
in-memory pipeline put into the object store) and refuses to run if its weights' fingerprint differs
from the caller's. Workers stay up between calls: a second study, capture or generation with an equal
executor and the same model starts none (`RayExecutor.close`, another model, or the end of the Ray
session ends them; a call after the session ended starts new ones). A worker that dies (killed, out
of memory, its node lost) is restarted and its item run again, up to `RayExecutor.max_retries`
times; items already finished are kept by the caller (cells on disk), so a run that still fails
resumes where it stopped. A cluster to join is tried first, with a timeout (`CONNECT_TIMEOUT`): an
address nobody answers at is an error before any work starts.

Examples:
    >>> def double(lens, shared, item):
    ...     return shared * item
    >>> sorted(LocalExecutor().map(None, double, [1, 2, 3], shared=2))
    [(0, 2), (1, 4), (2, 6)]
    >>> RayExecutor(workers=2, num_cpus=1)
    RayExecutor(workers=2, num_cpus=1.0, num_gpus=0.0, address=None, max_retries=3)
"""

from __future__ import annotations

import logging
import numbers
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

if TYPE_CHECKING:
    from ..model.lens import Lens

__all__ = ["LocalExecutor", "RayExecutor", "WorkerLostError", "as_executor"]

Task = Callable[[Any, Any, Any], Any]

#: The workers kept between calls (one executor's at a time: they hold the cores and a model each):
#: ``{"executor", "key": model and session, "source": how workers open it, "actors": [...]}``, or empty.
_POOL: dict = {}
#: Seconds to wait for a Ray cluster's head to answer before `RayExecutor.connect` gives up.
CONNECT_TIMEOUT = 10.0


class WorkerLostError(RuntimeError):
    """A Ray worker died more often than `RayExecutor.max_retries` while running one item."""


class LocalExecutor:
    """Every item in this process, in order, with the caller's lens."""

    def map(self, lens: Lens, fn: Task, items: Sequence[Any], *, shared: Any = None) -> Iterator[tuple[int, Any]]:
        for index, item in enumerate(items):
            yield index, fn(lens, shared, item)

    def __repr__(self) -> str:
        return "LocalExecutor()"


@dataclass(frozen=True)
class RayExecutor:
    """Items as Ray tasks on actors that each load the model once.

    Attributes:
        workers: How many workers (default: as many as the cluster's CPUs, or GPUs with `num_gpus`,
            allow; never more than there are items).
        num_cpus: CPUs reserved per worker; its torch threads.
        num_gpus: GPUs per worker (``1`` on a GPU cluster: each worker runs on its own GPU).
        address: The cluster to join (``ray.init(address=...)``, e.g. ``"auto"`` or
            ``"ray://head:10001"``); default: the cluster already connected, ``$RAY_ADDRESS``, or a new
            local one. Workers on other machines need the model folder, the cache and the result
            folder at the same paths (a shared file system).
        max_retries: Times a worker that died is restarted and its item run again.

    Equal executors share their workers: ``RayExecutor(workers=2)`` made twice, or ``"ray"`` given
    twice, reuse the workers of the first call while the model and the Ray session are the same. One
    executor's workers are kept at a time: a call with another executor ends them first (they hold the
    cores and a copy of the model each).
    """

    workers: int | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    address: str | None = None
    max_retries: int = 3

    def __post_init__(self) -> None:
        if self.workers is not None and (isinstance(self.workers, bool) or not isinstance(self.workers, numbers.Integral)
                                         or self.workers < 1):
            raise ValueError(f"RayExecutor.workers must be a positive integer or None, got {self.workers!r}")
        for name in ("num_cpus", "num_gpus"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or value < 0:
                raise ValueError(f"RayExecutor.{name} must be a number >= 0, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.num_cpus == 0 and self.num_gpus == 0:
            raise ValueError("RayExecutor needs num_cpus > 0 or num_gpus > 0 per worker")
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, numbers.Integral) or self.max_retries < 0:
            raise ValueError(f"RayExecutor.max_retries must be an integer >= 0, got {self.max_retries!r}")

    def map(self, lens: Lens, fn: Task, items: Sequence[Any], *, shared: Any = None) -> Iterator[tuple[int, Any]]:
        items = list(items)
        if not items:
            return
        ray = _ray()
        self.connect()
        if lens.device.type != "cpu" and self.num_gpus == 0:
            raise ValueError(f"the model is on {lens.device}, but RayExecutor has num_gpus=0, so its workers would run "
                             f"on the CPU and compute other values; pass RayExecutor(num_gpus=1)")
        count = min(self.worker_count(), len(items))
        self._check_fits(ray, count)
        actors = self._workers(ray, lens, count)
        shared_ref, env = ray.put(shared), _worker_env()
        queue, pending = list(enumerate(items)), {}

        def submit(actor: Any) -> None:
            index, item = queue.pop(0)
            pending[actor.run.remote(fn, shared_ref, item, env)] = (index, actor)

        try:
            for actor in actors:
                if queue:
                    submit(actor)
            while pending:
                (ref,), _ = ray.wait(list(pending), num_returns=1)
                index, actor = pending.pop(ref)
                yield index, _get(ray, ref, index, self.max_retries)
                if queue:
                    submit(actor)
        except BaseException:  # a failed item, a lost worker, or the caller stopped early: no stale workers
            self.close()
            raise

    def close(self) -> None:
        """End the workers this executor keeps (they hold a copy of the model each); the next `map`
        starts new ones. Ending the Ray session ends them too."""
        if _POOL.get("executor") != self:
            return
        actors, session = _POOL["actors"], _POOL["key"][-1]
        _POOL.clear()
        if _ray().is_initialized() and _session(_ray()) == session:  # those of an ended session are gone
            for actor in actors:
                _ray().kill(actor)

    def _workers(self, ray: Any, lens: Lens, count: int) -> list:
        """`count` workers holding `lens`'s model: those kept from an earlier `map` with the same model
        in this Ray session, and new ones for the rest."""
        device = "cuda" if self.num_gpus else "cpu"
        key = (lens.fingerprint, lens.source, lens.lora, device, str(lens.denoiser.dtype), _session(ray))
        if _POOL and (_POOL["executor"] != self or _POOL["key"] != key):  # another executor, model or session
            _POOL["executor"].close()
        if not _POOL:
            _POOL.update(executor=self, key=key, actors=[])
        pool = _POOL
        if len(pool["actors"]) < count:
            # kept with the pool: a restarted worker opens its pipeline copy from the object store again
            source = pool.setdefault("source", _source(lens, device))
            worker = ray.remote(_Worker).options(num_cpus=self.num_cpus, num_gpus=self.num_gpus,
                                                 max_restarts=self.max_retries, max_task_retries=self.max_retries,
                                                 runtime_env={"env_vars": {"TQDM_DISABLE": "1"}})
            pool["actors"] += [worker.remote(source, lens.fingerprint, max(1, int(self.num_cpus)))
                               for _ in range(count - len(pool["actors"]))]
        try:
            _ready(ray, pool["actors"][:count])
        except BaseException:
            self.close()
            raise
        return pool["actors"][:count]

    def _check_fits(self, ray: Any, count: int) -> None:
        """Refuse workers the cluster cannot hold all at once (Ray would wait for them forever)."""
        total = ray.cluster_resources()
        for name, each in (("CPU", self.num_cpus), ("GPU", self.num_gpus)):
            if each and count * each > total.get(name, 0) + 1e-9:
                raise ValueError(f"RayExecutor needs {count * each:g} {name}s ({count} workers × {each:g}), but the Ray "
                                 f"cluster has {total.get(name, 0):g}; pass fewer workers (or workers=None: as many as "
                                 f"fit) or less num_{name.lower()}s, or add nodes to the cluster")

    def worker_count(self) -> int:
        """The workers this executor starts (at most one per item)."""
        if self.workers is not None:
            return int(self.workers)
        ray = _ray()
        self.connect()
        resources = ray.cluster_resources()
        if self.num_gpus:
            return max(1, int(resources.get("GPU", 0) // self.num_gpus))
        return max(1, int(resources.get("CPU", 1) // self.num_cpus))

    def connect(self) -> None:
        """Join `address` (or start a local cluster) unless this process is connected already.

        Raises:
            ConnectionError: the cluster at `address` (or ``$RAY_ADDRESS``) does not answer within
                `CONNECT_TIMEOUT` seconds, or there is none to join; said before anything is claimed.
        """
        ray = _ray()
        if ray.is_initialized():
            return
        address = self.address or os.environ.get("RAY_ADDRESS") or None
        fix = ("check the address (`--ray-address`, RayExecutor(address=...) or $RAY_ADDRESS): the host:port of a "
               "running Ray head, ray://head:10001, or auto; or leave it out for a new local cluster")
        if address not in (None, "auto", "local"):
            _reachable(address, fix)
        try:
            ray.init(address=self.address, include_dashboard=False, logging_level=logging.WARNING,
                     log_to_driver=True)
        except ConnectionError as err:
            raise ConnectionError(f"cannot join the Ray cluster {address or ''} ({' '.join(str(err).split())}); "
                                  f"{fix}") from None


def as_executor(executor: Any) -> LocalExecutor | RayExecutor:
    """`executor` as an executor: ``None`` or ``"local"`` (this process), ``"ray"`` (`RayExecutor()`), or one
    already made."""
    if executor is None or executor == "local":
        return LocalExecutor()
    if executor == "ray":
        return RayExecutor()
    if isinstance(executor, (LocalExecutor, RayExecutor)):
        return executor
    raise ValueError(f"executor must be None, 'local', 'ray' or a RayExecutor(...), got {executor!r}")


class _Worker:
    """One model per process; runs items with it."""

    def __init__(self, source: dict, fingerprint: str, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.lens = _open(source)
        if self.lens.fingerprint != fingerprint:
            raise ValueError(f"the model a worker loaded from {source['label']} has fingerprint "
                             f"{self.lens.fingerprint[:12]}, not the caller's {fingerprint[:12]}: the folder changed "
                             f"since it was loaded, or differs on this worker's machine")

    def ready(self) -> bool:
        return True

    def run(self, fn: Task, shared: Any, item: Any, env: dict) -> Any:
        import os

        os.environ.update(env)
        return fn(self.lens, shared, item)


def _source(lens: Lens, device: str) -> dict:
    """How a worker opens the same model: its folder, or a copy of the in-memory pipeline."""
    source = {"label": lens.source, "lora": lens.lora, "device": device, "dtype": lens.denoiser.dtype}
    if lens.source == "<object>":
        source["pipeline"] = _ray().put(lens.pipeline)
    elif lens.source != "embedded":
        source["folder"] = str(Path(lens.source).expanduser().resolve())
    if lens.lora is not None:
        source["lora_folder"] = str(Path(lens.lora).expanduser().resolve())
    return source


def _worker_env() -> dict:
    """What an item runs with on a worker: the caller's cache, as it is at this call. (Workers show no
    progress bars of their own: the caller's bar counts their items.)"""
    from ..storage.cache import CACHE_ENV, cache_root

    return {CACHE_ENV: str(cache_root().expanduser().resolve())}


def _open(source: dict) -> Any:
    from ..model.lens import load

    import torch

    moves = {"device": source["device"] if source["device"] != "cpu" else None,
             "dtype": source["dtype"] if source["dtype"] != torch.float32 else None}
    if "pipeline" in source:  # an in-memory pipeline: its adapter, if any, is merged into it already
        lens = load(_ray().get(source["pipeline"]), **moves)
    else:
        lens = load(source.get("folder", "embedded"), lora=source.get("lora_folder"), **moves)
    lens.source, lens.lora = source["label"], source["lora"]  # the caller's provenance, word for word
    return lens


def _ready(ray: Any, actors: list) -> None:
    try:
        ray.get([actor.ready.remote() for actor in actors])
    except ray.exceptions.RayActorError as err:
        cause = getattr(err, "cause", None) or err
        raise RuntimeError(f"a Ray worker could not load the model: {cause}") from None


def _get(ray: Any, ref: Any, index: int, retries: int) -> Any:
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:  # the item itself failed: raise what it raised
        cause = err.cause if isinstance(getattr(err, "cause", None), Exception) else err
        raise cause from None
    except ray.exceptions.RayActorError as err:
        raise WorkerLostError(
            f"the Ray worker running item {index} died {retries + 1} times ({type(err).__name__}); finished "
            f"items are kept, so running again resumes; a worker that keeps dying is often out of memory "
            f"(fewer workers, or more memory per worker)") from None


def _reachable(address: str, fix: str) -> None:
    """Refuse an address whose head does not accept a connection within `CONNECT_TIMEOUT` seconds
    (Ray itself would wait for it for minutes)."""
    host, sep, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConnectionError(f"the Ray address {address!r} is not host:port; {fix}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT).close()
    except OSError as err:
        raise ConnectionError(f"cannot reach the Ray cluster at {address} within {CONNECT_TIMEOUT:g} s "
                              f"({err.strerror or type(err).__name__}); {fix}") from None


def _session(ray: Any) -> tuple[str, str]:
    """The Ray session and job this process is connected to: workers live no longer than they."""
    context = ray.get_runtime_context()
    return context.get_session_name(), context.get_job_id()


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ImportError("executor='ray' needs Ray, an optional extra: pip install 'dit-lens[ray]'") from None
    return ray
