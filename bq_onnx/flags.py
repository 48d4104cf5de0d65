"""Command-line flags generated from the option declarations in :mod:`bq_onnx.config` (:mod:`bq_onnx.options`).

One flag per option, in an argument group per concern; argparse only collects the text (every default is None:
"not given"), and the config classes parse and check it, so a flag means exactly what the API keyword means.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from typing import Any

from bq_onnx.options import Concern, Option, flag_of

PREFIX = "opt_"
"""Namespace attributes of generated flags (``opt_bits``), apart from a command's own arguments (``output``)."""


def add_concern(parser: argparse.ArgumentParser, concern: type[Concern], only: Iterable[str] | None = None,
                title: str | None = None) -> None:
    """Add the flags of ``concern`` (or of the options named in ``only``) to ``parser`` in one group.

    An option already on the parser (one several concerns share, such as ``--seed``) is not added twice.
    """
    options = {name: opt for name, opt in concern.options().items() if only is None or name in only}
    add_group(parser, title or concern.title, options)


def add_group(parser: argparse.ArgumentParser, title: str, options: dict[str, Option], group: Any = None) -> Any:
    """The flags of ``options`` not yet on ``parser``, in a new argument group (or ``group``); returns it."""
    seen: set[str] = parser.__dict__.setdefault("_bq_options", set())
    group = group or parser.add_argument_group(title)
    for name, opt in options.items():
        if opt.flag is not None and name not in seen:
            seen.add(name)
            _add(group, name, opt)
    return group


def _add(group: Any, name: str, opt: Option) -> None:
    flag = flag_of(name, opt)
    kwargs: dict[str, Any] = {"dest": PREFIX + name, "default": None, "help": _help(opt)}
    if opt.default is False:
        kwargs["action"] = "store_true"
    else:
        kwargs["action"] = "append" if opt.repeat else "store"
        if opt.choices is not None:
            kwargs["choices"] = opt.choices
        else:
            kwargs["metavar"] = opt.metavar or flag.lstrip("-").replace("-", "_").upper()
    group.add_argument(flag, **kwargs)


def _help(opt: Option) -> str:
    text = opt.help
    shown = opt.shown_default()
    if shown is not None and "default" not in text:
        text += f" (default {shown})"
    return text.replace("%", "%%")


def given(args: argparse.Namespace, concern: type[Concern]) -> dict[str, Any]:
    """The options of ``concern`` that the command line gave, as keywords for the config class."""
    out = {}
    for name in concern.options():
        value = getattr(args, PREFIX + name, None)
        if value is not None:
            out[name] = value
    return out
