"""Provenance: how an output was made, in its ``metadata_props``, so CI can audit and re-run it.

An output of ``optimize`` records four entries (README, "Recipes"):

- ``bq_onnx.version``: the bq-onnx version that wrote it;
- ``bq_onnx.recipe``: the full recipe of the run, as ``--print-config`` writes it (:func:`bq_onnx.recipe.dump`),
  less :data:`NOT_RECORDED`;
- ``bq_onnx.model_sha256``: sha256 of the input model file's bytes followed by the bytes of each external data file
  it names, in the order the model first names them (:func:`model_sha256`; for a model without external data what
  ``sha256sum MODEL`` prints); for an in-memory model, of its deterministic protobuf serialization;
- ``bq_onnx.calibration_sha256``: sha256 of the calibration samples as loaded (:func:`calibration_sha256`), or
  ``none`` when the run had no calibration data;
- ``bq_onnx.posterior_sha256``, only when the run was given a posterior (``--posterior``): sha256 of that file's
  bytes, or of an in-memory :class:`~bq_onnx.posterior.Posterior`'s arrays (:func:`posterior_sha256`).

A recipe that cannot be written (an option given through the API as an object, labels as an array) is recorded as
a comment line starting with :data:`NOT_A_RECIPE`; ``--recipe-from`` refuses it in one line.

No timestamps, no paths: the same input and recipe give the same entries, so outputs stay byte-identical.
Reading (:func:`read`) is standard library only, for ``bq-onnx inspect``'s fast start.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from typing import Any

PREFIX = "bq_onnx."
VERSION, RECIPE, MODEL_SHA256, CALIBRATION_SHA256 = (PREFIX + k for k in
                                                     ("version", "recipe", "model_sha256", "calibration_sha256"))
KEYS = (VERSION, RECIPE, MODEL_SHA256, CALIBRATION_SHA256)
POSTERIOR_SHA256 = PREFIX + "posterior_sha256"
OPTIONAL_KEYS = (POSTERIOR_SHA256,)
NONE = "none"
NOT_A_RECIPE = "# not writable as a recipe:"
#: Options the recorded recipe leaves out: they never change the output's bytes and name local paths (the
#: gradient cache folder, the inputs of the post-write check).
NOT_RECORDED = frozenset({"cache", "verify_inputs"})
_CHUNK = 1 << 20


def read(props: Iterable[Any] | Mapping[str, str]) -> dict[str, str] | None:
    """The provenance entries of ``metadata_props`` (proto entries or the IR's mapping) by short name
    (``version``, ``recipe``, ``model_sha256``, ``calibration_sha256``), or None when there are none."""
    values = dict(props.items()) if hasattr(props, "items") else {p.key: p.value for p in props}
    found = {k.removeprefix(PREFIX): values[k] for k in (*KEYS, *OPTIONAL_KEYS) if k in values}
    return found or None


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def model_sha256(source: Any) -> str:
    """sha256 of the input model: a file's bytes, then the bytes of each external data file it names in the order
    it first names them (a model without external data: the file's sha256); a ModelProto's or an IR model's
    deterministic serialization (its external data, if any, is not read)."""
    if isinstance(source, (str, os.PathLike)):
        from pathlib import Path

        from bq_onnx.writing import external_locations

        h = hashlib.sha256()
        folder = Path(source).parent
        for path in (Path(source), *(folder / loc for loc in external_locations(source))):
            with open(path, "rb") as f:
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
        return h.hexdigest()
    import onnx_ir as ir

    proto = ir.serde.serialize_model(source) if isinstance(source, ir.Model) else source
    return hashlib.sha256(proto.SerializeToString(deterministic=True)).hexdigest()


def calibration_sha256(calibration: Any) -> str:
    """sha256 of calibration samples as loaded (a :class:`bq_onnx.calibration.Calibration`): per input, in name
    order, a header line ``name dtype shape sample-axis`` then the array's bytes in C order; inputs whose parts do
    not stack (kept one per run) hash each part's ``dtype shape`` and bytes. So the same samples hash the same
    whether they came from one ``.npz``, a folder of ``.npz`` files that stack to it, a dict or a reader; the
    file names, the source's kind and the order of the keys in a file do not count."""
    import numpy as np

    from bq_onnx.runs import Runs

    h = hashlib.sha256()

    def array(value: Any, header: str) -> None:
        value = np.asarray(value)
        h.update(f"{header} {value.dtype.str} {list(value.shape)}\n".encode())
        flat = value.reshape(-1)
        step = max(1, _CHUNK // max(value.itemsize, 1))
        for start in range(0, flat.size, step):  # chunks: a spilled (memory-mapped) input is not read at once
            h.update(np.ascontiguousarray(flat[start:start + step]).tobytes())

    for name in sorted(calibration.arrays):
        value = calibration.arrays[name]
        if isinstance(value, Runs):
            h.update(f"{name} runs {len(value.parts)}\n".encode())
            for part in value.parts:
                array(part, "part")
        else:
            array(value, f"{name} axis={calibration.axis(name)}")
    return h.hexdigest()


def posterior_sha256(posterior: Any) -> str:
    """sha256 of a posterior: a file's bytes; an in-memory :class:`~bq_onnx.posterior.Posterior`: per weight in name
    order, a line ``name dtype shape`` then its mean's and precision's bytes (float64, C order)."""
    if isinstance(posterior, (str, os.PathLike)):
        return file_sha256(posterior)
    import numpy as np

    h = hashlib.sha256()
    for name in sorted(posterior.weights):
        wp = posterior.weights[name]
        for array in (wp.mean, wp.precision):
            array = np.ascontiguousarray(array, dtype=np.float64)
            h.update(f"{name} {array.dtype.str} {list(array.shape)}\n".encode())
            h.update(array.tobytes())
    return h.hexdigest()


def entries(version: str, recipe: str, model_sha: str, calibration_sha: str | None,
            posterior_sha: str | None = None) -> dict[str, str]:
    """The ``metadata_props`` entries of an output, in a fixed order (the posterior's only when one was given)."""
    made = {VERSION: version, RECIPE: recipe, MODEL_SHA256: model_sha,
            CALIBRATION_SHA256: calibration_sha if calibration_sha is not None else NONE}
    if posterior_sha is not None:
        made[POSTERIOR_SHA256] = posterior_sha
    return made


def recorded(path: str | os.PathLike, flag: str = "--recipe-from") -> dict[str, str]:
    """The provenance of an output file, every entry present, or a one-line :class:`UsageError`."""
    from bq_onnx.errors import ModelError, UsageError
    from bq_onnx.onnx_proto import read_model

    try:
        found = read(read_model(path).metadata_props) or {}
    except ModelError as exc:
        raise UsageError(f"{flag} {exc}") from None
    missing = [k for k in KEYS if k.removeprefix(PREFIX) not in found]
    if missing:
        raise UsageError(f"{flag} {os.fspath(path)}: no bq-onnx provenance in its metadata (missing {missing[0]}; "
                         f"not written by bq-onnx optimize, or by a version before provenance)")
    if found["recipe"].startswith(NOT_A_RECIPE):
        why = found["recipe"].splitlines()[0].removeprefix(NOT_A_RECIPE).strip()
        raise UsageError(f"{flag} {os.fspath(path)}: its run cannot be repeated from the record ({why})")
    return found
