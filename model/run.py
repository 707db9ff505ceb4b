"""RUN directories: the output of every training step and the only thing export/ reads from model/.

<run>/
  model.safetensors   weights: "encoder.*", plus "classifier.*" and optionally "lexical.*" (classify
                      runs), "reranker.*" (the cross-encoder's pair block, head and lexical sketch:
                      rerank runs), "sketch.*" (the lexical channel of embed runs and their children),
                      "projection.*" (a student distilled into its teacher's space) or the
                      pretraining heads (pretrain runs)
  config.json         EncoderConfig as a dict + architecture name and parameter count
  tokenizer.json      copied in, so a run is self-contained
  run.json            kind, labels, embedding spec, training/eval summary, parent run
  metrics.jsonl       optional training log
  checkpoint/         optional resume state (pretraining)
"""

import json
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from bundle.contract import TOKENIZER_FILE  # the same file, copied into the bundle at export
from model.config import EncoderConfig
from model.cross_encoder import CrossEncoder, cross_encoder_from_state
from model.encoder import Encoder, InferenceModule
from model.errors import ModelError
from model.lexical import LexicalHead, LexicalSketch

RUN_KINDS = ("pretrain", "embed", "classify", "rerank")
ARCHITECTURE = "bert-prenorm-glu"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"


def _prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}


@dataclass
class LoadedRun:
    path: Path
    config: EncoderConfig
    kind: str
    tokenizer_path: Path
    labels: list[str] | None
    multi_label: bool
    pooling: str
    normalize: bool
    matryoshka_dims: list[int]
    summary: dict[str, Any]
    sketch_dim: int  # 0: no lexical channel in the embedding
    sketch_weight: float
    parameter_count: int
    weights: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)

    def build_encoder(self) -> Encoder:
        encoder = Encoder(self.config)
        try:
            encoder.load_state_dict(_prefixed(self.weights, "encoder."))
        except RuntimeError as exc:
            raise ModelError(
                f"{self.path / WEIGHTS_FILE}: weights do not match config.json ({exc})"
            ) from None
        return encoder

    def build_classifier(self) -> nn.Linear | None:
        if not self.labels:
            return None
        classifier = nn.Linear(self.config.n_embd, len(self.labels))
        try:
            classifier.load_state_dict(_prefixed(self.weights, "classifier."))
        except RuntimeError as exc:
            raise ModelError(
                f"{self.path / WEIGHTS_FILE}: classifier does not match labels ({exc})"
            ) from None
        return classifier

    def build_reranker(self) -> CrossEncoder:
        """The cross-encoder of a rerank run: the encoder plus "reranker.*" (model/cross_encoder.py)."""
        try:
            return cross_encoder_from_state(self.build_encoder(), _prefixed(self.weights, "reranker."))
        except (RuntimeError, KeyError) as exc:
            raise ModelError(
                f"{self.path / WEIGHTS_FILE}: rerank head missing or malformed ({exc}); a rerank run "
                "from before the two-stage cross-encoder must be trained again"
            ) from None

    def build_lexical(self) -> LexicalHead | None:
        """The lexical (wide) head of a classify run that has one ("lexical.*" weights)."""
        idf = self.weights.get("lexical.idf")
        if not self.labels or ("lexical.table.weight" not in self.weights and idf is None):
            return None
        if idf is None:
            raise ModelError(
                f"{self.path / WEIGHTS_FILE}: lexical head from before the TF-IDF head; fit the heads "
                "again (encoder finetune classify --init RUN --freeze-encoder)"
            )
        lexical = LexicalHead(idf, self.config.vocab_size, len(self.labels))
        try:
            lexical.load_state_dict(_prefixed(self.weights, "lexical."))
        except RuntimeError as exc:
            message = f"{self.path / WEIGHTS_FILE}: lexical head does not match labels ({exc})"
            raise ModelError(message) from None
        return lexical

    def build_sketch(self) -> LexicalSketch | None:
        """The lexical channel of the embedding ("sketch.*" buffers), when the run has one."""
        if not self.sketch_dim:
            return None
        state = _prefixed(self.weights, "sketch.")
        if set(state) not in ({"idf", "table"}, {"idf", "column", "sign"}):  # the latter: before the table
            message = f"{self.path / WEIGHTS_FILE}: run.json has a lexical sketch but the weights lack it"
            raise ModelError(message)
        return LexicalSketch.from_state(state, self.sketch_dim)

    def build_projection(self) -> nn.Linear | None:
        """The projection into a teacher's space ("projection.*", `distill --match-teacher-space`)."""
        weight = self.weights.get("projection.weight")
        if weight is None:
            return None
        projection = nn.Linear(weight.shape[1], weight.shape[0])
        try:
            projection.load_state_dict(_prefixed(self.weights, "projection."))
        except RuntimeError as exc:
            raise ModelError(f"{self.path / WEIGHTS_FILE}: projection does not match ({exc})") from None
        return projection

    @property
    def embedding_dim(self) -> int:
        """The exported embedding's dimension: the teacher's with a projection, else n_embd + sketch."""
        weight = self.weights.get("projection.weight")
        return self.config.n_embd + self.sketch_dim if weight is None else int(weight.shape[0])

    def inference_module(self) -> InferenceModule | CrossEncoder:
        """eval-mode module: (input_ids, attention_mask) -> (embedding,) or (embedding, logits).

        embedding (B, embedding_dim) float32: the masked-mean pooled vector, not normalised, or with a
        lexical sketch the unit-norm hybrid of both; logits raw, only when the run has a classifier head
        (B, labels) or a rerank head (B, 1: the relevance of a pair-encoded input); finite for rows whose
        attention_mask is all zeros.
        """
        if self.kind == "rerank":
            return self.build_reranker().eval()
        return InferenceModule(
            self.build_encoder(),
            self.build_classifier(),
            self.build_lexical(),
            self.build_sketch(),
            self.sketch_weight,
            self.build_projection(),
        ).eval()


def parameter_count(weights: dict[str, torch.Tensor]) -> int:
    """Parameters of the inference graph (encoder + heads); the pretraining heads are not exported."""
    exported = ("encoder.", "classifier.", "reranker.", "lexical.", "projection.")
    return sum(t.numel() for k, t in weights.items() if k.startswith(exported))


def save_run(
    path: Path,
    *,
    kind: str,
    config: EncoderConfig,
    weights: dict[str, torch.Tensor],
    tokenizer_path: Path,
    labels: list[str] | None = None,
    multi_label: bool = False,
    normalize: bool = False,
    matryoshka_dims: list[int] | None = None,
    sketch: "LexicalSketch | None" = None,
    sketch_weight: float = 0.0,
    summary: dict[str, Any] | None = None,
    parent: Path | None = None,
) -> Path:
    """Write a RUN directory. `weights` uses the prefixes "encoder.", "classifier.", "reranker.", "lexical.",
    "mlm_"; the sketch, when given, is added as "sketch.*"."""
    if kind not in RUN_KINDS:
        raise ValueError(f"kind must be one of {RUN_KINDS}, not {kind!r}")
    path.mkdir(parents=True, exist_ok=True)
    if sketch is not None:
        weights = {**weights, **{f"sketch.{k}": v for k, v in sketch.state_dict().items()}}
    contiguous = {key: value.detach().cpu().contiguous() for key, value in weights.items()}
    # Write then rename: an interrupted save never leaves a truncated model.safetensors behind.
    partial = path / (WEIGHTS_FILE + ".partial")
    save_file(contiguous, str(partial), metadata={"format": "pt"})
    partial.replace(path / WEIGHTS_FILE)
    config_json = {
        **config.to_dict(),
        "architecture": ARCHITECTURE,
        "parameter_count": parameter_count(weights),
    }
    (path / CONFIG_FILE).write_text(json.dumps(config_json, indent=2) + "\n")
    if tokenizer_path.resolve() != (path / TOKENIZER_FILE).resolve():
        shutil.copyfile(tokenizer_path, path / TOKENIZER_FILE)
    run_json = {
        "kind": kind,
        "labels": labels,
        "multi_label": multi_label,
        "embedding": {
            "pooling": "mean",
            "normalize": normalize,
            "matryoshka_dims": matryoshka_dims or [],
            "lexical_sketch": {"dim": sketch.dim, "weight": sketch_weight} if sketch is not None else None,
        },
        "summary": summary or {},
        "parent": str(parent.resolve()) if parent else None,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
    }
    (path / RUN_FILE).write_text(json.dumps(run_json, indent=2) + "\n")
    return path


def record_evaluation(path: Path, name: str, figures: dict[str, Any]) -> None:
    """Add evaluation figures to a run's summary (as summary[name]), so that an export's manifest,
    which copies the summary, carries them next to the recipe."""
    run_json = _read_json(path / RUN_FILE)
    run_json["summary"] = {**(run_json.get("summary") or {}), name: figures}
    partial = path / (RUN_FILE + ".partial")
    partial.write_text(json.dumps(run_json, indent=2) + "\n")
    partial.replace(path / RUN_FILE)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelError(f"{path}: missing (is {path.parent} a run directory?)")
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return value


def load_run(path: str | Path) -> LoadedRun:
    """Read and check a RUN directory; any problem is a ModelError with a one-line message."""
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"{path}: run directory not found")
    run_json = _read_json(path / RUN_FILE)
    config_json = _read_json(path / CONFIG_FILE)
    try:
        config = EncoderConfig.from_dict(config_json)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"{path / CONFIG_FILE}: invalid encoder config ({exc})") from None
    kind = run_json.get("kind")
    if kind not in RUN_KINDS:
        raise ModelError(f"{path / RUN_FILE}: unknown run kind {kind!r}")
    tokenizer_path = path / TOKENIZER_FILE
    if not tokenizer_path.is_file():
        raise ModelError(f"{tokenizer_path}: missing (is {path} a run directory?)")
    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        raise ModelError(f"{weights_path}: missing (is {path} a run directory?)")
    try:
        weights = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{weights_path}: corrupt checkpoint ({str(exc).splitlines()[0]})") from None
    embedding = run_json.get("embedding") or {}
    sketch = embedding.get("lexical_sketch") or {}
    labels = run_json.get("labels")
    return LoadedRun(
        path=path,
        config=config,
        kind=kind,
        tokenizer_path=tokenizer_path,
        labels=list(labels) if labels else None,
        multi_label=bool(run_json.get("multi_label", False)),
        pooling=embedding.get("pooling", "mean"),
        normalize=bool(embedding.get("normalize", False)),
        matryoshka_dims=list(embedding.get("matryoshka_dims") or []),
        summary=run_json.get("summary") or {},
        sketch_dim=int(sketch.get("dim", 0)),
        sketch_weight=float(sketch.get("weight", 0.0)),
        parameter_count=parameter_count(weights),
        weights=weights,
    )
