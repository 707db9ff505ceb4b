"""The parity gate: an exported graph is only written to a bundle when it reproduces the model.

fp32 ONNX is compared with PyTorch by max abs diff on real texts and on edge cases (batch of one,
a single token, the maximum length, heavy padding, an all-padding row), and its batched result
with the one-by-one result. int8 and fp16 are compared with fp32 ONNX by cosine, and every variant
by the task metric on the eval data when some is given. Every figure goes into the manifest.
"""

import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, Field
from tokenizers import Tokenizer

from bundle.contract import INPUT_NAMES, OUTPUT_NAMES, pad_to_longest
from export.errors import ExportError

# Real texts always used, so a bundle is checked even when no eval data is given.
BUILTIN_TEXTS = [
    "a domesticated carnivorous mammal that typically has a long snout",
    "dog",
    "the act of moving something from one place to another",
    "An expression of greeting: Hello, how are you today?",
    "a large body of salt water partly enclosed by land",
    "(physics) a unit of energy equal to 10^-7 joules",
    "someone who plays a musical instrument (as a profession)",
    "Café au lait — coffee with hot milk; naïve résumé façade",
    "the quality of being able to perform; a quality that permits or facilitates achievement",
    "run",
    "a tree of the genus Quercus; has lobed leaves and produces acorns as fruit",
    "to think about carefully; weigh",
]
MAX_TEXTS = 32  # rows in the real-text batch; more adds time, not coverage
EVAL_BATCH = 32

# (input_ids, attention_mask) -> [embedding] or [embedding, logits]
Runner = Callable[[np.ndarray, np.ndarray], list[np.ndarray]]


class ParityError(ExportError):
    """A gate failed: the message names the variant, the figure and the limit."""


class ParityThresholds(BaseModel):
    fp32_max_abs_diff: float = Field(1e-4, gt=0)  # ONNX fp32 vs PyTorch, and batched vs one-by-one
    int8_min_cosine: float = Field(0.97, gt=0, le=1)  # per text, to fp32 ONNX
    fp16_min_cosine: float = Field(0.999, gt=0, le=1)
    max_metric_drop: float = Field(0.02, ge=0)  # accuracy / recall@1 on the eval data, to PyTorch


@dataclass(frozen=True)
class Batch:
    name: str
    input_ids: np.ndarray  # (B, T) int64
    attention_mask: np.ndarray  # (B, T) int64


@dataclass(frozen=True)
class EvalData:
    """Classification rows (text, label) or retrieval pairs (query, positive), from a JSON-lines file."""

    texts: list[str]
    labels: list[str] | None = None
    positives: list[str] | None = None

    @classmethod
    def read(cls, path: Path, limit: int = 1000) -> "EvalData":
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()][:limit]
        if not rows:
            raise ExportError(f"{path}: no rows")
        if all("text" in row and "label" in row for row in rows):
            return cls(texts=[row["text"] for row in rows], labels=[str(row["label"]) for row in rows])
        if all("query" in row and "positive" in row for row in rows):
            return cls(texts=[row["query"] for row in rows], positives=[row["positive"] for row in rows])
        raise ExportError(f"{path}: eval rows must be {{text, label}} or {{query, positive}}")


def torch_runner(module: torch.nn.Module) -> Runner:
    def run(input_ids: np.ndarray, attention_mask: np.ndarray) -> list[np.ndarray]:
        with torch.inference_mode():
            outputs = module(torch.from_numpy(input_ids), torch.from_numpy(attention_mask))
        return [output.float().numpy() for output in outputs]

    return run


def ort_runner(path: Path) -> Runner:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(input_ids: np.ndarray, attention_mask: np.ndarray) -> list[np.ndarray]:
        return session.run(None, dict(zip(INPUT_NAMES, (input_ids, attention_mask), strict=True)))

    return run


def pad(sequences: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    # Padded positions are masked out, so the id they hold must not matter: 0 for every tokenizer.
    return pad_to_longest(sequences, pad_id=0)


def encode(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    return [encoding.ids for encoding in tokenizer.encode_batch(texts)]


def encode_pairs(tokenizer: Tokenizer, pairs: list[tuple[str, str]]) -> list[list[int]]:
    """(query, passage) pairs with the tokenizer's pair template, as a reranker's graph takes them."""
    return [encoding.ids for encoding in tokenizer.encode_batch(pairs)]


def build_batches(
    tokenizer: Tokenizer, texts: list[str], max_seq_len: int, pairs: bool = False
) -> list[Batch]:
    """The real-text batch first (for a reranker: pairs of consecutive texts), then the edge cases."""
    sequences = encode(tokenizer, texts[:MAX_TEXTS])
    if pairs:
        sequences = encode_pairs(tokenizer, list(itertools.pairwise(texts[: MAX_TEXTS + 1])))
    long_text = " ".join(texts * (1 + 4 * max_seq_len // max(1, len(" ".join(texts).split()))))
    longest = encode(tokenizer, [long_text])[0][:max_seq_len]
    if len(longest) != max_seq_len:
        raise ExportError(f"the tokenizer does not produce {max_seq_len} tokens from a long text")
    shortest = min(sequences, key=len)
    single_token = sequences[0][:1]
    return [
        Batch("texts", *pad(sequences)),
        Batch("batch_of_one", *pad(sequences[:1])),
        Batch("length_one", *pad([single_token])),
        Batch("max_length", *pad([longest])),
        Batch("heavy_padding", *pad([longest, shortest, single_token])),
        Batch("all_padding_row", *pad([sequences[0], []])),
    ]


def _fail(variant: str, figure: str, value: float, limit: float, relation: str) -> None:
    raise ParityError(f"{variant} parity gate failed: {figure} = {value:.3g}, must be {relation} {limit:g}")


def _check_finite(variant: str, batch: Batch, outputs: list[np.ndarray]) -> None:
    for name, output in zip(OUTPUT_NAMES, outputs, strict=False):
        if not np.isfinite(output).all():
            raise ParityError(f"{variant} parity gate failed: non-finite {name} on the {batch.name} case")


def row_cosines(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(reference, axis=1) * np.linalg.norm(candidate, axis=1)
    return (reference * candidate).sum(axis=1) / np.maximum(norms, 1e-12)


def _batched_vs_single(run: Runner, batch: Batch) -> tuple[float, float]:
    """Max abs diff and min cosine between each row of the batched embedding and the row run alone."""
    batched = run(batch.input_ids, batch.attention_mask)[0]
    worst_diff, worst_cosine = 0.0, 1.0
    for row in range(batch.input_ids.shape[0]):
        length = int(batch.attention_mask[row].sum())
        single = run(batch.input_ids[row : row + 1, :length], batch.attention_mask[row : row + 1, :length])[0]
        worst_diff = max(worst_diff, float(np.abs(batched[row] - single[0]).max()))
        worst_cosine = min(worst_cosine, float(row_cosines(batched[row : row + 1], single)[0]))
    return worst_diff, worst_cosine


def check_fp32(
    reference: Runner,
    candidate: Runner,
    batches: list[Batch],
    thresholds: ParityThresholds,
    variant: str = "fp32",
) -> dict[str, float]:
    """ONNX fp32 against PyTorch: max abs diff on every batch, and batched vs one-by-one."""
    figures: dict[str, float] = {}
    for batch in batches:
        expected = reference(batch.input_ids, batch.attention_mask)
        actual = candidate(batch.input_ids, batch.attention_mask)
        _check_finite(variant, batch, actual)
        diff = max(float(np.abs(e - a).max()) for e, a in zip(expected, actual, strict=True))
        figures[f"max_abs_diff_{batch.name}"] = diff
    figures["max_abs_diff"] = max(figures.values())
    figures["batched_vs_single_max_abs_diff"], _ = _batched_vs_single(candidate, batches[0])
    for figure in ("max_abs_diff", "batched_vs_single_max_abs_diff"):
        if figures[figure] > thresholds.fp32_max_abs_diff:
            _fail(variant, figure, figures[figure], thresholds.fp32_max_abs_diff, "<=")
    return figures


def check_reduced(
    variant: str, fp32: Runner, candidate: Runner, batches: list[Batch], min_cosine: float
) -> dict[str, float]:
    """int8/fp16 against fp32 ONNX: embedding cosine per non-empty row, logits top-1 agreement."""
    cosines: list[np.ndarray] = []
    agreements: list[np.ndarray] = []
    scores: list[np.ndarray] = []  # |logit difference| of a one-logit head (a reranker): argmax says nothing
    for batch in batches:
        expected = fp32(batch.input_ids, batch.attention_mask)
        actual = candidate(batch.input_ids, batch.attention_mask)
        _check_finite(variant, batch, actual)
        non_empty = batch.attention_mask.sum(axis=1) > 0
        cosines.append(row_cosines(expected[0], actual[0])[non_empty])
        if len(expected) == 2 and expected[1].shape[1] == 1:
            scores.append(np.abs(expected[1] - actual[1])[non_empty, 0])
        elif len(expected) == 2:
            agreements.append(expected[1].argmax(axis=1)[non_empty] == actual[1].argmax(axis=1)[non_empty])
    all_cosines = np.concatenate(cosines)
    figures = {"min_cosine": float(all_cosines.min()), "mean_cosine": float(all_cosines.mean())}
    if agreements:
        figures["top1_agreement"] = float(np.concatenate(agreements).mean())
    if scores:
        figures["score_max_abs_diff"] = float(np.concatenate(scores).max())
    # Dynamic int8 scales depend on the whole batch, so batching changes results a little; bound it.
    _, figures["batched_vs_single_min_cosine"] = _batched_vs_single(candidate, batches[0])
    for figure in ("min_cosine", "batched_vs_single_min_cosine"):
        if figures[figure] < min_cosine:
            _fail(variant, figure, figures[figure], min_cosine, ">=")
    return figures


def task_metric(
    run: Runner, tokenizer: Tokenizer, data: EvalData, labels: list[str] | None
) -> dict[str, float]:
    """Accuracy for classification data (needs a classifier head), recall@1 among the positives for pairs."""
    if data.labels is not None:
        if labels is None:
            return {}
        logits = _encode_all(run, tokenizer, data.texts, output=1)
        predicted = [labels[index] for index in logits.argmax(axis=1)]
        return {"accuracy": float(np.mean([p == t for p, t in zip(predicted, data.labels, strict=True)]))}
    assert data.positives is not None
    queries = _unit(_encode_all(run, tokenizer, data.texts, output=0))
    positives = _unit(_encode_all(run, tokenizer, data.positives, output=0))
    best = (queries @ positives.T).argmax(axis=1)
    return {"recall@1": float(np.mean(best == np.arange(len(best))))}


RERANK_QUERIES = 200  # eval queries of the rerank metric
RERANK_CANDIDATES = 10  # passages per query: its positive and the next rows' positives


def rerank_metric(run: Runner, tokenizer: Tokenizer, data: EvalData) -> dict[str, float]:
    """A reranker's task metric on (query, positive) rows: MRR@10 of each query's positive among its
    own and the following rows' positives, ranked by the graph's relevance logit. A row with the same
    query (or the same positive) counts as relevant too."""
    if data.positives is None:
        raise ExportError("a reranker's eval data must be {query, positive} rows")
    count = min(RERANK_QUERIES, len(data.texts))
    width = min(RERANK_CANDIDATES, count)
    reciprocal_rank = 0.0
    for query in range(count):
        candidates = [(query + offset) % count for offset in range(width)]
        pairs = [(data.texts[query], data.positives[candidate]) for candidate in candidates]
        logits = run(*pad(encode_pairs(tokenizer, pairs)))[1][:, 0]
        order = np.argsort(-logits, kind="stable")
        relevant = [
            data.texts[candidates[i]] == data.texts[query]
            or data.positives[candidates[i]] == data.positives[query]
            for i in order
        ]
        reciprocal_rank += 1 / (relevant.index(True) + 1)
    return {"mrr@10": reciprocal_rank / count}


def _encode_all(run: Runner, tokenizer: Tokenizer, texts: list[str], output: int) -> np.ndarray:
    rows = []
    for start in range(0, len(texts), EVAL_BATCH):
        input_ids, attention_mask = pad(encode(tokenizer, texts[start : start + EVAL_BATCH]))
        rows.append(run(input_ids, attention_mask)[output])
    return np.concatenate(rows)


def _unit(matrix: np.ndarray) -> np.ndarray:
    return matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)


def check_metric(
    variant: str, reference: dict[str, float], actual: dict[str, float], thresholds: ParityThresholds
) -> dict[str, float]:
    figures: dict[str, float] = {}
    for name, value in actual.items():
        figures[name] = value
        figures[f"{name}_drop"] = reference[name] - value
        if figures[f"{name}_drop"] > thresholds.max_metric_drop:
            _fail(
                variant, f"{name} drop vs PyTorch", figures[f"{name}_drop"], thresholds.max_metric_drop, "<="
            )
    return figures
