"""Deterministic real evaluation data that ships inside installed packages (no download at run time).

* ``sentences()``: real English sentences taken from the docstrings of a fixed list of Python standard-library
  modules (the text is fixed by the Python version, recorded with the data), filtered to prose: 8..30 words,
  a capital first letter, a final full stop, letters and ordinary punctuation only. Order is by SHA-256 of the
  sentence, so the calibration and evaluation slices are a deterministic pseudo-random split.
* ``photos()``: real photographs from ``skimage.data`` and ``sklearn.datasets.load_sample_images``, split by
  source photograph (never by crop) into calibration and evaluation images, cut into deterministic crops with
  random scale, position and horizontal flip (seeded ``numpy.random.default_rng``), resized to ``size``.

Only numpy, scikit-image and scikit-learn are needed (the build scripts save the results as ``.npz``).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import re
import sys
import warnings

import numpy as np

#: Standard-library modules whose docstrings supply the sentences (fixed list: the set must not depend on
#: which third-party packages happen to be installed).
DOC_MODULES = (
    "argparse", "asyncio", "base64", "bisect", "calendar", "codecs", "collections", "concurrent.futures",
    "configparser", "contextlib", "copy", "csv", "datetime", "decimal", "difflib", "email.message", "enum",
    "fractions", "ftplib", "functools", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "http.client",
    "http.server", "imaplib", "inspect", "io", "ipaddress", "itertools", "json", "locale", "logging", "lzma",
    "mailbox", "mimetypes", "multiprocessing", "numbers", "os", "pathlib", "pickle", "platform", "plistlib",
    "poplib", "pprint", "queue", "random", "re", "sched", "secrets", "selectors", "shutil", "signal", "smtplib",
    "socket", "sqlite3", "ssl", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "traceback", "typing", "unittest", "urllib.parse", "urllib.request", "uuid", "warnings",
    "weakref", "xml.dom.minidom", "zipfile",
)  # fmt: skip

_PROSE = re.compile(r"^[A-Z][A-Za-z ,;:'()-]*[a-z]\.$")
_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _docstrings(module) -> list[str]:
    """Docstrings of a module, its public classes and functions, and their public methods, in a stable order."""
    out = [inspect.getdoc(module) or ""]
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj):
            out.append(inspect.getdoc(obj) or "")
        if inspect.isclass(obj):
            for mname, member in sorted(vars(obj).items()):
                if not mname.startswith("_") and inspect.isfunction(member):
                    out.append(inspect.getdoc(member) or "")
    return out


def _is_prose(sentence: str) -> bool:
    words = sentence.split()
    if not 8 <= len(words) <= 30 or not _PROSE.match(sentence):
        return False
    # identifiers (snake_case, CamelCase inside a word, dotted names) mark code, not prose
    return not any("_" in w or re.search(r"[a-z][A-Z]", w) for w in words) and sentence.count("(") < 2


def sentences() -> list[str]:
    """All distinct prose sentences from ``DOC_MODULES``, ordered by SHA-256 (deterministic pseudo-shuffle)."""
    seen: dict[str, str] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in DOC_MODULES:
            module = importlib.import_module(name)
            for doc in _docstrings(module):
                for paragraph in re.split(r"\n\s*\n", doc):
                    text = " ".join(paragraph.split())
                    for s in _SPLIT.split(text):
                        if _is_prose(s):
                            seen.setdefault(s.lower(), s)
    return sorted(seen.values(), key=lambda s: hashlib.sha256(s.encode()).hexdigest())


def python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"


#: Calibration photographs; every other photograph is for evaluation (split by source, never by crop).
CALIB_PHOTOS = ("sklearn:china.jpg", "sklearn:flower.jpg", "skimage:grass", "skimage:moon")
EVAL_PHOTOS = (
    "skimage:astronaut", "skimage:chelsea", "skimage:coffee", "skimage:rocket", "skimage:hubble_deep_field",
    "skimage:immunohistochemistry", "skimage:retina", "skimage:camera", "skimage:coins", "skimage:clock",
    "skimage:gravel", "skimage:brick",
)  # fmt: skip


def _load_photo(key: str) -> np.ndarray:
    """One photograph as uint8 RGB (grayscale photographs are replicated to three channels)."""
    source, name = key.split(":")
    if source == "sklearn":
        from sklearn.datasets import load_sample_images

        bunch = load_sample_images()
        image = bunch.images[[f.rsplit("/", 1)[-1] for f in bunch.filenames].index(name)]
    else:
        import skimage.data

        image = getattr(skimage.data, name)()
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return image[..., :3].astype(np.uint8)


def photos(keys: tuple[str, ...], per_photo: int, size: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """``per_photo`` crops of each photograph as float32 RGB in [0, 1], ``(N, size, size, 3)``, and their names.

    A crop is a square of side ``U(0.35, 1.0)`` times the short side at a uniform position, flipped
    horizontally with probability 1/2, resized with anti-aliasing.
    """
    from skimage.transform import resize

    rng = np.random.default_rng(seed)
    crops, names = [], []
    for key in keys:
        image = _load_photo(key).astype(np.float32) / 255.0
        h, w = image.shape[:2]
        for k in range(per_photo):
            side = int(round(min(h, w) * rng.uniform(0.35, 1.0)))
            y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            crop = image[y : y + side, x : x + side]
            flip = bool(rng.random() < 0.5)
            if flip:
                crop = crop[:, ::-1]
            crops.append(resize(crop, (size, size), anti_aliasing=True).astype(np.float32))
            names.append(f"{key}#{k}{'f' if flip else ''}")
    return np.stack(crops), names
