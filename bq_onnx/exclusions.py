"""Which weights stay in float: ``--exclude`` and ``--only`` patterns (and ``--keep-fp``, weight-name globs),
the way the peers' users say it (NNCF's ignored scope, onnxruntime's nodes_to_exclude, Olive's op_types).

A pattern is ``KIND:GLOB``: ``weight:`` the weight's name, ``node:`` the name of a node that reads it, ``op:``
that node's op type, ``graph:`` the path of the subgraph it lives in (``If:cond/then_branch``; the main graph's is
empty). A pattern without one of these prefixes is a weight-name glob (so ``onnx::MatMul_12`` or ``*.bias`` work
as they are). Globs are :func:`fnmatch.fnmatchcase` (``*`` also crosses ``/``) and match the whole text. A
weight's readers are the nodes that read it and, through layout ops (Transpose, Slice ...), the nodes at the end
of the chain. ``--exclude`` keeps a weight in float when any pattern matches it; ``--only`` quantizes only the
weights some pattern matches. A pattern that matches no weight is a usage error: it is a typo, not a no-op.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Iterable

from bq_onnx.errors import UsageError

KINDS = ("weight", "node", "op", "graph")
HELP = ("KIND:GLOB with KIND weight (its name), node (the name of a node reading it), op (that node's op type) or "
        "graph (its subgraph's path, OP:NODE/ATTRIBUTE per level, e.g. 'Loop:*'); a GLOB without a KIND: prefix "
        "is a weight name; fnmatch globs over the whole text, * also crossing /")


@dataclasses.dataclass(frozen=True)
class Pattern:
    """One pattern as given (``text``), from which option (``flag``), split into what it matches and the glob."""

    flag: str
    text: str
    kind: str
    glob: str

    @classmethod
    def parse(cls, flag: str, text: str) -> Pattern:
        kind, sep, glob = text.partition(":")
        if sep and kind in KINDS:
            if not glob:
                raise UsageError(f"{flag} {text}: empty glob after '{kind}:'")
            return cls(flag, text, kind, glob)
        return cls(flag, text, "weight", text)


@dataclasses.dataclass(frozen=True)
class Target:
    """What a weight is matched on: its name, its subgraph's path, and (op type, node name) of each reader."""

    name: str
    scope: str
    readers: tuple[tuple[str, str], ...]


def matches(pattern: Pattern, target: Target) -> bool:
    glob = pattern.glob
    if pattern.kind == "weight":
        return fnmatch.fnmatchcase(target.name, glob)
    if pattern.kind == "graph":
        return fnmatch.fnmatchcase(target.scope, glob)
    index = 0 if pattern.kind == "op" else 1
    return any(fnmatch.fnmatchcase(reader[index], glob) for reader in target.readers)


class Exclusions:
    """The patterns of one run, what each matched, and the reason a weight stays in float."""

    def __init__(self, exclude: Iterable[str] = (), only: Iterable[str] = (), keep_fp: Iterable[str] = ()) -> None:
        self.exclude = [Pattern.parse("--exclude", p) for p in exclude]
        self.exclude += [Pattern("--keep-fp", p, "weight", p) for p in keep_fp]
        self.only = [Pattern.parse("--only", p) for p in only]
        self.hits: dict[Pattern, list[str]] = {p: [] for p in (*self.exclude, *self.only)}
        self.outside_only: list[str] = []

    def __bool__(self) -> bool:
        return bool(self.hits)

    def reason(self, target: Target) -> str:
        """Why the weight ``target`` stays in float ("" when it is quantized); every pattern's matches are kept."""
        why = ""
        for pattern in self.exclude:
            if matches(pattern, target):
                self.hits[pattern].append(target.name)
                if not why:
                    why = ("kept in floating point (--keep-fp)" if pattern.flag == "--keep-fp"
                           else f"excluded by {pattern.flag} {pattern.text}")
        if self.only:
            selected = [p for p in self.only if matches(p, target)]
            for pattern in selected:
                self.hits[pattern].append(target.name)
            if not selected:
                self.outside_only.append(target.name)
                why = why or "not matched by --only"
        return why

    def check(self) -> None:
        """A pattern that matched no weight is a one-line usage error (exit 2)."""
        for pattern, names in self.hits.items():
            if not names:
                raise UsageError(f"{pattern.flag} {pattern.text}: matches no weight (patterns are {HELP})")

    def report(self) -> list[dict]:
        """Per pattern, the weights it kept in float (``--exclude``/``--keep-fp``) or selected (``--only``); with
        ``--only``, one more entry for the weights no pattern selected."""
        rows = [{"option": p.flag, "pattern": p.text, "kind": p.kind,
                 ("selected" if p.flag == "--only" else "excluded"): list(names)} for p, names in self.hits.items()]
        if self.only:
            rows.append({"option": "--only", "pattern": None, "kind": None, "excluded": list(self.outside_only)})
        return rows

    def messages(self) -> list[str]:
        """The report as notes for the summary."""
        out = []
        for row in self.report():
            names = row.get("excluded", row.get("selected", []))
            shown = ", ".join(f"'{n}'" for n in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            if row["pattern"] is None:
                out.append(f"--only: {len(names)} weight(s) matched no pattern, kept in float"
                           + (f" ({shown})" if names else ""))
            elif "selected" in row:
                out.append(f"--only {row['pattern']} selected {len(names)} weight(s): {shown}")
            else:
                out.append(f"{row['option']} {row['pattern']} kept {len(names)} weight(s) in float: {shown}")
        return out
