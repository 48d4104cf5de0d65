"""The posterior and the expected-loss tables over several processes: the posterior's calibration shards, and the
tables' weights (each with the quantizer designs its tables choose), computed by local worker processes
(``--workers``) or Ray tasks (``--ray``); the posterior also written to / merged from shard files (``posterior
--shard I/N``, ``--merge``).

Every process rebuilds the estimation from files, never from a pickled model: the model from its path (the
pipeline's prepared model is saved once to a scratch folder), the calibration samples from ``.npy`` files there
(memory-mapped), the options and the weights' names from a small :class:`Job`. With one seed each process draws
the same targets, so a shard's accumulator is what the one-process run adds for those samples, and the master
merges them in shard order (:mod:`bq_onnx.estimators.driver`): the posterior's bytes do not depend on how many
workers there were. The tables go by weight: each worker gets a list of weights (balanced by element count,
:func:`balanced`), builds the tables' run from files as the master built it (the model, the posterior's arrays of
its weights, the calibration samples where the tables measure, GPTQ's input moments) and returns each weight's
tables; the master takes them in in its weights' order, so the tables, and the optimized model, are the same bytes
as in one process. A worker that dies is replaced and its shards or weights run again (:data:`RETRIES` times at
most); a run that fails writes nothing (the outputs are written by the caller, after this returns).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import dataclasses
import functools
import json
import multiprocessing
import os
import pickle
import shutil
import signal
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from bq_onnx.calibration import Calibration, CalibrationSource
from bq_onnx.config import OptimizeConfig, PosteriorConfig, WeightsConfig
from bq_onnx.context import Context, Derived, WeightInfo
from bq_onnx.errors import DataError, LimitError, UsageError
from bq_onnx.estimators.activations import Activations
from bq_onnx.estimators.base import Accumulator, Stage
from bq_onnx.estimators.driver import (
    RUNNER_FACTORY,
    LocalRunner,
    Runner,
    Task,
    _estimate,
    problems,
    shard_ranges,
    shard_samples,
)
from bq_onnx.estimators.driver import estimate_posterior as driver_estimate_posterior
from bq_onnx.estimators.prepared import ModelSource, Prepared
from bq_onnx.estimators.registry import REGISTRY
from bq_onnx.model_io import load_model
from bq_onnx.posterior import Posterior, Spill, WeightPosterior
from bq_onnx.runs import Runs
from bq_onnx.runtimes.sessions import TempSessions
from bq_onnx.stages import tables as tables_stage
from bq_onnx.stages.moments import kept_moment
from bq_onnx.stages.weights import find_weights

#: Times a shard is run again after its worker died (a worker process killed, out of memory, a Ray node lost):
#: so a shard is tried at most 3 times. An error the shard raises itself (bad data) is not retried.
RETRIES = 2

#: Fault injection for the tests: ``BQ_ONNX_WORKER_FAULT=<path>`` kills the first worker that finishes a shard
#: with SIGKILL before it replies, and creates ``<path>`` so that the retry runs through (``always``: every one).
FAULT_ENV = "BQ_ONNX_WORKER_FAULT"

#: Where the scratch folder of a distributed run goes (default: the system's temporary folder). Ray workers on
#: other machines read the model and calibration from it: point it at a filesystem they share.
SHARED_ENV = "BQ_ONNX_SHARED_DIR"

#: Scratch files (the prepared model and the calibration samples) up to this size also travel through Ray's
#: object store, once: a Ray worker that cannot see the scratch folder (another machine, no shared filesystem)
#: writes them to a folder of its own and reads them from there.
OBJECT_STORE_BYTES = 256 * 2**20

SHARD_FORMAT = "bq-onnx posterior shard 1"


# --- how the caller asks for workers -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Distribution:
    """``workers`` local processes (this one included), or Ray tasks (``ray``: an address, or "" for a local
    instance or the one this process already joined)."""

    workers: int = 1
    ray: str | None = None

    @property
    def active(self) -> bool:
        return self.workers > 1 or self.ray is not None


_CURRENT: contextvars.ContextVar[Distribution | None] = contextvars.ContextVar("bq_onnx_distribution",
                                                                               default=None)


class RaySession:
    """The Ray cluster of one :func:`distributed` block, joined at its first task: at ``address``, or ("") the
    instance this process already joined, else a new local one, shut down again when the block ends."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.ray = None
        self.owned = False

    def get(self):
        if self.ray is None:
            ray = _ray()
            owned = not ray.is_initialized()
            if owned:
                try:
                    ray.init(address=self.address or None, include_dashboard=False, logging_level="ERROR",
                             log_to_driver=False)
                except (ConnectionError, ValueError, RuntimeError) as exc:
                    raise UsageError(f"--ray {self.address}: cannot join the cluster "
                                     f"({str(exc).splitlines()[0][:200]})") from None
            self.ray, self.owned = ray, owned
        return self.ray

    def close(self) -> None:
        if self.owned and self.ray is not None and self.ray.is_initialized():
            self.ray.shutdown()
        self.ray, self.owned = None, False


_SESSION: contextvars.ContextVar[RaySession | None] = contextvars.ContextVar("bq_onnx_ray_session", default=None)


@contextlib.contextmanager
def ray_session(address: str) -> Iterator[RaySession]:
    """The :func:`distributed` block's session, else one for this call only."""
    current = _SESSION.get()
    if current is not None and current.address == address:
        yield current
        return
    session = RaySession(address)
    try:
        yield session
    finally:
        session.close()


@contextlib.contextmanager
def distributed(workers: int | None = None, ray: str | bool | None = None) -> Iterator[Distribution]:
    """Within the block, posteriors are estimated by ``workers`` processes or on Ray (``ray``: True or "" for a
    local instance, or a cluster's address). The results are the same bytes as without."""
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise UsageError(f"--workers must be an integer >= 1, got {workers!r}")
    if ray is not None and ray is not False and workers not in (None, 1):
        raise UsageError("--workers and --ray: give one (Ray decides how many tasks run at once)")
    address = None if ray is None or ray is False else ("" if ray is True else str(ray))
    setting = Distribution(workers or 1, address)
    session = RaySession(address) if address is not None else None  # joined once, at the first Ray task
    token = _CURRENT.set(setting)
    joined = _SESSION.set(session)
    factory = RUNNER_FACTORY.set(functools.partial(runner_for, setting=setting) if setting.active else None)
    tables = tables_stage.TENSOR_RUNNER.set(functools.partial(share_tables, setting=setting) if setting.active
                                            else None)
    try:
        yield setting
    finally:
        tables_stage.TENSOR_RUNNER.reset(tables)
        RUNNER_FACTORY.reset(factory)
        _SESSION.reset(joined)
        _CURRENT.reset(token)
        if session is not None:
            session.close()


def estimate_posterior(model: ModelSource, calibration: CalibrationSource | Calibration, method: str | None = None,
                       *, workers: int | None = None, ray: str | bool | None = None, **options: object) -> Posterior:
    """:func:`bq_onnx.estimators.estimate_posterior` with its calibration shards shared out to ``workers`` local
    processes or to Ray (``ray``: True for a local instance, or a cluster's address); the same posterior, byte for
    byte. (``bq_onnx.estimate_posterior`` is this function.)"""
    with distributed(workers, ray):
        return driver_estimate_posterior(model, calibration, method, **options)


@contextlib.contextmanager
def runner_for(prepared: Prepared, calib: Calibration, opts: PosteriorConfig,
               runner: Runner | None = None, setting: Distribution | None = None) -> Iterator[Runner]:
    """``runner``, else the workers ``setting`` (default: what :func:`distributed` asked for) names (their scratch
    folder and processes are gone when the block ends, whatever happened), else this process."""
    setting = setting or _CURRENT.get() or Distribution()
    if runner is not None or not setting.active:
        yield runner or LocalRunner()
        return
    chosen: PoolRunner | RayRunner | None = None
    with contextlib.ExitStack() as stack:
        scratch = stack.enter_context(_scratch())
        job = write_job(prepared, calib, opts, scratch)
        if setting.ray is not None:
            chosen = RayRunner(job, stack.enter_context(ray_session(setting.ray)))
        else:
            chosen = PoolRunner(job, setting.workers)
        stack.callback(chosen.close)
        yield chosen


@contextlib.contextmanager
def _scratch() -> Iterator[Path]:
    """A scratch folder for one distributed step (in :data:`SHARED_ENV`, else the system's temporary folder),
    removed at the end whatever happened."""
    scratch = Path(tempfile.mkdtemp(prefix="bq-workers-", dir=os.environ.get(SHARED_ENV) or None))
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# --- what a worker reads -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Job:
    """What every worker process rebuilds the estimation from (small: paths, names, options)."""

    key: str
    model: str  # the prepared model's file
    names: tuple[str, ...]  # the weights, in the master's order
    shapes: tuple[tuple[int, ...], ...]
    calib: str  # a folder written by :func:`write_calibration`
    options: PosteriorConfig
    scratch: str
    run_timeout: float | None = None  # the master's --run-timeout and --max-memory hold in every worker
    max_memory: int | None = None


def write_job(prepared: Prepared, calib: Calibration, opts: PosteriorConfig, scratch: Path) -> Job:
    """Save what the workers read into ``scratch``: the model as prepared here (the prepare passes ran; they
    depend on options the workers do not know) and the calibration samples."""
    from bq_onnx.model_io import save_model

    model = os.fspath(scratch / "model.onnx")
    save_model(prepared.model, model)
    folder = scratch / "calibration"
    write_calibration(calib, folder)
    (scratch / "replies").mkdir()
    from bq_onnx.budgets import max_memory_set
    from bq_onnx.limits import run_timeout

    return Job(uuid.uuid4().hex, model, tuple(w.name for w in prepared.weights),
               tuple(tuple(w.layout.shape) for w in prepared.weights), os.fspath(folder), opts, os.fspath(scratch),
               run_timeout(), max_memory_set())


def write_calibration(calib: Calibration, folder: Path) -> None:
    """One ``.npy`` per stacked input (a worker maps it and reads the rows it needs), a pickle per input kept
    one part per run, and an index."""
    folder.mkdir()
    index = {"source": calib.source, "fixed_batch": calib.fixed_batch, "inputs": []}
    for i, (name, value) in enumerate(calib.arrays.items()):
        if isinstance(value, Runs):
            file = f"in{i}.pkl"
            with open(folder / file, "wb") as f:
                pickle.dump(value, f, protocol=pickle.HIGHEST_PROTOCOL)
        else:
            file = f"in{i}.npy"
            np.save(folder / file, np.asarray(value), allow_pickle=False)
        index["inputs"].append({"name": name, "file": file, "axis": calib.axes.get(name, 0)})
    (folder / "index.json").write_text(json.dumps(index))


def read_calibration(folder: str | os.PathLike) -> Calibration:
    folder = Path(folder)
    index = json.loads((folder / "index.json").read_text())
    arrays: dict = {}
    for entry in index["inputs"]:
        path = folder / entry["file"]
        if entry["file"].endswith(".pkl"):
            with open(path, "rb") as f:
                arrays[entry["name"]] = pickle.load(f)  # noqa: S301 - our own scratch file, written by the master
        else:
            arrays[entry["name"]] = np.load(path, mmap_mode="r", allow_pickle=False)
    axes = {e["name"]: e["axis"] for e in index["inputs"] if e["axis"] != 0}
    return Calibration(arrays, index["source"], axes, index["fixed_batch"])


class _Worker:
    """One worker's estimation: the problem as the master built it, and its stages, built in the master's order
    (each settled before the next, so the random draws match)."""

    def __init__(self, job: Job) -> None:
        from bq_onnx.budgets import set_max_memory
        from bq_onnx.limits import set_run_timeout

        set_run_timeout(job.run_timeout)  # the runs in this process are bounded as the master's are
        set_max_memory(job.max_memory)
        model = load_model(job.model)
        found = {w.name: w for w in find_weights(model, WeightsConfig(min_size=1)).weights}  # the master's among them
        for name, shape in zip(job.names, job.shapes):
            if name not in found or tuple(found[name].layout.shape) != shape:
                raise DataError(f"worker: {job.model} has no weight '{name}' of shape {list(shape)}; the model "
                                f"changed while the workers read it")
        prepared = Prepared(model, [found[n] for n in job.names], job.model)
        self.sessions = TempSessions()
        self.spill = Spill()
        self.problem, self.main = problems(prepared, read_calibration(job.calib), job.options, self.sessions,
                                           False, self.spill)
        self.built: dict[tuple, tuple[Iterator[Stage], list[Stage]]] = {}

    def stage(self, task: Task) -> Stage:
        key = (task.phase, task.rest)
        if key not in self.built:
            if task.phase == "main":
                estimator = REGISTRY[self.main.options.method](self.main)
            else:
                rest = set(task.rest)
                estimator = Activations(self.problem, [w for w in self.problem.prepared.weights if w.name in rest])
            self.built[key] = (estimator.stages(), [])
        stages, built = self.built[key]
        while len(built) <= task.stage:
            if built:
                built[-1].settle()
            built.append(next(stages))
        return built[task.stage]

    def close(self) -> None:
        self.sessions.close()
        self.spill.cleanup()


_WORKER: dict[str, _Worker] = {}  # this process's current job (one: a Ray worker process outlives jobs)


def bundle(job: Job) -> dict[str, bytes] | None:
    """The scratch files a worker reads, by path relative to the scratch folder (None: over
    :data:`OBJECT_STORE_BYTES`, so they go by the shared filesystem only)."""
    root = Path(job.scratch)
    files = [f for f in root.rglob("*") if f.is_file() and "replies" not in f.relative_to(root).parts]
    if sum(f.stat().st_size for f in files) > OBJECT_STORE_BYTES:
        return None
    return {os.fspath(f.relative_to(root)): f.read_bytes() for f in files}


def materialized(job: Job, files: Mapping[str, bytes] | None) -> Job:
    """``job`` itself where its scratch folder is visible, else ``job`` reading ``files`` written to a folder of
    this process's (removed when the process ends)."""
    if files is None or os.path.exists(job.model):
        return job
    root = _written(files)

    def moved(path: str) -> str:
        return os.fspath(root / Path(path).relative_to(job.scratch))

    return dataclasses.replace(job, model=moved(job.model), calib=moved(job.calib), scratch=os.fspath(root))


def _written(files: Mapping[str, bytes]) -> Path:
    """``files`` (scratch files by relative path) written to a folder of this process's, removed when it ends."""
    root = Path(tempfile.mkdtemp(prefix="bq-worker-"))
    import atexit

    atexit.register(shutil.rmtree, root, True)
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def _fault() -> None:
    """The tests' fault injection (:data:`FAULT_ENV`): this worker dies before it replies."""
    marker = os.environ.get(FAULT_ENV)
    if marker and (marker == "always" or not os.path.exists(marker)):
        if marker != "always":
            Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)


def run_shard(job: Job, task: Task, rows: tuple[int, int], reply: str | None = None,
              files: Mapping[str, bytes] | None = None) -> dict | str:
    """In a worker: the accumulator of ``task``'s stage over samples ``rows``, as arrays (``reply``: written to
    that ``.npz`` path instead, whose name is returned). ``files``: the scratch files, for a worker that cannot
    see the scratch folder (:func:`bundle`)."""
    if job.key not in _WORKER:
        for old in _WORKER.values():
            old.close()
        _WORKER.clear()
        _WORKER[job.key] = _Worker(materialized(job, files))
    state = _WORKER[job.key].stage(task).run(range(*rows)).state()
    _fault()
    if reply is None:
        return state
    tmp = f"{reply}.{os.getpid()}.tmp.npz"
    np.savez(tmp, **state)
    os.replace(tmp, reply)
    return reply


def _npz(path: str) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


# --- runners -------------------------------------------------------------------------------------------------


class PoolRunner:
    """``workers`` processes: this one computes shards 0, N, 2N, ...; ``workers - 1`` spawned processes the
    others. Each merges in shard order once every shard is in."""

    def __init__(self, job: Job, workers: int) -> None:
        self.job, self.workers = job, workers
        self.pool: concurrent.futures.ProcessPoolExecutor | None = None

    def _pool(self) -> concurrent.futures.ProcessPoolExecutor:
        if self.pool is None:
            self.pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=self.workers - 1, mp_context=multiprocessing.get_context("spawn"))
        return self.pool

    def accumulate(self, stage: Stage, task: Task, bar: bool) -> Accumulator:
        shards = shard_ranges(stage.calib.num_samples, unit=stage.calib.run_size(1))
        theirs = {i: rows for i, rows in enumerate(shards) if i % self.workers}
        replies = {i: os.path.join(self.job.scratch, "replies", f"{task.phase}-{task.stage}-{i}.npz")
                   for i in theirs}
        futures = self._submit(task, theirs, replies)
        mine = {i: stage.run(rows, bar) for i, rows in enumerate(shards) if i not in theirs}
        stage.settle()
        done = collect(futures, lambda i: self._submit(task, {i: theirs[i]}, replies), self.close,
                       lambda i: f"the worker of calibration samples {theirs[i].start}-{theirs[i].stop - 1}")
        total = None
        for i in range(len(shards)):
            acc = mine.pop(i) if i in mine else stage.restore(_npz(done[i]))
            if i in done:
                os.unlink(done[i])
            total = acc if total is None else total.merge(acc)
        return total

    def _submit(self, task: Task, shards: Mapping[int, range], replies: Mapping[int, str]) -> dict:
        pool = self._pool()
        return {pool.submit(run_shard, self.job, task, (r.start, r.stop), replies[i]): i for i, r in shards.items()}

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


def collect(futures: Mapping[concurrent.futures.Future, object], resubmit: Callable[[object], Mapping],
            reset: Callable[[], None], what: Callable[[object], str]) -> dict:
    """Each future's result by its key; the keys whose worker died run again (``resubmit(key)``: new futures) on
    a fresh pool (``reset`` drops the broken one), at most :data:`RETRIES` times, else a one-line error naming
    ``what(key)``. An error the work raises itself ends the run (not retried)."""
    done: dict = {}
    tries = dict.fromkeys(futures.values(), 0)
    while True:
        lost = []
        for future in concurrent.futures.as_completed(futures):
            key = futures[future]
            try:
                done[key] = future.result()
            except concurrent.futures.process.BrokenProcessPool:
                lost.append(key)
        if not lost:
            return done
        reset()  # a broken pool takes no more work
        for key in lost:
            tries[key] += 1
            if tries[key] > RETRIES:
                raise LimitError(f"{what(key)} died {RETRIES + 1} times (killed, or out of memory); nothing written")
        futures = {f: k for key in lost for f, k in resubmit(key).items()}


def _ray():
    try:
        import ray
    except ImportError:
        raise UsageError("--ray needs the ray package: pip install 'bq-onnx[ray]'") from None
    return ray


class RayRunner:
    """Every shard a Ray task (retried by Ray when its worker dies, :data:`RETRIES` times); replies come back
    through the object store and are merged in shard order, on the cluster of ``session``."""

    def __init__(self, job: Job, session: RaySession) -> None:
        ray = session.get()
        self.ray = ray
        self.job = job
        self.task = ray.remote(max_retries=RETRIES, num_cpus=1)(run_shard)
        self.files = ray.put(bundle(job))  # once; every task gets it from the object store

    def accumulate(self, stage: Stage, task: Task, bar: bool) -> Accumulator:
        shards = shard_ranges(stage.calib.num_samples, unit=stage.calib.run_size(1))
        refs = [self.task.remote(self.job, task, (r.start, r.stop), None, self.files) for r in shards]
        stage.settle()
        total = None
        for ref in refs:
            acc = stage.restore(ray_get(self.ray, ref))
            total = acc if total is None else total.merge(acc)
        return total

    def close(self) -> None:
        pass  # the session outlives the runner


def ray_get(ray, ref):
    """A task's reply; its own error (bad data) as in one process, a worker that died too often as one line."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, Exception) and hasattr(exc.cause, "exit_code"):
            raise exc.cause from None  # the task's own error (bad data): one line, as in one process
        raise
    except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError) as exc:
        raise LimitError(f"a Ray worker died {RETRIES + 1} times (killed, or out of memory; "
                         f"{type(exc).__name__}); nothing written") from None


# --- the expected-loss tables, by weight ---------------------------------------------------------------------


def balanced(weights: Sequence[WeightInfo], parts: int) -> list[list[str]]:
    """The weights' names in at most ``parts`` lists of about equal element counts: largest first, each to the
    list with the fewest elements so far (the first of equals); each list in the weights' own order. The same
    weights and count give the same lists."""
    loads = [0] * max(1, parts)
    members: list[list[int]] = [[] for _ in loads]
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i].numel, i)):
        j = min(range(len(loads)), key=lambda j: (loads[j], j))
        loads[j] += weights[i].numel
        members[j].append(i)
    return [[weights[i].name for i in sorted(m)] for m in members if m]


@dataclasses.dataclass(frozen=True)
class TablesJob:
    """What a worker rebuilds the tables' run from: files in ``scratch`` (the model, the posterior's arrays of the
    workers' weights, the calibration samples where the tables measure, GPTQ's input moments) and small values."""

    key: str
    scratch: str
    names: tuple[str, ...]  # the weights, in the master's order
    shapes: tuple[tuple[int, ...], ...]
    config: OptimizeConfig
    derived: Derived
    posterior: bool  # posterior/ written
    calib: bool  # calibration/ written
    moments: bool  # moments.npz written
    nearest: tuple[tuple[str, int], ...]  # (weight, width) where GPTQ was measured to lose (an earlier run's)
    threads: int  # the quantizers' threads in each worker
    run_timeout: float | None = None
    max_memory: int | None = None
    widths: tuple[int, ...] | None = None  # the tables' bracket (bq_onnx.stages.bracket; None: every width)


def write_tables_job(run: tables_stage.TableRun, names: Sequence[str], scratch: Path, threads: int) -> TablesJob:
    """Save what the workers computing the tables of ``names`` read into ``scratch``: the model (as the pipeline
    has it: prepared, possibly upgraded), their posterior arrays, the calibration samples if the tables read
    them, their input moments."""
    from bq_onnx.budgets import max_memory_set
    from bq_onnx.limits import run_timeout
    from bq_onnx.model_io import save_model

    ctx = run.ctx
    save_model(run.model, scratch / "model.onnx")
    if ctx.posterior is not None:
        write_posterior(ctx.posterior, names, scratch / "posterior")
    calib = run.reads_calibration
    if calib:
        write_calibration(run.calibration, scratch / "calibration")
    if ctx.moments is not None:
        np.savez(scratch / "moments.npz", **{f"m{i}": ctx.moments[n] for i, n in enumerate(names)
                                           if n in ctx.moments}, names=np.array(list(names)))
    nearest = tuple(sorted((k[1], k[2]) for k in ctx.rounded if isinstance(k, tuple) and len(k) == 3
                           and k[0] == "nearest" and ctx.rounded[k]))
    return TablesJob(uuid.uuid4().hex, os.fspath(scratch), tuple(w.name for w in ctx.weights),
                     tuple(tuple(w.layout.shape) for w in ctx.weights), ctx.config, ctx.derived,
                     ctx.posterior is not None, calib, ctx.moments is not None, nearest, threads, run_timeout(),
                     max_memory_set(), run.widths)


def write_posterior(posterior: Posterior, names: Sequence[str], folder: Path) -> None:
    """The arrays of weights ``names`` as ``.npy`` files (read back one weight at a time), everyone's source and
    the scalars in an index. A precision the posterior derives from its curvature is derived again on reading
    (the same float64 operations), so it is not written."""
    folder.mkdir()
    index: dict = {"method": posterior.method, "samples": posterior.samples,
                   "prior_precision": posterior.prior_precision,
                   "sources": {name: wp.source for name, wp in posterior.weights.items()}, "weights": {}}
    for i, name in enumerate(names):
        wp = posterior.weights[name]
        arrays = {"mean": wp.mean, "curvature": wp.curvature}
        if wp._precision is not None:  # noqa: SLF001 - held (a loaded file's), not derived from the curvature
            arrays["precision"] = wp.precision
        if wp.kfac is not None:
            arrays["kfac_a"], arrays["kfac_g"] = wp.kfac
        for field, array in arrays.items():
            np.save(folder / f"{i}.{field}.npy", np.asarray(array), allow_pickle=False)
        index["weights"][name] = {"file": i, "fields": sorted(arrays), "samples": wp._samples,  # noqa: SLF001
                                  "prior": wp._prior}  # noqa: SLF001
        del arrays
    (folder / "index.json").write_text(json.dumps(index))


def read_posterior(folder: Path) -> Posterior:
    """The posterior :func:`write_posterior` wrote: every weight's source; the arrays of the weights written, read
    from their files on each access (a weight not written has none: it is another worker's)."""
    index = json.loads((folder / "index.json").read_text())

    def reader(path: Path) -> Callable[[], np.ndarray]:
        return lambda: np.load(path, allow_pickle=False)

    def missing(name: str) -> Callable[[], np.ndarray]:
        def read() -> np.ndarray:
            raise DataError(f"worker: the posterior of '{name}' was not sent to this worker")
        return read

    weights = {}
    for name, source in index["sources"].items():
        entry = index["weights"].get(name)
        if entry is None:
            weights[name] = WeightPosterior(missing(name), None, missing(name), source)
            continue
        path = {f: folder / f"{entry['file']}.{f}.npy" for f in entry["fields"]}
        kfac = (np.load(path["kfac_a"]), np.load(path["kfac_g"])) if "kfac_a" in path else None
        weights[name] = WeightPosterior(reader(path["mean"]), reader(path["precision"]) if "precision" in path
                                        else None, reader(path["curvature"]), source, kfac,
                                        samples=entry["samples"], prior_precision=entry["prior"])
    return Posterior(index["method"], index["samples"], index["prior_precision"], weights)


class _TablesWorker:
    """One worker's tables: the run the master built, rebuilt from the job's files."""

    def __init__(self, job: TablesJob, root: Path) -> None:
        from bq_onnx.budgets import set_max_memory
        from bq_onnx.limits import set_run_timeout

        set_run_timeout(job.run_timeout)
        set_max_memory(job.max_memory)
        model = load_model(root / "model.onnx")
        found = {w.name: w for w in find_weights(model, WeightsConfig(min_size=1)).weights}
        for name, shape in zip(job.names, job.shapes):
            if name not in found or tuple(found[name].layout.shape) != shape:
                raise DataError(f"worker: {root / 'model.onnx'} has no weight '{name}' of shape {list(shape)}; the "
                                f"model changed while the workers read it")
        ctx = Context(job.config, job.derived, weights=[found[n] for n in job.names])
        if job.posterior:
            ctx.posterior = read_posterior(root / "posterior")
        if job.moments:
            with np.load(root / "moments.npz", allow_pickle=False) as data:
                names = list(data["names"])
                cols = {w.name: w.layout.view_shape[1] for w in ctx.weights}
                ctx.moments = {names[int(k[1:])]: kept_moment(data[k], cols[names[int(k[1:])]])
                               for k in data.files if k != "names"}
        ctx.rounded.update({("nearest", name, int(bits)): True for name, bits in job.nearest})
        calib = read_calibration(root / "calibration") if job.calib else None
        self.ctx = ctx
        self.run = tables_stage.TableRun(model, ctx, calib, job.widths)

    def tables(self, names: Sequence[str]) -> list[tables_stage.TensorTables]:
        from bq_onnx.quantizers import cache

        out = []
        for name in names:  # designs repeat within a weight's tables (its chosen ones, re-scored), never across
            with cache.scope():  # weights, and nothing after the tables reads them here: one weight's at a time
                out.append(self.run.tensor(self.ctx.weight(name)))
        return out

    def close(self) -> None:
        self.run.close()


def run_tables(job: TablesJob, names: tuple[str, ...], files: Mapping[str, bytes] | None = None
               ) -> list[tables_stage.TensorTables]:
    """In a worker: the tables of weights ``names`` (``files``: the scratch files, for a worker that cannot see
    the scratch folder, :func:`bundle`)."""
    for old in _WORKER.values():  # a Ray worker process outlives the posterior's jobs: their model goes
        old.close()
    _WORKER.clear()
    root = Path(job.scratch)
    if files is not None and not (root / "model.onnx").exists():
        root = _written(files)
    with threads(job.threads):
        worker = _TablesWorker(job, root)
        try:
            out = worker.tables(names)
        finally:
            worker.close()
    _fault()
    return out


@contextlib.contextmanager
def threads(count: int) -> Iterator[None]:
    """The quantizers' chunk threads (:mod:`bq_onnx.quantizers.parallel`) set to ``count`` inside, then back."""
    from bq_onnx.quantizers import parallel

    before = parallel._count  # noqa: SLF001 - the setting (None: the default), not the count it resolves to
    parallel.set_threads(count)
    try:
        yield
    finally:
        parallel.set_threads(before)


def share_tables(run: tables_stage.TableRun, setting: Distribution) -> list[tables_stage.TensorTables]:
    """Every weight's tables of ``run``, computed by the workers ``setting`` names (:data:`TENSOR_RUNNER
    <bq_onnx.stages.tables.TENSOR_RUNNER>`), in the order of ``run.ctx.weights``. With ``--workers N`` this
    process computes the first of N lists (:func:`balanced`) and N - 1 spawned processes the others; with
    ``--ray`` every list is a Ray task (as many lists as the cluster has CPUs)."""
    from bq_onnx.progress import memtrace, progress
    from bq_onnx.quantizers.parallel import default_threads

    ctx = run.ctx
    with contextlib.ExitStack() as stack:
        session = stack.enter_context(ray_session(setting.ray)) if setting.ray is not None else None
        if session is not None:
            ray = session.get()
            parts = balanced(ctx.weights, max(1, int(ray.cluster_resources().get("CPU", 1))))
            mine, theirs = [], parts
        else:
            parts = balanced(ctx.weights, setting.workers)
            mine, theirs = parts[0], parts[1:]
        if not theirs:
            return [run.tensor(info) for info in ctx.weights]
        count = max(1, default_threads() // (len(theirs) + (1 if mine else 0)))
        scratch = stack.enter_context(_scratch())
        job = write_tables_job(run, [n for part in theirs for n in part], scratch, 1 if session else count)
        memtrace("tables: the workers' files written")
        done: dict[str, tables_stage.TensorTables] = {}
        if session is not None:
            task = ray.remote(max_retries=RETRIES, num_cpus=1)(run_tables)
            files = ray.put(bundle(job))
            refs = [task.remote(job, tuple(part), files) for part in theirs]
            for ref in refs:
                done.update((t.weight, t) for t in ray_get(ray, ref))
        else:
            pool = _TablesPool(job, len(theirs))
            stack.callback(pool.close)
            futures: dict[concurrent.futures.Future, int] = {}
            for k, part in enumerate(theirs):
                futures.update(pool.submit(k, part))
            with threads(count):
                done.update((info.name, run.tensor(info)) for info in progress(
                    [ctx.weight(n) for n in mine], "loss tables", ctx.progress))
            memtrace("tables: this process's weights")
            replies = collect(futures, lambda k: pool.submit(k, theirs[k]), pool.close,
                              lambda k: f"the worker of the tables of {len(theirs[k])} weight(s) ('{theirs[k][0]}'...)")
            for k in range(len(theirs)):
                done.update((t.weight, t) for t in replies[k])
        return [done[info.name] for info in ctx.weights]


class _TablesPool:
    """The spawned processes of :func:`share_tables` (a fresh pool after one died)."""

    def __init__(self, job: TablesJob, workers: int) -> None:
        self.job, self.workers = job, workers
        self.pool: concurrent.futures.ProcessPoolExecutor | None = None

    def submit(self, key: int, names: Sequence[str]) -> dict[concurrent.futures.Future, int]:
        if self.pool is None:
            self.pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"))
        return {self.pool.submit(run_tables, self.job, tuple(names)): key}

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


# --- shard files ---------------------------------------------------------------------------------------------


def options_text(opts: PosteriorConfig) -> str:
    """The options that change a posterior's numbers, as text compared between shards (``cache`` does not)."""
    return json.dumps({f.name: repr(getattr(opts, f.name)) for f in dataclasses.fields(opts) if f.name != "cache"},
                      sort_keys=True)


def parse_shard(text: str) -> tuple[int, int]:
    """``I/N`` -> (I, N), 0 <= I < N."""
    try:
        index, count = (int(p) for p in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard {text}: expected I/N (shard I of N, counted from 0), e.g. 0/4") from None
    if count < 1 or not 0 <= index < count:
        raise UsageError(f"--shard {text}: I must be in 0..N-1 and N >= 1")
    return index, count


def shard_state(prepared: Prepared, calib: Calibration, opts: PosteriorConfig, index: int, count: int,
                progress_bar: bool = False) -> tuple[dict[str, np.ndarray], dict]:
    """The accumulators of every stage over sample range ``index`` of ``count`` (split on whole batches), as
    arrays keyed ``<phase>/<stage>/<key>``, and the header that says what they are."""
    unit = calib.run_size(opts.batch_size)
    ranges = shard_ranges(calib.num_samples, count, unit)
    if len(ranges) != count:
        raise UsageError(f"--shard {index}/{count}: {calib.num_samples} calibration samples make only "
                         f"{len(ranges)} shard(s) of whole batches of {unit}; use N <= {len(ranges)}")
    rows = ranges[index]
    sessions, spill = TempSessions(), Spill()
    arrays: dict[str, np.ndarray] = {}
    stages = {"main": 0, "rest": 0}
    try:
        problem, main = problems(prepared, calib, opts, sessions, progress_bar, spill)
        covered: set[str] = set()
        if prepared.weights:
            for k, stage in enumerate(REGISTRY[opts.method](main).stages()):
                acc = stage.run(rows, progress_bar)
                covered.update(acc.finalize().curvature)
                arrays.update({f"main/{k}/{key}": v for key, v in acc.state().items()})
                stages["main"] = k + 1
        rest = [w for w in prepared.weights if w.name not in covered]
        for k, stage in enumerate(Activations(problem, rest).stages() if rest else ()):
            acc = stage.run(rows, progress_bar)
            arrays.update({f"rest/{k}/{key}": v for key, v in acc.state().items()})
            stages["rest"] = k + 1
    finally:
        sessions.close()
    header = {"format": SHARD_FORMAT, "shard": [index, count], "samples": [rows.start, rows.stop],
              "num_samples": calib.num_samples, "options": options_text(opts), "stages": stages,
              "rest": [w.name for w in rest]}
    return arrays, header


def write_shard(path: Path, arrays: Mapping[str, np.ndarray], header: dict) -> None:
    """One ``.npz``: the arrays and a JSON ``__header__`` (write through :func:`bq_onnx.writing.write_file`)."""
    np.savez(path, **arrays, __header__=np.frombuffer(json.dumps(header, sort_keys=True).encode(), dtype=np.uint8))


def read_header(path: str | os.PathLike) -> dict:
    try:
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(data["__header__"].tobytes().decode())
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise DataError(f"{path}: not a posterior shard file ({str(exc).splitlines()[0][:160]})") from None
    if not isinstance(header, dict) or header.get("format") != SHARD_FORMAT:
        raise DataError(f"{path}: not a posterior shard file (written by `bq-onnx posterior --shard I/N`)")
    return header


def check_shards(paths: Sequence[str | os.PathLike], expected: dict) -> list[str]:
    """The shard files in shard order, once each checked to be the shards ``expected`` (model and calibration
    sha256, options) describes, 0..N-1 all present; else one line saying what differs."""
    if not paths:
        raise UsageError("--merge needs the shard files (a.npz b.npz ...)")
    by_index: dict[int, str] = {}
    count = None
    for path in paths:
        header = read_header(path)
        for key, what in (("model_sha256", "another model"), ("calibration_sha256", "other calibration data"),
                          ("options", "other options")):
            if header.get(key) != expected[key]:
                detail = "" if key == "options" else f" (sha256 {str(header.get(key))[:12]}, not {expected[key][:12]})"
                if key == "options":
                    theirs, ours = json.loads(header.get(key) or "{}"), json.loads(expected[key])
                    diff = sorted(k for k in ours if theirs.get(k) != ours[k])
                    detail = f" ({', '.join(f'{k}: {theirs.get(k)} vs {ours[k]}' for k in diff[:3])})"
                raise DataError(f"{path}: shard of {what} than this merge{detail}; refused")
        index, n = header["shard"]
        if count is not None and n != count:
            raise DataError(f"{path}: shard {index}/{n}, but the other shards are of {count}; refused")
        count = n
        if index in by_index:
            raise DataError(f"{path}: shard {index}/{n} given twice (also {by_index[index]}); refused")
        by_index[index] = os.fspath(path)
    missing = [i for i in range(count) if i not in by_index]
    if missing:
        raise DataError(f"--merge: shard(s) {', '.join(f'{i}/{count}' for i in missing)} missing; refused")
    return [by_index[i] for i in range(count)]


class ShardFiles:
    """A runner whose shards were computed already: each stage's accumulators read from the files in order."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = list(paths)
        self.headers = [read_header(p) for p in self.paths]

    def accumulate(self, stage: Stage, task: Task, bar: bool) -> Accumulator:
        prefix = f"{task.phase}/{task.stage}/"
        total = None
        for path, header in zip(self.paths, self.headers):
            if task.phase == "rest" and list(task.rest) != header["rest"]:
                raise DataError(f"{path}: its fallback weights differ from this merge's; refused")
            if task.stage >= header["stages"][task.phase]:
                raise DataError(f"{path}: has no {task.phase} stage {task.stage}; refused")
            with np.load(path, allow_pickle=False) as data:
                state = {key[len(prefix):]: data[key] for key in data.files if key.startswith(prefix)}
            acc = stage.restore(state)
            del state
            total = acc if total is None else total.merge(acc)
        return total


def merge_shards(prepared: Prepared, calib: Calibration, opts: PosteriorConfig, paths: Sequence[str],
                 progress_bar: bool = False) -> Posterior:
    """The posterior of shard files (checked by :func:`check_shards` first), as one process would finalize it."""
    return _estimate(prepared, calib, opts, progress_bar, ShardFiles(paths))


__all__ = ["RETRIES", "Distribution", "Job", "PoolRunner", "RayRunner", "RaySession", "ShardFiles", "TablesJob",
           "balanced", "check_shards", "distributed", "merge_shards", "parse_shard", "read_header", "run_shard",
           "run_tables", "runner_for", "share_tables", "shard_samples", "shard_state", "write_shard"]
