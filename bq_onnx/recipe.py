"""Recipes: every option of ``optimize`` in a TOML file, with the flags' names and checks.

A recipe is a flat TOML table whose keys are the option names of :mod:`bq_onnx.config` (the flags without ``--``
and with ``_`` for ``-``: ``bits = 4``, ``group_size = "auto"``, ``exclude = ["op:Conv"]``,
``batch_axis = {state = 1}``), or the same table under ``[optimize]``. Values go through the same parsing and
checks as the flags (:meth:`bq_onnx.config.OptimizeConfig.replace`); flags given on the command line override
the recipe. :func:`dump` writes the recipe of a configuration (``--print-config``): every option that has a
value, so that a later change of a default does not change what the recipe asks for.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from bq_onnx.errors import UsageError


def load(path: str | os.PathLike) -> dict[str, Any]:
    """The options of a recipe file, as keywords for :meth:`OptimizeConfig.replace` (a bad file: one line,
    exit 2)."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"--config {path}: cannot read ({exc.strerror or type(exc).__name__})") from None
    return loads(text, f"--config {path}")


def loads(text: bytes | str, where: str) -> dict[str, Any]:
    """The options of a recipe's text; ``where`` starts each error line (``--config r.toml``)."""
    import tomllib

    try:
        table = tomllib.loads(text.decode("utf-8") if isinstance(text, bytes) else text)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{where}: not a TOML recipe ({' '.join(str(exc).split())})") from None
    if set(table) == {"optimize"} and isinstance(table["optimize"], Mapping):
        table = dict(table["optimize"])
    nested = sorted(k for k, v in table.items() if isinstance(v, Mapping) and k not in _MAPPING_OPTIONS)
    if nested:
        raise UsageError(f"{where}: unexpected table [{nested[0]}] (a recipe is one table of options, "
                         f"or [optimize])")
    return table


def config_from(path: str | os.PathLike, **overrides: Any) -> Any:
    """The :class:`OptimizeConfig` of a recipe, ``overrides`` (e.g. the flags given) applied on top."""
    return _config(load(path), f"--config {path}", overrides)


def config_from_text(text: str, where: str, **overrides: Any) -> Any:
    """:func:`config_from` for a recipe's text (the one an output records: ``--recipe-from``)."""
    return _config(loads(text, where), where, overrides)


def _config(options: dict[str, Any], where: str, overrides: dict[str, Any]) -> Any:
    from bq_onnx.config import OptimizeConfig

    try:
        config = OptimizeConfig().replace(**options)
    except UsageError as exc:
        raise UsageError(f"{where}: {exc}") from None
    return config.replace(**overrides)


def dump(config: Any, leave_out: Iterable[str] = ()) -> str:
    """The recipe of ``config`` (an :class:`OptimizeConfig`): one ``name = value`` line per option with a value,
    concern by concern; :func:`load` reads it back to an equal configuration. ``leave_out``: options not written
    (those an output's provenance does not record)."""
    from bq_onnx.config import concern_types

    lines = ["# bq-onnx optimize recipe: option names as the flags (--group-size -> group_size)"]
    seen: set[str] = set()
    for field, concern in concern_types().items():
        values = getattr(config, field)
        block = []
        for name, opt in concern.options().items():
            value = getattr(values, name)
            if name in seen or name in leave_out or (value is None and opt.default is None):
                continue
            seen.add(name)
            if _is_float(concern, name) and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)  # one spelling: 5 from a recipe and 5.0 from --bits 5 write the same recipe
            plain = _plain(value) if value is not None else _none_word(name, opt)
            if isinstance(plain, str) and plain.startswith("<") and plain.endswith(">") and not isinstance(value, str):
                raise UsageError(f"{name} was given as {plain.strip('<>')} through the API, which a recipe cannot "
                                 f"hold (give a file path to record it)")
            block.append(f"{name} = {_toml(plain)}")
        if block:
            lines += ["", f"# {concern.title}", *block]
    return "\n".join(lines) + "\n"


def _is_float(concern: Any, name: str) -> bool:
    import dataclasses

    kinds = {f.name: str(f.type) for f in dataclasses.fields(concern)}
    return kinds.get(name, "").removesuffix(" | None") == "float"


def _none_word(name: str, opt: Any) -> Any:
    """What the flag takes for None when None is not the default (``--granularity tensor``)."""
    for word in ("none", "tensor", 0):
        try:
            if opt.parse is not None and opt.parse(word, name) is None:
                return word
        except UsageError:
            continue
    raise UsageError(f"cannot write {name} = None in a recipe")


#: Options whose value is a mapping: an inline table in a recipe, not a section.
_MAPPING_OPTIONS = frozenset({"batch_axis", "input_shape", "allocator_options"})


def _plain(value: Any) -> Any:
    from bq_onnx.options import _jsonable

    return _jsonable(value)


def _toml(value: Any) -> str:
    """A TOML value: strings as basic strings (JSON's escapes are TOML's), lists, inline tables."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if value is None:
        return '"none"'  # inside a pair (batch_axis INPUT=none): the word the flag takes
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise UsageError(f"cannot write {value!r} in a recipe")
