"""Build a model bundle (docs/architecture.md, "Bundle format") from an exportable source, all gates
first, then one rename.

The bundle is assembled in a temporary directory next to the destination; only when every variant
has passed its parity gate are the manifest and checksums written and the directory renamed into
place, so a bundle that is not faithful to the model is never visible at the destination.
"""

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from bundle.contract import TOKENIZER_FILE
from bundle.manifest import (
    VARIANT_FILES,
    Architecture,
    ClassifierSpec,
    EmbeddingSpec,
    Manifest,
    Provider,
    RerankerSpec,
    TeacherSpec,
    VariantName,
    VariantSpec,
    file_sha256,
    verify_bundle,
)
from export import parity
from export.errors import ExportError
from export.onnx_graph import check_interface, export_onnx
from export.variants import convert_fp16, fuse_for_ort, quantize_int8

Progress = Callable[[str], None]


@dataclass
class ExportSource:
    """What the writer needs, whether the model was trained here (a RUN) or imported (import-hf)."""

    module: torch.nn.Module  # forward(input_ids, attention_mask) -> (embedding,) or (embedding, logits)
    tokenizer: Tokenizer  # truncation at max_seq_len, no padding: the service pads itself
    name: str
    max_seq_len: int
    architecture: Architecture
    embedding: EmbeddingSpec
    classifier: ClassifierSpec | None = None
    reranker: RerankerSpec | None = None  # a cross-encoder: pair-encoded inputs, one logit per pair
    source: str = "encoder"
    training: dict[str, Any] = field(default_factory=dict)
    teacher: TeacherSpec | None = None


@dataclass
class ExportOptions:
    variants: list[str] = field(default_factory=lambda: ["fp32", "int8"])
    version: str = "1"
    # Store ONNX Runtime's fused graph as model.onnx and quantise it for int8 (still gated against
    # PyTorch); off, the plain exported graph is stored and quantised.
    fuse: bool = True
    eval_data: parity.EvalData | None = None
    thresholds: parity.ParityThresholds = field(default_factory=parity.ParityThresholds)
    force: bool = False  # replace an existing bundle at the destination


def write_bundle(source: ExportSource, out: Path, options: ExportOptions, progress: Progress) -> Manifest:
    out = Path(out)
    unknown = sorted(set(options.variants) - set(VARIANT_FILES))
    if unknown or "fp32" not in options.variants:
        raise ExportError(
            f"variants must include fp32 and only {sorted(VARIANT_FILES)}; got {options.variants}"
        )
    if out.exists() and not options.force:
        raise ExportError(f"{out} already exists (the force option replaces it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    # mkdtemp makes the directory private (0700); the service may run as another user (containers).
    staging.chmod(0o755)
    try:
        manifest = _build(source, staging, options, progress)
        verify_bundle(staging)
        _move_into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _build(source: ExportSource, staging: Path, options: ExportOptions, progress: Progress) -> Manifest:
    module = source.module.eval()
    source.tokenizer.save(str(staging / TOKENIZER_FILE))
    texts = parity.BUILTIN_TEXTS + (options.eval_data.texts[: parity.MAX_TEXTS] if options.eval_data else [])
    pairs = source.reranker is not None
    batches = parity.build_batches(source.tokenizer, texts, source.max_seq_len, pairs)
    reference = parity.torch_runner(module)
    labels = source.classifier.labels if source.classifier else None

    def task_metric(runner: parity.Runner) -> dict[str, float]:
        assert options.eval_data is not None
        if pairs:
            return parity.rerank_metric(runner, source.tokenizer, options.eval_data)
        return parity.task_metric(runner, source.tokenizer, options.eval_data, labels)

    progress("export fp32 graph")
    fp32_path = staging / VARIANT_FILES["fp32"]
    output_names = export_onnx(module, fp32_path, source.max_seq_len)
    progress("parity fp32 vs PyTorch")
    fp32_parity = parity.check_fp32(reference, parity.ort_runner(fp32_path), batches, options.thresholds)
    fusions: list[str] = []
    # The fp32 graph that will be stored: the fused one unless fusion is off.
    fused_path = staging / "fused.onnx"
    stored_fp32 = fused_path if options.fuse else fp32_path
    if options.fuse:
        progress("fuse fp32 graph for ONNX Runtime")
        fusions = fuse_for_ort(
            fp32_path, fused_path, source.architecture.num_heads, source.architecture.hidden_size
        )
        check_interface(fused_path, output_names)
        fp32_parity = parity.check_fp32(
            reference, parity.ort_runner(stored_fp32), batches, options.thresholds, variant="fp32 (fused)"
        )
    parities: dict[str, dict[str, float]] = {"fp32": fp32_parity}

    reference_metric: dict[str, float] = {}
    if options.eval_data is not None:
        progress("task metric on the eval data")
        reference_metric = task_metric(reference)
        fp32_metric = task_metric(parity.ort_runner(stored_fp32))
        parities["fp32"] |= {f"torch_{name}": value for name, value in reference_metric.items()}
        parities["fp32"] |= parity.check_metric("fp32", reference_metric, fp32_metric, options.thresholds)

    # int8 comes from the fused graph when there is one: quantising the plain graph leaves ONNX
    # Runtime unable to fuse the attention and layer norms around the quantised products (about half
    # the speed of the reference recipe on all-MiniLM-L6-v2, BENCHMARKS.md). fp16, for GPUs, comes
    # from the plain graph, which converts without contrib ops in the way.
    reduced = {
        "int8": (partial(quantize_int8, fused=options.fuse), stored_fp32, options.thresholds.int8_min_cosine),
        "fp16": (convert_fp16, fp32_path, options.thresholds.fp16_min_cosine),
    }
    fp32_runner = parity.ort_runner(stored_fp32)
    for variant, (convert, source_path, min_cosine) in reduced.items():
        if variant not in options.variants:
            continue
        progress(f"{variant} graph and parity vs fp32")
        path = staging / VARIANT_FILES[variant]
        convert(source_path, path)
        check_interface(path, output_names)
        runner = parity.ort_runner(path)
        parities[variant] = parity.check_reduced(variant, fp32_runner, runner, batches, min_cosine)
        if options.eval_data is not None:
            metric = task_metric(runner)
            parities[variant] |= parity.check_metric(variant, reference_metric, metric, options.thresholds)

    if options.fuse:
        # The fused graph becomes model.onnx only once every variant is built from its source.
        fused_path.replace(fp32_path)

    variants = {
        name: VariantSpec(
            file=VARIANT_FILES[name],
            sha256=file_sha256(staging / VARIANT_FILES[name]),
            parity=parities[name],
            fusions=fusions if name == "fp32" else [],
        )
        for name in options.variants
    }
    manifest = Manifest(
        name=source.name,
        version=options.version,
        architecture=source.architecture,
        max_seq_len=source.max_seq_len,
        embedding=source.embedding,
        classifier=source.classifier,
        reranker=source.reranker,
        variants=variants,
        preferred=preferred_variants(options.variants),
        tokenizer_sha256=file_sha256(staging / TOKENIZER_FILE),
        source=source.source,
        training=source.training,
        teacher=source.teacher,
    )
    manifest.write(staging)
    return manifest


def preferred_variants(variants: list[str]) -> dict[Provider, VariantName]:
    """int8 on CPU (dynamic quantisation of the fused graph: fastest there, BENCHMARKS.md), fp16 on
    CUDA (tensor cores; int8's integer kernels have no CUDA version); fp32 where those are absent."""
    return {
        "cpu": "int8" if "int8" in variants else "fp32",
        "cuda": "fp16" if "fp16" in variants else "fp32",
    }


def _move_into_place(staging: Path, out: Path) -> None:
    if not out.exists():
        staging.rename(out)
        return
    # Replacing: move the old bundle aside first, so a failure leaves one complete bundle at `out`.
    retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
    retired.rmdir()
    out.rename(retired)
    staging.rename(out)
    shutil.rmtree(retired, ignore_errors=True)
