"""How an option is declared, parsed and checked: :class:`Option` and the :class:`Concern` base of the configs.

The options themselves are in :mod:`bq_onnx.config`. Standard library only (the CLI's parser is built from these).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from bq_onnx.errors import UsageError

Parse = Callable[[Any, str], Any]
"""CLI text or an API value, and the flag for messages -> the typed value (a :class:`UsageError` if bad)."""


@dataclasses.dataclass(frozen=True)
class Option:
    """One user option. ``flag``: ``""`` derives ``--name-with-dashes``, None keeps it API-only. ``check``
    returns what is wrong with a typed value (``"must be >= 1"``) or None. ``repeat``: the flag may be given
    several times. ``show``: the default as ``--help`` writes it."""

    default: Any
    help: str
    parse: Parse | None = None
    check: Callable[[Any], str | None] | None = None
    choices: tuple[str, ...] | None = None
    flag: str | None = ""
    metavar: str | None = None
    repeat: bool = False
    show: str | None = None

    def field(self) -> Any:
        """The dataclass field that carries this option."""
        return dataclasses.field(default=self.default, metadata={"option": self})

    def shown_default(self) -> str | None:
        """The default as ``--help`` shows it; None when there is nothing to show (off, absent, empty)."""
        if self.show is not None:
            return self.show
        if self.default is None or self.default is False or self.default == ():
            return None
        if isinstance(self.default, tuple):
            return ",".join(map(str, self.default))
        return format(self.default, "g") if isinstance(self.default, float) else str(self.default)


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """Declare a field: default, help text and (optionally) parse, check, choices, flag, metavar, repeat, show."""
    return Option(default, help, **kwargs).field()


def flag_of(name: str, opt: Option) -> str:
    return opt.flag or "--" + name.replace("_", "-")


def number(kind: type) -> Parse:
    word = "an integer" if kind is int else "a number"

    def parse(value: Any, flag: str) -> Any:
        if isinstance(value, str):
            try:
                return kind(value.strip())
            except ValueError:
                raise UsageError(f"{flag} takes {word}, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int if kind is int else (int, float)):
            raise UsageError(f"{flag} must be {word}, got {value!r}")
        return value

    return parse


def text(value: Any, flag: str) -> str:
    if not isinstance(value, str):
        raise UsageError(f"{flag} takes a string, got {value!r}")
    return value


def _switch(value: Any, flag: str) -> bool:
    if not isinstance(value, bool):
        raise UsageError(f"{flag} is on or off (True/False), got {value!r}")
    return value


_BY_ANNOTATION: dict[str, Parse] = {"int": number(int), "float": number(float), "str": text, "bool": _switch}


def at_least(low: float) -> Callable[[Any], str | None]:
    return lambda v: None if v is None or v >= low else f"must be >= {low:g}"


def above(low: float) -> Callable[[Any], str | None]:
    return lambda v: None if v is None or v > low else f"must be > {low:g}"


class Concern:
    """Base of the option groups: parses and checks every field after construction (frozen afterwards)."""

    title: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            opt = f.metadata.get("option")
            if opt is None:
                continue
            object.__setattr__(self, f.name, parse_value(f.name, opt, str(f.type), getattr(self, f.name)))
        self.validate()

    def validate(self) -> None:
        """Checks across fields (none by default)."""

    @classmethod
    def options(cls) -> dict[str, Option]:
        return {f.name: f.metadata["option"] for f in dataclasses.fields(cls) if "option" in f.metadata}

    def to_report(self) -> dict:
        """JSON-ready values."""
        return {name: _jsonable(getattr(self, name)) for name in self.options()}


def parse_value(name: str, opt: Option, annotation: str, value: Any) -> Any:
    """One field's typed value from CLI text or an API value, checked."""
    flag = flag_of(name, opt)
    if value is None and (opt.default is None or annotation.endswith("| None")):
        parsed = None
    else:
        parse = opt.parse or _BY_ANNOTATION.get(annotation.removesuffix(" | None"))
        if parse is None:
            raise TypeError(f"option {name}: no parser for {annotation}")
        parsed = parse(value, flag)
    if opt.choices is not None and parsed not in opt.choices:
        raise UsageError(f"{flag} must be one of {', '.join(opt.choices)}, got {parsed!r}")
    problem = opt.check(parsed) if opt.check is not None and parsed is not None else None
    if problem:
        raise UsageError(f"{flag} {problem}, got {parsed!r}")
    return parsed


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if dataclasses.is_dataclass(value):  # a parsed option value (a --loss term): as the user writes it
        return str(value)
    return f"<{type(value).__name__}>"  # e.g. labels given as an array
