"""manifest.json of a model bundle, format_version 1.

<bundle>/
  manifest.json
  model.onnx           fp32, always present (ORT-fused unless exported with --no-fuse)
  model.fp16.onnx      optional (GPU)
  model.int8.onnx      optional (CPU, dynamic quantisation)
  tokenizer.json       Hugging Face `tokenizers` format
"""

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from bundle.contract import TOKENIZER_FILE

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
VARIANT_FILES: dict[str, str] = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}

VariantName = Literal["fp32", "fp16", "int8"]
Provider = Literal["cpu", "cuda"]


class BundleError(Exception):
    """A bundle that must not be served; the message is one line naming the file at fault."""


class _Strict(BaseModel):
    # Unknown keys are refused so that a typo in a hand-edited manifest is caught, not ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


class Architecture(_Strict):
    kind: str = "bert-prenorm-glu"
    num_layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    parameter_count: int = Field(gt=0)


class EmbeddingSpec(_Strict):
    dim: int = Field(gt=0)
    pooling: Literal["mean", "cls"] = "mean"
    # Whether the embeddings are meant for cosine similarity (a Normalize module, a contrastive run).
    # /embed normalises by default whatever this says, as TEI does; normalize=false gives the raw vector.
    normalize: bool = True
    matryoshka_dims: list[int] = Field(default_factory=list)  # dims trained to be truncated to
    # sentence-transformers' named prompts ({"query": "query: "}), prepended to a text before it is
    # tokenised when a request names one; the default one applies when a request names none.
    prompts: dict[str, str] = Field(default_factory=dict)
    default_prompt_name: str | None = None

    @model_validator(mode="after")
    def _default_prompt_known(self) -> "EmbeddingSpec":
        if self.default_prompt_name is not None and self.default_prompt_name not in self.prompts:
            raise ValueError(f"default_prompt_name {self.default_prompt_name!r} is not one of the prompts")
        return self


class ClassifierSpec(_Strict):
    labels: list[str] = Field(min_length=1)  # in logit order
    multi_label: bool = False


class RerankerSpec(_Strict):
    """A cross-encoder's relevance head: the graph's input is a (query, passage) pair encoded with the
    tokenizer's pair template, and its `logits` output holds one relevance logit per pair."""

    # How the service builds the input: the tokenizer's pair template (e.g. [CLS] q [SEP] p [SEP], token
    # types computed inside the graph where the model has them), cut from the passage's end only.
    pair_template: Literal["tokenizer"] = "tokenizer"
    # The score /rerank returns unless raw_scores: sigmoid(logit), as TEI and sentence-transformers do
    # for a one-label cross-encoder.
    activation: Literal["sigmoid"] = "sigmoid"


HeadName = Literal["embedding", "classifier", "reranker"]


class VariantSpec(_Strict):
    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    # Figures measured at export time against the PyTorch model (or fp32 ONNX for fp16/int8),
    # e.g. {"max_abs_diff": 2e-6, "min_cosine": 0.9991, "accuracy": 0.71}.
    parity: dict[str, float] = Field(default_factory=dict)
    fusions: list[str] = Field(default_factory=list)  # graph fusions applied to this file


class TeacherSpec(_Strict):
    """The bundle a distilled student learned from (`encoder distill`)."""

    name: str = Field(min_length=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")  # of the teacher's manifest.json, which pins its files
    # Whether the student's embedding lives in the teacher's space (`--match-teacher-space`): vectors
    # of the two may then be compared, e.g. teacher-embedded documents with student-embedded queries.
    shared_space: bool = False
    # Student vs teacher on held-out text, e.g. {"cosine": 0.93, "similarity_correlation": 0.88}.
    agreement: dict[str, float] = Field(default_factory=dict)


class Manifest(_Strict):
    format_version: Literal[1] = FORMAT_VERSION
    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    architecture: Architecture
    max_seq_len: int = Field(gt=0)
    embedding: EmbeddingSpec
    classifier: ClassifierSpec | None = None
    reranker: RerankerSpec | None = None
    # What the bundle serves, said once: "embedding" (/embed and the routes built on it), "classifier"
    # (/classify, /predict) or "reranker" (/rerank; its `embedding` output is only the pooled pair the
    # head reads). Filled in from the specs when a manifest (format 1, older) does not list it.
    heads: list[HeadName] = Field(default_factory=list)
    variants: dict[VariantName, VariantSpec]
    # The variant to serve on each provider when none is asked for; absent in bundles from before it
    # existed, for which the service falls back to int8 on CPU and fp16 on CUDA (preferred_variant).
    preferred: dict[Provider, VariantName] = Field(default_factory=dict)
    tokenizer_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    source: str = "encoder"  # "encoder" (trained here) or "import-hf:<dir name>"
    training: dict[str, Any] = Field(default_factory=dict)  # training/eval summary
    teacher: TeacherSpec | None = None  # set for a distilled student

    @model_validator(mode="before")
    @classmethod
    def _heads_from_specs(cls, values: Any) -> Any:
        if isinstance(values, dict) and not values.get("heads"):
            if values.get("reranker") is not None:
                values = {**values, "heads": ["reranker"]}
            elif values.get("classifier") is not None:
                values = {**values, "heads": ["embedding", "classifier"]}
            else:
                values = {**values, "heads": ["embedding"]}
        return values

    @model_validator(mode="after")
    def _heads_match_specs(self) -> "Manifest":
        if self.classifier is not None and self.reranker is not None:
            raise ValueError("a bundle has a classifier or a reranker, not both (they share the logits)")
        if ("classifier" in self.heads) != (self.classifier is not None):
            raise ValueError("heads lists classifier exactly when the manifest has a classifier")
        if ("reranker" in self.heads) != (self.reranker is not None):
            raise ValueError("heads lists reranker exactly when the manifest has a reranker")
        if "reranker" in self.heads and "embedding" in self.heads:
            raise ValueError("a reranker's pooled pair is not a text embedding: heads cannot list both")
        return self

    @model_validator(mode="after")
    def _fp32_present(self) -> "Manifest":
        if "fp32" not in self.variants:
            raise ValueError("variants must include fp32")
        for name, spec in self.variants.items():
            if spec.file != VARIANT_FILES[name]:
                raise ValueError(f"variant {name} must be stored as {VARIANT_FILES[name]}, not {spec.file}")
        for provider, name in self.preferred.items():
            if name not in self.variants:
                raise ValueError(f"preferred {provider} variant {name} is not one of the variants")
        return self

    def preferred_variant(self, provider: Provider) -> VariantName:
        """The variant to serve on `provider`: the manifest's choice, else int8 on CPU (dynamic
        quantisation is fast there) and fp16 on CUDA (tensor cores), else fp32."""
        if provider in self.preferred:
            return self.preferred[provider]
        fallback: VariantName = "int8" if provider == "cpu" else "fp16"
        return fallback if fallback in self.variants else "fp32"

    def write(self, bundle_dir: Path) -> Path:
        path = Path(bundle_dir) / MANIFEST_FILE
        path.write_text(self.model_dump_json(indent=2) + "\n")
        return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_manifest(bundle_dir: Path) -> Manifest:
    """Parse and validate manifest.json; raises BundleError with a one-line message."""
    path = Path(bundle_dir) / MANIFEST_FILE
    if not path.is_file():
        raise BundleError(f"{path}: manifest not found (is {bundle_dir} a model bundle?)")
    try:
        return Manifest.model_validate(json.loads(path.read_text()))
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "<root>"
        raise BundleError(f"{path}: schema mismatch at {where}: {first['msg']}") from None


def verify_bundle(bundle_dir: Path, variants: list[str] | None = None) -> Manifest:
    """Load the manifest and check the sha256 of the tokenizer and of the given (default: all) variants."""
    bundle_dir = Path(bundle_dir)
    manifest = load_manifest(bundle_dir)
    checks = [(bundle_dir / TOKENIZER_FILE, manifest.tokenizer_sha256)]
    for name, spec in manifest.variants.items():
        if variants is None or name in variants:
            checks.append((bundle_dir / spec.file, spec.sha256))
    for path, expected in checks:
        if not path.is_file():
            raise BundleError(f"{path}: missing file listed in the manifest")
        actual = file_sha256(path)
        if actual != expected:
            raise BundleError(f"{path}: sha256 mismatch (manifest {expected[:12]}…, file {actual[:12]}…)")
    return manifest
