"""The redesign of issue 13 keeps outputs byte-identical: each golden command must write the recorded bytes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests import golden

RECORDED = json.loads(golden.HASHES.read_text())
SAME_LIBRARIES = RECORDED["versions"] == golden.versions()


@pytest.mark.skipif(not SAME_LIBRARIES, reason="golden hashes were recorded with other numeric library versions")
@pytest.mark.parametrize("name,argv", golden.COMMANDS, ids=[name for name, _ in golden.COMMANDS])
def test_golden_output_unchanged(name: str, argv: tuple[str, ...], tmp_path: Path) -> None:
    assert golden.run_command(name, argv, tmp_path) == RECORDED["hashes"][name]


def test_golden_set_is_complete() -> None:
    assert set(RECORDED["hashes"]) == {name for name, _ in golden.COMMANDS}
