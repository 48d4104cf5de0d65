"""The write protocol (bq_onnx/writing.py): files the user has are never touched except the output, outputs
appear only verified, interrupts and kills leave the previous output or none, and no temporary file behind."""

from __future__ import annotations

import hashlib
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from bq_onnx.cli import main
from tests.conftest import mixed_model

ARGS = ["--min-size", "64", "-q", "--bits", "6"]


def _tree(folder: Path) -> dict[str, str]:
    """Every entry of ``folder`` (recursively, hidden ones included) -> sha256 of its bytes (or 'dir'/'link')."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _run(argv, capsys) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    _, err = capsys.readouterr()
    return code, err


def _one_line(code, err, expected, fragment):
    assert code == expected, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err


@pytest.fixture
def ext_model(tmp_path):
    """A model whose external data file has the name an output's data file had before (``q.onnx.data``)."""
    folder = tmp_path / "in"
    folder.mkdir()
    onnx.save(mixed_model(), str(folder / "m.onnx"), save_as_external_data=True, location="q.onnx.data",
              size_threshold=0)
    return folder / "m.onnx"


def test_input_data_named_like_the_output_data_is_never_touched(ext_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BQ_ONNX_EXTERNAL_DATA_THRESHOLD", "2000")
    before = _tree(ext_model.parent)
    for out in (ext_model.parent / "q.onnx", tmp_path / "q.onnx"):  # the input's folder and another one
        code, err = _run(["optimize", ext_model, "-o", out, *ARGS], capsys)
        assert code == 0, err
        assert {k: v for k, v in _tree(ext_model.parent).items() if k in before} == before
    # naming the input's data file itself, even with --force: refused, nothing changes
    code, err = _run(["optimize", ext_model, "-o", ext_model.parent / "q.onnx.data", "--force", *ARGS], capsys)
    _one_line(code, err, 7, "input model's external data")
    assert {k: v for k, v in _tree(ext_model.parent).items() if k in before} == before


def test_failed_verification_keeps_the_previous_output_byte_identical(tmp_path, capsys, monkeypatch):
    from bq_onnx import verify

    src = tmp_path / "m.onnx"
    onnx.save(mixed_model(), str(src))
    out = tmp_path / "out" / "q.onnx"
    out.parent.mkdir()
    for threshold in ("0", "1000000000"):  # with and without external data
        monkeypatch.setenv("BQ_ONNX_EXTERNAL_DATA_THRESHOLD", threshold)
        assert _run(["optimize", src, "-o", out, "--force", *ARGS], capsys)[0] == 0
        before = _tree(out.parent)
        with monkeypatch.context() as m:
            m.setattr(verify, "compare", lambda ref, o, names, *rest: [verify.OutputCheck(names[0], 1.0, 1.0, False)])
            code, err = _run(["optimize", src, "-o", out, "--force", "--bits", "7", "--min-size", "64", "-q"],
                             capsys)
        _one_line(code, err, 6, "differs from the numpy-dequantized reference")
        assert _tree(out.parent) == before  # old output intact, no temporary file or folder


def test_unrelated_data_file_and_existing_outputs_need_force(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BQ_ONNX_EXTERNAL_DATA_THRESHOLD", "2000")
    src = tmp_path / "m.onnx"
    onnx.save(mixed_model(), str(src))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "q.onnx.data").write_bytes(b"someone else's file")
    assert _run(["optimize", src, "-o", out_dir / "q.onnx", *ARGS], capsys)[0] == 0
    assert (out_dir / "q.onnx.data").read_bytes() == b"someone else's file"
    before = _tree(out_dir)
    _one_line(*_run(["optimize", src, "-o", out_dir / "q.onnx", *ARGS], capsys), 7, "pass --force")
    assert _tree(out_dir) == before
    # --force replaces the output and the data file it owned, never the unrelated one
    assert _run(["optimize", src, "-o", out_dir / "q.onnx", "--force", "--min-size", "64", "-q", "--bits", "7"],
                capsys)[0] == 0
    after = _tree(out_dir)
    assert after["q.onnx.data"] == before["q.onnx.data"]
    assert after["q.onnx"] != before["q.onnx"] and len(after) == 3  # q.onnx, its new data, the unrelated file


def test_file_created_at_the_output_while_working_is_not_replaced(tmp_path, capsys, monkeypatch):
    from bq_onnx import api

    src = tmp_path / "m.onnx"
    onnx.save(mixed_model(), str(src))
    out = tmp_path / "q.onnx"
    real = api.OptimizeResult._verify

    def verify_then_someone_writes(self, staged, runs, random_inputs, shown):
        checks = real(self, staged, runs, random_inputs, shown)
        out.write_bytes(b"written by someone else meanwhile")
        return checks

    monkeypatch.setattr(api.OptimizeResult, "_verify", verify_then_someone_writes)
    code, err = _run(["optimize", src, "-o", out, *ARGS], capsys)
    _one_line(code, err, 7, "was created while bq-onnx worked")
    assert out.read_bytes() == b"written by someone else meanwhile"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "q.onnx"]


def test_symlinked_output_is_replaced_as_a_file_and_links_to_inputs_are_refused(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    onnx.save(mixed_model(), str(src))
    calib = tmp_path / "calib.npz"
    np.savez(calib, ids=np.zeros((4, 5), np.int64), img=np.ones((4, 3, 6, 6), np.float32))
    elsewhere = tmp_path / "elsewhere.onnx"
    elsewhere.write_bytes(b"not to be written through")
    link = tmp_path / "link.onnx"
    link.symlink_to(elsewhere)
    assert _run(["optimize", src, "-o", link, "--force", *ARGS], capsys)[0] == 0
    assert elsewhere.read_bytes() == b"not to be written through"
    assert not link.is_symlink() and onnx.load(str(link)).graph.node
    before = _tree(tmp_path)
    to_model = tmp_path / "to_model.onnx"
    to_model.symlink_to(src)
    hard = tmp_path / "hard.npz"
    os.link(calib, hard)
    for out, what in ((to_model, "input model"), (hard, "input file"), (tmp_path / "x" / ".." / "m.onnx", "input")):
        code, err = _run(["optimize", src, "--calib", calib, "--method", "activations", "-o", out, "--force",
                          *ARGS], capsys)
        _one_line(code, err, 7, what)
    # posterior -o naming the calibration file, also through a hard link
    for out in (calib, hard):
        code, err = _run(["posterior", src, "--calib", calib, "--method", "activations", "-o", out, "--force",
                          "--min-size", "64", "-q"], capsys)
        _one_line(code, err, 7, "calib")
    assert {k: v for k, v in _tree(tmp_path).items() if k in before} == before


def test_output_folder_gets_the_default_name(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    onnx.save(mixed_model(), str(src))
    out_dir = tmp_path / "newdir"
    _one_line(*_run(["optimize", src, "-o", f"{out_dir}/", *ARGS], capsys), 7, "output folder does not exist")
    out_dir.mkdir()
    for given in (f"{out_dir}/", out_dir):
        assert _run(["optimize", src, "-o", given, "--force", *ARGS], capsys)[0] == 0
        assert sorted(p.name for p in out_dir.iterdir()) == ["m.bq.onnx"]


def test_outputs_get_the_umask_mode(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    onnx.save(mixed_model(), str(src))
    old = os.umask(0o027)
    try:
        assert _run(["optimize", src, "-o", tmp_path / "q.onnx", *ARGS], capsys)[0] == 0
        assert _run(["posterior", src, "--calib", _calib(tmp_path), "--method", "activations", "-o",
                     tmp_path / "p.npz", "--min-size", "64", "-q"], capsys)[0] == 0
    finally:
        os.umask(old)
    for name in ("q.onnx", "p.npz"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640, name


def _calib(folder: Path) -> Path:
    path = folder / "calib.npz"
    if not path.exists():
        rng = np.random.default_rng(0)
        np.savez(path, ids=rng.integers(0, 10, (8, 5)).astype(np.int64),
                 img=rng.standard_normal((8, 3, 6, 6)).astype(np.float32))
    return path


def _spawn(argv, env_extra=None, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.Popen([sys.executable, "-m", "bq_onnx", *map(str, argv)], env=env, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, **kwargs)


def _no_temporaries(folder: Path) -> None:
    leftovers = [p.name for p in folder.iterdir() if p.name.startswith(".bq-tmp-")]
    assert not leftovers, leftovers


@pytest.mark.parametrize("stage", ["staged", "verifying", "data-renamed", "model-renamed"])
def test_kill_9_at_each_stage_leaves_the_old_output_or_the_new_one(tmp_path, stage):
    """SIGKILL at each step of a write (external data, so both renames happen): the folder holds the previous
    output exactly (or, after the commit, the new one complete), and the next run leaves no temporary file."""
    src = tmp_path / "m.onnx"
    onnx.save(mixed_model(), str(src))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "q.onnx"
    env = {"BQ_ONNX_EXTERNAL_DATA_THRESHOLD": "2000"}
    assert _spawn(["optimize", src, "-o", out, *ARGS], env).wait() == 0
    old = {k: v for k, v in _tree(out_dir).items() if not k.startswith(".bq-tmp-")}
    proc = _spawn(["optimize", src, "-o", out, "--force", "--min-size", "64", "-q", "--bits", "7"],
                  dict(env, BQ_ONNX_FAULT=stage))
    assert proc.wait() == -signal.SIGKILL
    now = {k: v for k, v in _tree(out_dir).items() if not k.startswith(".bq-tmp-")}
    if stage == "model-renamed":  # committed: the new model with its own data, which loads
        assert now["q.onnx"] != old["q.onnx"]
        onnx.checker.check_model(str(out))
        onnx.load(str(out))
    else:
        visible = {k: v for k, v in now.items() if k in old}
        assert visible == old  # the old model and its old data, unchanged
        onnx.load(str(out))  # and it still loads with its data
    # the next run removes what the killed one left (its staging folder, an unreferenced data file)
    assert _spawn(["optimize", src, "-o", out, "--force", *ARGS], env).wait() == 0
    _no_temporaries(out_dir)
    assert len(list(out_dir.iterdir())) == 2  # the model and the one data file it reads


@pytest.mark.parametrize("stage", ["data-renamed", "model-renamed"])
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_during_the_commit_waits_and_says_what_was_written(tmp_path, stage, sig):
    """A signal that arrives while the output is renamed into place is held until the commit is whole; the one
    line then names the output that was written instead of claiming nothing was."""
    src = tmp_path / "m.onnx"
    onnx.save(mixed_model(), str(src))
    out = tmp_path / "q.onnx"
    proc = _spawn(["optimize", src, "-o", out, *ARGS],
                  {"BQ_ONNX_EXTERNAL_DATA_THRESHOLD": "2000", "BQ_ONNX_FAULT": f"{stage}:{sig}"})
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == (143 if sig == "SIGTERM" else 130), err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "was written (verified) before it arrived" in lines[0] and str(out) in lines[0], err
    assert "nothing was written" not in err
    onnx.checker.check_model(str(out))
    assert onnx.load(str(out)).graph.node  # complete, with its data
    _no_temporaries(tmp_path)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_leaves_the_previous_output_and_no_temporary_files(tmp_path, sig):
    src = tmp_path / "m.onnx"
    onnx.save(mixed_model(), str(src))
    out = tmp_path / "out" / "q.onnx"
    out.parent.mkdir()
    assert _spawn(["optimize", src, "-o", out, *ARGS]).wait() == 0
    before = _tree(out.parent)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    # a posterior run (scratch folders in TMPDIR) interrupted while it works
    proc = _spawn(["optimize", src, "--calib", _calib(tmp_path), "-o", out, "--force", "--min-size", "64",
                   "--bits", "7", "-q", "--method", "hutchinson", "--probes", "64"], {"TMPDIR": str(scratch)})
    deadline = time.monotonic() + 120  # signal it once it works (its scratch folders exist), not after a fixed sleep
    while not any(scratch.iterdir()):
        assert proc.poll() is None, f"finished before it made any scratch folder: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "no scratch folder after 120 s"
        time.sleep(0.02)
    proc.send_signal(sig)
    code = proc.wait(timeout=60)
    err = proc.stderr.read()
    assert code == (130 if sig == signal.SIGINT else 143), err
    assert len(err.strip().splitlines()) == 1, err
    assert _tree(out.parent) == before
    # posterior and session scratch folders removed (OpenVINO's telemetry keeps its own `.ses` file there)
    assert [p.name for p in scratch.iterdir() if p.name != ".ses"] == []


def test_no_input_file_is_ever_an_output(tmp_path, capsys):
    """Every file optimize or posterior reads (posterior, verify inputs, labels, recipe, calibration) is refused
    as ``-o`` or ``--plot``, with ``--force``, by its name, a symbolic link or a hard link: exit 7 before any
    work, every file byte-identical (issue 21: ``posterior -o`` once replaced the user's calibration data)."""
    src = tmp_path / "m.onnx"
    onnx.save(mixed_model(), str(src))
    calib = _calib(tmp_path)
    post = tmp_path / "post.npz"
    assert _run(["posterior", src, "--calib", calib, "--method", "activations", "-o", post, "--min-size", "64",
                 "-q"], capsys)[0] == 0
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("bits = 6\n")
    labels = tmp_path / "labels.npy"
    np.save(labels, np.zeros(8, np.int64))
    os.link(post, tmp_path / "hard.npz")
    (tmp_path / "link.npz").symlink_to(post)
    before = _tree(tmp_path)
    force = ["--min-size", "64", "-q", "--force"]
    cases = [*(["optimize", src, "--posterior", post, "-o", out] for out in (post, tmp_path / "hard.npz",
                                                                            tmp_path / "link.npz")),
             ["optimize", src, "--verify-inputs", calib, "-o", calib],
             ["optimize", src, "--config", recipe, "-o", recipe],
             ["optimize", src, "--calib", calib, "--labels", labels, "--loss", "ce", "-o", labels],
             ["optimize", src, "--calib", calib, "--plot", calib, "-o", tmp_path / "q.onnx"],
             ["posterior", src, "--calib", calib, "--labels", labels, "--loss", "ce", "-o", labels],
             ["posterior", src, "--calib", calib, "-o", src]]
    for argv in cases:
        code, err = _run([*argv, *force], capsys)
        _one_line(code, err, 7, "output path is the input")
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("command", ["verify", "bench"])
def test_verify_and_bench_write_nothing(tmp_path, capsys, monkeypatch, command):
    """The commands without an output leave every file, and the folders they run in, as they were."""
    onnx.save(mixed_model(), str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.data")
    calib = _calib(tmp_path)
    assert _run(["optimize", tmp_path / "m.onnx", "-o", tmp_path / "q.onnx", *ARGS], capsys)[0] == 0
    monkeypatch.chdir(tmp_path)
    before = _tree(tmp_path)
    argv = (["verify", "m.onnx", "q.onnx", "--calib", calib, "--runtime", "onnxruntime",
             "--min-agreement", "0"] if command == "verify"
            else ["bench", "m.onnx", "q.onnx", "--iterations", "2", "--warmup", "1", "--calib", calib])
    code, err = _run([*argv, "-q"], capsys)
    assert code == 0, err
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("stage", ["staged", "model-renamed"])
def test_kill_9_while_writing_a_posterior_leaves_the_old_one_or_the_new_one(tmp_path, stage):
    """The single-file protocol (``posterior -o``, ``--plot``): SIGKILL after the temporary file is written or
    after its rename leaves the previous file exactly or the new one whole; the next run leaves no temporary."""
    src = tmp_path / "m.onnx"
    onnx.save(mixed_model(), str(src))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "p.npz"
    argv = ["posterior", src, "--calib", _calib(tmp_path), "-o", out, "--min-size", "64", "-q", "--force"]
    assert _spawn([*argv, "--method", "activations"]).wait() == 0
    old = _tree(out_dir)
    proc = _spawn([*argv, "--method", "laplace"], {"BQ_ONNX_FAULT": stage})
    assert proc.wait() == -signal.SIGKILL
    now = {k: v for k, v in _tree(out_dir).items() if not k.startswith(".bq-tmp-")}
    if stage == "staged":
        assert now == old
    else:
        assert now["p.npz"] != old["p.npz"] and set(now) == {"p.npz"}
    with np.load(out) as z:
        assert z.files  # a whole .npz either way
    assert _spawn([*argv, "--method", "activations"]).wait() == 0
    _no_temporaries(out_dir)
    assert _tree(out_dir) == old


def test_replacing_an_output_without_data_files_does_not_parse_it(tmp_path, capsys, monkeypatch):
    """Which old data files to remove is read from the previous output only where such files exist: replacing
    a model without external data does not parse it (a graph of 1e6 nodes: seconds and gigabytes)."""
    from bq_onnx import writing

    src = tmp_path / "m.onnx"
    onnx.save(mixed_model(), str(src))
    out = tmp_path / "out" / "q.onnx"
    out.parent.mkdir()
    assert _run(["optimize", src, "-o", out, *ARGS], capsys)[0] == 0
    read = []
    real = writing.external_locations
    monkeypatch.setattr(writing, "external_locations", lambda path: read.append(Path(path)) or real(path))
    assert _run(["optimize", src, "-o", out, "--force", *ARGS], capsys)[0] == 0
    assert out not in read and src in read  # the input model's data files are still looked up
    monkeypatch.setenv("BQ_ONNX_EXTERNAL_DATA_THRESHOLD", "2000")  # now with a data file: it is read and replaced
    assert _run(["optimize", src, "-o", out, "--force", *ARGS], capsys)[0] == 0
    assert _run(["optimize", src, "-o", out, "--force", "--bits", "7", "--min-size", "64", "-q"], capsys)[0] == 0
    assert out in read and len(list(out.parent.iterdir())) == 2  # the model and the one data file it reads
