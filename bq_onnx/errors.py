"""Errors a user can act on, each with its documented exit code.

The CLI prints ``error: <message>`` on one line and exits with ``exit_code``; anything that is not a
:class:`BqError` is a bug (exit 1, traceback only with ``--debug``).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_MODEL = 3
EXIT_UNSUPPORTED = 4
EXIT_DATA = 5
EXIT_VERIFY = 6
EXIT_OUTPUT = 7
EXIT_INPUTS = 8
EXIT_QUALITY = 9
EXIT_LIMIT = 10

EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_INTERNAL: "internal error (a bug: please report it with --debug output)",
    EXIT_USAGE: "bad command-line usage or option value",
    EXIT_MODEL: "the model cannot be read: not ONNX, truncated, invalid graph, unsafe or missing external data",
    EXIT_UNSUPPORTED: "nothing to do or not supported: no quantizable weights, unsupported op or setting",
    EXIT_DATA: "bad numbers: NaN/Inf weights, bad calibration or sample data",
    EXIT_VERIFY: "verification failed: the written model does not match the reference",
    EXIT_OUTPUT: "the output cannot be written: same as the input, exists without --force, not writable",
    EXIT_INPUTS: "no valid verification inputs: the FP32 model itself fails on random inputs (give --calib or "
                 "--verify-inputs)",
    EXIT_QUALITY: "quality target missed: the held-out loss, cosine or agreement is past --max-loss, --min-cosine "
                  "or --min-agreement (nothing written)",
    EXIT_LIMIT: "run limit hit: a session of the model ran past --run-timeout or past --max-memory (nothing "
                "written)",
}


class BqError(Exception):
    """Base class: a problem with the user's input, reported on one line."""

    exit_code = EXIT_INTERNAL


class UsageError(BqError):
    exit_code = EXIT_USAGE


class ModelError(BqError):
    exit_code = EXIT_MODEL


class UnsupportedError(BqError):
    exit_code = EXIT_UNSUPPORTED


class DataError(BqError):
    exit_code = EXIT_DATA


class VerificationError(BqError):
    exit_code = EXIT_VERIFY


class OutputError(BqError):
    exit_code = EXIT_OUTPUT


class InputsError(BqError):
    """The inputs made up for a check are invalid for the model itself: real ones are needed."""

    exit_code = EXIT_INPUTS


class QualityError(BqError):
    """The optimized model measures worse on held-out data than a quality target the user set."""

    exit_code = EXIT_QUALITY


class LimitError(BqError):
    """A run of an untrusted graph passed the wall-time or memory limit (bq_onnx/limits.py)."""

    exit_code = EXIT_LIMIT


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that clean-up runs (exit 143)."""


def exit_code_table() -> str:
    """The exit codes as help text."""
    return "\n".join(f"  {code}  {text}" for code, text in EXIT_CODES.items())
