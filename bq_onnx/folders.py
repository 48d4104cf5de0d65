"""Folders: every ONNX model of a folder (an optimum export, a multi-model pipeline) optimized into an output folder.

Exporters write folders, not files: optimum's ONNX export is ``model.onnx`` (or ``encoder_model.onnx``,
``decoder_model.onnx``, ...) beside ``config.json``, tokenizer files and, for large models, external data. A
folder run finds every ``*.onnx`` file under the folder (names starting with ``.`` are skipped), optimizes each as
``optimize`` would (its external data read beside it, the output's written beside the output model), and copies
every other regular file, so the output folder loads like the input one. Each model is named by its path without
``.onnx`` (``encoder_model``, ``unet/model``), the name ``--calib NAME=FILE`` uses.

Budgets: by default each model spends ``--bits`` on its own weights. With a shared budget the models' expected-loss
tables are allocated together (one greedy or dp allocation over the blocks of every model, :func:`shared_split`),
so the bits go where they buy the most loss reduction across the models; each model then runs again with its
share as its own budget (its posterior estimated once), so every per-model guarantee holds and the shares add up
to ``--bits`` over all weights.

Writing (:meth:`FolderResult.save`): every model and copy goes into one private staging folder first, each model
by the write protocol of :mod:`bq_onnx.writing` and verified there. Only when every model verified does the output
appear: a new output folder is the staging folder renamed (one atomic step); into an existing folder the staged
files are renamed one by one (each as a single-model output is: exclusive without ``force``, data before model).
Nothing is ever written inside the input folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bq_onnx.errors import BqError, OutputError, UnsupportedError, UsageError
from bq_onnx.stages.bracket import every_width

#: The one error text of a model without quantizable weights (:func:`bq_onnx.stages.weights.find_weights`).
NO_WEIGHTS = "no quantizable weights"


@dataclasses.dataclass
class Survey:
    """What a folder holds: models, their external data files, and the other files (relative POSIX paths)."""

    root: Path
    models: list[str]
    data: dict[str, list[str]]  # model -> its external data files
    copies: list[str]
    skipped: list[str]  # links to folders, FIFOs, devices: neither read nor copied

    def name(self, rel: str) -> str:
        return model_name(rel)


def model_name(rel: str) -> str:
    """A model's name in a folder: its relative path without ``.onnx`` (``encoder_model``, ``unet/model``)."""
    return rel.removesuffix(".onnx")


def survey(root: str | os.PathLike) -> Survey:
    """Every ``.onnx`` model under ``root`` and every other regular file, in sorted order; files a model names as
    external data belong to it (not copied: the output model has its own)."""
    from bq_onnx.writing import external_locations

    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"{root}: not a folder")
    files, skipped = [], []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        here = Path(folder)
        for d in dirs:
            if (here / d).is_symlink():
                skipped.append((here / d).relative_to(root).as_posix())
        for name in sorted(names):
            if name.startswith("."):
                continue
            path = here / name
            rel = path.relative_to(root).as_posix()
            try:
                mode = path.stat().st_mode  # a link to a file counts as that file
            except OSError:
                skipped.append(rel)
                continue
            (files if stat.S_ISREG(mode) else skipped).append(rel)
    models = [f for f in files if f.endswith(".onnx")]
    if not models:
        raise UnsupportedError(f"{root}: no .onnx model in this folder")
    data: dict[str, list[str]] = {}
    for rel in models:
        parent = Path(rel).parent
        data[rel] = [(parent / loc).as_posix() for loc in external_locations(root / rel)]
    owned = {d for names in data.values() for d in names}
    copies = [f for f in files if f not in models and f not in owned]
    return Survey(root, models, data, copies, sorted(skipped))


def per_model(values: Any, survey_: Survey, flag: str) -> dict[str, Any]:
    """``--calib``/``--posterior`` for a folder: ``NAME=FILE`` entries (repeatable), a file for every model, or a
    mapping name -> source (API); returns model name -> source for the models that have one."""
    names = {model_name(m) for m in survey_.models}
    if values is None:
        return {}
    if isinstance(values, Mapping):
        unknown = sorted(set(values) - names)
        if unknown:
            raise UsageError(f"{flag}: no model named '{unknown[0]}' in {survey_.root} (models: "
                             f"{', '.join(sorted(names))})")
        return dict(values)
    if isinstance(values, (str, os.PathLike)):
        values = [values]
    out: dict[str, Any] = {}
    shared = None
    for value in values:
        text = os.fspath(value)
        name, sep, path = text.partition("=")
        if sep and name in names:
            if name in out:
                raise UsageError(f"{flag} {text}: model '{name}' given twice")
            out[name] = path
        elif sep and not Path(text).exists():
            raise UsageError(f"{flag} {text}: no model named '{name}' in {survey_.root} (models: "
                             f"{', '.join(sorted(names))})")
        elif shared is not None:
            raise UsageError(f"{flag}: give one file for every model, or NAME=FILE per model")
        else:
            shared = text
    if shared is not None:
        for name in names:
            out.setdefault(name, shared)
    return out


@dataclasses.dataclass
class FolderResult:
    """Every model of a folder optimized in memory; :meth:`save` writes the output folder."""

    survey: Survey
    results: dict[str, Any]  # model name -> OptimizeResult
    unchanged: list[str]  # models without quantizable weights: copied as they are
    shared_budget: bool
    split: dict[str, float] | None = None  # model name -> its --bits under a shared budget
    inputs: tuple[str, ...] = ()  # calibration and posterior files: never written
    report: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.report = self._report()

    def protected(self):
        """Every file of the input folder (models, external data, copies) and the calibration/posterior files."""
        protected = protected_inputs(self.survey, self.inputs)
        for result in self.results.values():
            for path in result.protected().paths:
                protected.add(path)
        return protected

    def targets(self) -> list[str]:
        """The relative paths this output writes (models, then copies)."""
        return [*self.survey.models, *self._copied()]

    def _copied(self) -> list[str]:
        unchanged = {m for m in self.survey.models if model_name(m) in self.unchanged}
        extra = [d for m in unchanged for d in self.survey.data[m]]
        return sorted({*self.survey.copies, *extra})

    def check_output(self, out: str | os.PathLike | None, force: bool) -> Path:
        """Where the output folder goes (:func:`check_folder_output`)."""
        return check_folder_output(self.survey, out, force, self.protected(), self.targets())

    def save(self, out: str | os.PathLike | None = None, *, force: bool = False, verify: bool = True) -> dict:
        """Write every model (by the write protocol, verified) and copy every other file into ``out`` (default
        ``DIR.bq`` beside the input); the output appears only after every model verified. Returns the report."""
        from bq_onnx import writing

        out = self.check_output(out, force)
        protected = self.protected()
        exists = out.is_dir()
        home = out if exists else out.parent
        writing.clean_stale(home)
        root = self.survey.root
        try:
            with writing.staging(home) as staged:
                for rel in self.survey.models:
                    name = model_name(rel)
                    (staged / rel).parent.mkdir(parents=True, exist_ok=True)
                    if name in self.results:
                        try:
                            report = self.results[name].save(staged / rel, verify=verify)
                        except BqError as exc:
                            raise _named(exc, rel) from None
                        report["output"]["path"] = os.fspath(out / rel)
                    else:
                        _copy(root / rel, staged / rel)
                for rel in self._copied():
                    (staged / rel).parent.mkdir(parents=True, exist_ok=True)
                    _copy(root / rel, staged / rel)
                _open_up(staged)
                if exists:
                    _place_each(staged, out, self, protected, force)
                else:
                    with writing.signals_held():
                        if os.path.lexists(out):
                            raise OutputError(f"{out}: was created while bq-onnx worked; choose another output "
                                              f"folder")
                        os.rename(staged, out)
        except OSError as exc:
            raise OutputError(f"{out}: cannot write the output ({exc.strerror or exc})") from None
        self.report = self._report()
        written = [m for m in self.survey.models if model_name(m) in self.results]
        self.report["output"] = {"path": os.fspath(out), "model_bytes": _models_bytes(out, written)}
        return self.report

    def _report(self) -> dict:
        from bq_onnx import __version__

        models = {name: r.report for name, r in self.results.items()}
        numel = sum(r["totals"]["numel"] for r in models.values())
        stored = sum(r["totals"]["stored_bytes"] for r in models.values())
        achieved = sum(r["allocation"]["achieved_bits"] * r["totals"]["numel"] for r in models.values()
                       if "allocation" in r)
        return {
            "tool": "bq-onnx",
            "version": __version__,
            "input": os.fspath(self.survey.root),
            "budget": "shared" if self.shared_budget else "per-model",
            "split": self.split,
            "models": models,
            "unchanged": sorted(self.unchanged),
            "copied": self._copied(),
            "skipped": self.survey.skipped,
            "messages": [f"{name}: {NO_WEIGHTS}; copied unchanged" for name in sorted(self.unchanged)],
            "totals": {
                "models": len(models),
                "numel": numel,
                "original_bytes": sum(r["totals"]["original_bytes"] for r in models.values()),
                "stored_bytes": stored,
                "stored_bits_per_weight": 8 * stored / numel if numel else 0.0,
                "achieved_bits": achieved / numel if numel and all("allocation" in r for r in models.values())
                else None,
                "input_model_bytes": _models_bytes(self.survey.root, [m for m in self.survey.models
                                                                      if model_name(m) in models]),
            },
        }


def protected_inputs(found: Survey, inputs: Any = ()) -> Any:
    """A :class:`bq_onnx.writing.Protected` of every file in the input folder and ``inputs`` (paths; None skipped)."""
    from bq_onnx.writing import Protected

    protected = Protected()
    for rel in found.models:
        protected.add_model(found.root / rel)
    for rel in (*found.copies, *(d for ds in found.data.values() for d in ds)):
        protected.add(found.root / rel)
    for path in inputs:
        protected.add(path)
    return protected


def default_output(root: Path) -> Path:
    """``DIR.bq`` beside the input folder."""
    root = root.resolve()
    return root.with_name(root.name + ".bq")


def check_folder_output(found: Survey, out: str | os.PathLike | None, force: bool, protected: Any,
                        targets: list[str] | None = None) -> Path:
    """The output folder (default ``DIR.bq``), refused (exit 7) when it is the input folder or inside it, not a
    folder, or (without ``force``) already holds a file to write: ``targets`` (default: every model, data file and
    other file of the input, the most a run writes), so the CLI can refuse before any work."""
    from bq_onnx.writing import check_output

    out = default_output(found.root) if out is None else Path(out)
    root = found.root.resolve()
    where = _resolved(out)
    if where == root or root in where.parents:
        raise OutputError(f"{out}: is inside the input folder {found.root}; choose another output folder")
    if os.path.lexists(out) and not (out.is_dir() and not out.is_symlink()):
        raise OutputError(f"{out}: exists and is not a folder")
    if not out.parent.is_dir():
        raise OutputError(f"{out.parent}: output folder's parent does not exist")
    if out.is_dir():
        if targets is None:
            targets = [*found.models, *found.copies, *(d for ds in found.data.values() for d in ds)]
        for rel in targets:
            if (out / rel).parent.exists():
                check_output(out / rel, protected, force)
    return out


def _named(exc: BqError, rel: str) -> BqError:
    """The same error (exit code) with the model's path in front, unless its message names it already."""
    text = str(exc)
    return exc if rel in text else type(exc)(f"{rel}: {text}")


def _resolved(p: Path) -> Path:
    try:
        return p.resolve()
    except (OSError, RuntimeError):
        return Path(os.path.abspath(p))


def _copy(src: Path, dst: Path) -> None:
    """A regular file's bytes (a link's target), at the output mode; never a link."""
    from bq_onnx.writing import output_mode

    shutil.copyfile(src, dst, follow_symlinks=True)
    os.chmod(dst, output_mode())


def _open_up(staged: Path) -> None:
    """The staging folder and its subfolders get a new folder's mode (``0777 & ~umask``) before they appear."""
    from bq_onnx.writing import output_mode

    mode = output_mode() | ((output_mode() & 0o444) >> 2)  # read bits -> search bits
    for folder, dirs, _ in os.walk(staged):
        for d in dirs:
            os.chmod(Path(folder) / d, mode)
    os.chmod(staged, mode)


def _place_each(staged: Path, out: Path, result: FolderResult, protected, force: bool) -> None:
    """Into an existing folder: copies first, then each model with its data file (:func:`bq_onnx.writing.commit`,
    exclusive without ``force``)."""
    from bq_onnx import writing

    for rel in result._copied():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        writing.check_output(out / rel, protected, force)
        writing.commit(staged / rel, out / rel, protected, force)
    for rel in result.survey.models:
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        writing.check_output(target, protected, force)
        data = [staged / Path(rel).parent / loc for loc in writing.external_locations(staged / rel)]
        writing.commit(staged / rel, target, protected, force, data[0] if data else None)


def _models_bytes(root: Path, models: list[str]) -> int:
    """Bytes of these models with their external data files."""
    from bq_onnx.writing import external_locations

    total = 0
    with contextlib.suppress(OSError):
        for rel in models:
            total += (root / rel).stat().st_size
            total += sum((root / rel).parent.joinpath(loc).stat().st_size for loc in external_locations(root / rel))
    return total


def shared_split(results: Mapping[str, Any], bits: float) -> dict[str, float]:
    """Model name -> its share of one budget of ``bits`` per weight over every model's weights: the blocks of every
    model allocated together (the models' own allocator when it is greedy or dp, on each model's tables with its
    floors), each model's cost in that allocation scaled so the shares add up to the whole budget."""
    from bq_onnx import allocation
    from bq_onnx.stages.allocate import allocation_blocks

    blocks, owner, numel = [], {}, {}
    method = None
    for name, result in results.items():
        ctx = result.context
        method = ctx.config.allocation.allocator
        numel[name] = sum(t.numel for t in ctx.tables.blocks)
        for b in allocation_blocks(ctx, ctx.tables):
            key = f"{name}\x00{b.name}"
            owner[key] = name
            blocks.append(dataclasses.replace(b, name=key, layer=f"{name}\x00{b.layer_key}"))
    total = bits * sum(numel.values())
    try:
        joint = allocation.allocate(method, blocks, total)
    except ValueError as exc:
        raise UsageError(f"--shared-budget: allocation ({method}): {exc}") from None
    cost = {name: 0.0 for name in results}
    for b in blocks:
        cost[owner[b.name]] += float(b.cost[b.bits.index(joint.bits[b.name])])
    spent = math.fsum(cost.values())
    return {name: total * cost[name] / spent / numel[name] for name in results}


def optimize_folder(
    folder: str | os.PathLike,
    config: Any = None,
    *,
    calib: Any = None,
    posterior: Any = None,
    shared_budget: bool = False,
    progress: bool = False,
    **options: Any,
) -> FolderResult:
    """Optimize every ONNX model under ``folder`` (never modified) with the same options (``config`` and keywords as
    :func:`bq_onnx.optimize`). ``calib``/``posterior``: one source for every model, ``NAME=FILE`` strings, or a
    mapping model name -> source. ``shared_budget``: one ``--bits`` budget over every model's weights, spent where
    it buys the most (:func:`shared_split`); else each model has its own. A model without quantizable weights is
    copied unchanged (with a note); none with any is exit 4. :meth:`FolderResult.save` writes the output folder."""
    from bq_onnx import provenance
    from bq_onnx.api import optimize
    from bq_onnx.config import OptimizeConfig
    from bq_onnx.context import Derived, is_fixed

    found = survey(folder)
    calibs = per_model(calib, found, "--calib")
    posteriors = per_model(posterior, found, "--posterior")
    if isinstance(config, (str, os.PathLike)):
        from bq_onnx.recipe import config_from

        config = config_from(config)
    config = (config or OptimizeConfig()).replace(**options)
    if shared_budget:
        a = config.allocation
        if a.size_mb is not None:
            raise UsageError("--shared-budget shares --bits; --size-mb is per model (leave one out)")
        if a.allocator not in ("greedy", "dp") or is_fixed(config, Derived.from_config(config)):
            raise UsageError(f"--shared-budget needs --allocator greedy or dp (the tables decide where the bits "
                             f"go), got {a.allocator}")
    results: dict[str, Any] = {}
    unchanged: list[str] = []
    for rel in found.models:
        name = model_name(rel)
        try:
            # a shared budget allocates every model's tables together, anywhere: every width scored
            with every_width() if shared_budget else contextlib.nullcontext():
                results[name] = optimize(found.root / rel, config, calib=calibs.get(name),
                                         posterior=posteriors.get(name), progress=progress)
        except UnsupportedError as exc:
            if not str(exc).startswith(NO_WEIGHTS):
                raise _named(exc, rel) from None
            unchanged.append(name)
        except BqError as exc:
            raise _named(exc, rel) from None
    if not results:
        raise UnsupportedError(f"{found.root}: {NO_WEIGHTS} in any of its {len(found.models)} model(s)")
    split = None
    if shared_budget:
        split = shared_split(results, float(config.allocation.bits))
        for name, bits in split.items():
            first = results[name]
            if abs(bits - config.allocation.bits) < 1e-9:
                continue
            rel = name + ".onnx"
            # the posterior estimated once: the share is the only change
            results[name] = optimize(found.root / rel, config.replace(bits=bits), calib=calibs.get(name),
                                     posterior=first.context.posterior or posteriors.get(name), progress=progress)
            if posteriors.get(name) is None:  # the reused posterior is the run's own estimate, not an input
                results[name].model.metadata_props.pop(provenance.POSTERIOR_SHA256, None)
    files = tuple(os.fspath(v) for v in (*calibs.values(), *posteriors.values()) if isinstance(v, (str, os.PathLike)))
    return FolderResult(found, results, unchanged, shared_budget, split, files)
