"""`encoder eval classify|retrieval`, plus the batched inference that fine-tuning reuses."""

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from tqdm import tqdm

from model.data import DataError, TokenizedTexts, read_jsonl
from model.encoder import InferenceModule
from model.errors import ModelError
from model.metrics import classification_metrics, multilabel_metrics, retrieval_metrics
from model.run import load_run
from model.tokenizer import load_tokenizer

INFERENCE_BATCH = 128


@torch.no_grad()
def infer(
    module: InferenceModule, tokenizer: Tokenizer, texts: list[str], device: torch.device, desc: str = "embed"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """-> embeddings (N, C) and logits (N, L) or None, in input order. Batches are length-sorted."""
    was_training = module.training
    module.eval()
    tokenized = TokenizedTexts.encode(tokenizer, texts)
    embeddings: list[torch.Tensor | None] = [None] * len(texts)
    logits: list[torch.Tensor | None] = [None] * len(texts)
    batches = tokenized.length_sorted_batches(INFERENCE_BATCH)
    for indices in tqdm(batches, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=False):
        input_ids, attention_mask = tokenized.batch(indices)
        outputs = module(input_ids.to(device), attention_mask.to(device))
        for row, index in enumerate(indices):
            embeddings[index] = outputs[0][row].cpu()
            if len(outputs) > 1:
                logits[index] = outputs[1][row].cpu()
    module.train(was_training)
    stacked_logits = torch.stack(logits) if module.classifier is not None else None  # type: ignore[arg-type]
    return torch.stack(embeddings), stacked_logits  # type: ignore[arg-type]


def read_classification_rows(path: Path, multi_label: bool) -> tuple[list[str], list[list[str]]]:
    """-> texts, label lists (one label per row when single-label)."""
    rows = read_jsonl(path, ("text", "labels") if multi_label else ("text", "label"))
    texts, targets = [], []
    for number, row in enumerate(rows, start=1):
        value = row["labels"] if multi_label else [row["label"]]
        if not isinstance(row["text"], str) or not all(isinstance(label, str) for label in value):
            raise DataError(f"{path}: row {number}: text and labels must be strings")
        texts.append(row["text"])
        targets.append(list(value))
    return texts, targets


def score_classifier(
    module: InferenceModule,
    tokenizer: Tokenizer,
    labels: list[str],
    multi_label: bool,
    texts: list[str],
    targets: list[list[str]],
    device: torch.device,
) -> dict[str, float]:
    _, logits = infer(module, tokenizer, texts, device, desc="classify")
    assert logits is not None
    if multi_label:
        chosen = torch.sigmoid(logits) > 0.5
        predicted = [{labels[i] for i in row.nonzero().flatten().tolist()} for row in chosen]
        return multilabel_metrics([set(t) for t in targets], predicted)
    predicted_ids = logits.argmax(dim=1).tolist()
    return classification_metrics([t[0] for t in targets], [labels[i] for i in predicted_ids])


def evaluate_classifier(model_path: Path, data_path: Path) -> dict[str, Any]:
    run = load_run(model_path)
    if not run.labels:
        raise ModelError(f"{model_path}: a {run.kind} run has no classifier head (use a classify run)")
    texts, targets = read_classification_rows(data_path, run.multi_label)
    known = set(run.labels)
    for number, target in enumerate(targets, start=1):
        unknown = [label for label in target if label not in known]
        if unknown:
            raise ModelError(
                f"{data_path}: row {number}: label {unknown[0]!r} is not one of the model's labels"
            )
    tokenizer = load_tokenizer(run.tokenizer_path)
    device = torch.device("cpu")
    scores = score_classifier(
        run.inference_module(), tokenizer, run.labels, run.multi_label, texts, targets, device
    )
    return {**scores, "examples": len(texts), "model": str(model_path)}


@dataclass(frozen=True)
class RetrievalData:
    query_texts: list[str]
    relevant: list[set[str]]  # per query, the ids of its relevant documents
    doc_texts: list[str]
    doc_ids: list[str]


def read_retrieval_data(queries_path: Path, corpus_path: Path) -> RetrievalData:
    queries = read_jsonl(queries_path, ("id", "text", "relevant"))
    corpus = read_jsonl(corpus_path, ("id", "text"))
    doc_ids = [str(doc["id"]) for doc in corpus]
    known = set(doc_ids)
    for number, query in enumerate(queries, start=1):
        if not isinstance(query["relevant"], list) or not query["relevant"]:
            raise ModelError(f"{queries_path}: row {number}: 'relevant' must be a non-empty list of doc ids")
        missing = [doc for doc in query["relevant"] if str(doc) not in known]
        if missing:
            raise ModelError(
                f"{queries_path}: row {number}: relevant doc {missing[0]!r} is not in {corpus_path}"
            )
    return RetrievalData(
        [str(q["text"]) for q in queries],
        [{str(d) for d in q["relevant"]} for q in queries],
        [str(doc["text"]) for doc in corpus],
        doc_ids,
    )


def evaluate_retrieval(model_path: Path, queries_path: Path, corpus_path: Path) -> dict[str, Any]:
    run = load_run(model_path)
    data = read_retrieval_data(queries_path, corpus_path)
    tokenizer = load_tokenizer(run.tokenizer_path)
    module = run.inference_module()
    device = torch.device("cpu")
    scores = score_retrieval(
        module, tokenizer, data.query_texts, data.relevant, data.doc_texts, data.doc_ids, device
    )
    return {**scores, "queries": len(data.query_texts), "corpus": len(data.doc_ids), "model": str(model_path)}


def score_retrieval(
    module: InferenceModule,
    tokenizer: Tokenizer,
    query_texts: list[str],
    relevant: list[set[str]],
    doc_texts: list[str],
    doc_ids: list[str],
    device: torch.device,
) -> dict[str, float]:
    """Cosine similarity of the pooled embeddings; the top 10 documents of each query are scored."""
    query_embeddings = infer(module, tokenizer, query_texts, device, desc="queries")[0]
    doc_embeddings = infer(module, tokenizer, doc_texts, device, desc="corpus")[0]
    return rank_and_score(query_embeddings, doc_embeddings, doc_ids, relevant)


def rank_and_score(
    query_embeddings: torch.Tensor, doc_embeddings: torch.Tensor, doc_ids: list[str], relevant: list[set[str]]
) -> dict[str, float]:
    """Rank the documents of each query by cosine similarity and score the top 10."""
    query_embeddings = F.normalize(query_embeddings, dim=1)
    doc_embeddings = F.normalize(doc_embeddings, dim=1)
    ranked = []
    for start in range(0, len(query_embeddings), 1024):
        scores = query_embeddings[start : start + 1024] @ doc_embeddings.T  # (Q, D)
        top = scores.topk(min(10, len(doc_ids)), dim=1).indices
        ranked.extend([[doc_ids[i] for i in row] for row in top.tolist()])
    return retrieval_metrics(ranked, relevant)
