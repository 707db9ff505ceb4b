"""Student against teacher: `encoder eval retrieval|classify --teacher BUNDLE`, and the agreement
figures that `encoder distill` records (run.json, then the bundle's manifest).

The student is a RUN run in PyTorch, the teacher a bundle run through ONNX Runtime (model/teacher.py);
both are scored by the same code as `encoder eval` alone.
"""

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.errors import ModelError
from model.evaluate import infer, rank_and_score, read_classification_rows, read_retrieval_data
from model.metrics import classification_metrics
from model.run import load_run
from model.teacher import Teacher, TeacherOutputs, open_cache
from model.tokenizer import load_tokenizer
from model.training import Schedule, StepResult, TrainLoop, batch_rows

AGREEMENT_ROWS = 2000  # pairwise similarities grow with the square of the rows


def agreement(
    student: np.ndarray,
    student_logits: np.ndarray | None,
    teacher: np.ndarray,
    teacher_logits: np.ndarray | None,
) -> dict[str, float]:
    """How alike the student's and the teacher's outputs on the same texts are.

    - cosine: mean cosine of each text's two vectors (only when the dimensions match);
    - similarity_correlation: Pearson correlation of the two models' pairwise cosine similarities
      over the texts, which needs no shared space (what retrieval depends on);
    - label_agreement: the share of texts whose top label is the same (both with classifiers)."""
    figures: dict[str, float] = {}
    student_unit = F.normalize(torch.from_numpy(np.asarray(student[:AGREEMENT_ROWS], np.float32)), dim=1)
    teacher_unit = F.normalize(torch.from_numpy(np.asarray(teacher[:AGREEMENT_ROWS], np.float32)), dim=1)
    if student_unit.shape[1] == teacher_unit.shape[1]:
        figures["cosine"] = round(float((student_unit * teacher_unit).sum(dim=1).mean()), 4)
    rows = student_unit.shape[0]
    if rows > 2:
        upper = torch.triu_indices(rows, rows, offset=1)
        pairs = torch.stack(
            [
                (student_unit @ student_unit.T)[upper[0], upper[1]],
                (teacher_unit @ teacher_unit.T)[upper[0], upper[1]],
            ]
        )
        figures["similarity_correlation"] = round(float(torch.corrcoef(pairs)[0, 1]), 4)
    if student_logits is not None and teacher_logits is not None:
        same = np.asarray(student_logits).argmax(axis=1) == np.asarray(teacher_logits).argmax(axis=1)
        figures["label_agreement"] = round(float(same.mean()), 4)
    return figures


def teacher_outputs_on(
    teacher: Teacher, texts: list[str], cache_dir: Path | None, desc: str
) -> TeacherOutputs:
    """The teacher's outputs on an evaluation set, through the distillation cache when one is given
    (a second comparison on the same set, with another student, then skips the teacher)."""
    if cache_dir is None:
        return teacher.outputs(texts, desc=desc)
    return open_cache(teacher.cached_outputs(texts, cache_dir).path)


def _ratio(student: float, teacher: float) -> float | None:
    return round(student / teacher, 4) if teacher else None


def compare_retrieval(
    model_path: Path,
    teacher_path: Path,
    queries_path: Path,
    corpus_path: Path,
    threads: int = 0,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """Recall@1/10 and MRR@10 of the student, of the teacher and, when the student's vectors live in
    the teacher's space (same dimension), of mixed search: teacher-embedded documents, student queries."""
    run = load_run(model_path)
    data = read_retrieval_data(queries_path, corpus_path)
    teacher = Teacher(teacher_path, threads=threads)
    tokenizer = load_tokenizer(run.tokenizer_path)
    module = run.inference_module()
    device = torch.device("cpu")
    student_queries = infer(module, tokenizer, data.query_texts, device, desc="student queries")[0]
    student_docs = infer(module, tokenizer, data.doc_texts, device, desc="student corpus")[0]
    teacher_queries = torch.from_numpy(
        np.asarray(teacher_outputs_on(teacher, data.query_texts, cache_dir, "teacher queries").embeddings)
    )
    teacher_docs = torch.from_numpy(
        np.asarray(teacher_outputs_on(teacher, data.doc_texts, cache_dir, "teacher corpus").embeddings)
    )
    student = rank_and_score(student_queries, student_docs, data.doc_ids, data.relevant)
    teacher_scores = rank_and_score(teacher_queries, teacher_docs, data.doc_ids, data.relevant)
    result: dict[str, Any] = {
        "student": student,
        "teacher": teacher_scores,
        "student_vs_teacher_recall@10": _ratio(student["recall@10"], teacher_scores["recall@10"]),
        "agreement": agreement(student_docs.numpy(), None, teacher_docs.numpy(), None),
    }
    if student_queries.shape[1] == teacher_docs.shape[1]:
        mixed = rank_and_score(student_queries, teacher_docs, data.doc_ids, data.relevant)
        result["mixed"] = mixed
        result["mixed_vs_teacher_recall@10"] = _ratio(mixed["recall@10"], teacher_scores["recall@10"])
    result.update(
        queries=len(data.query_texts),
        corpus=len(data.doc_ids),
        model=str(model_path),
        teacher_name=teacher.name,
    )
    return result


def linear_probe_accuracy(
    train_features: torch.Tensor,
    train_labels: list[str],
    test_features: torch.Tensor,
    test_labels: list[str],
    epochs: float = 5.0,
    seed: int = 0,
) -> float:
    """Accuracy of a linear classifier fitted on frozen features (standardised, as the classify
    fine-tune's head fit does) through the one TrainLoop."""
    labels = sorted(set(train_labels))
    index = {label: i for i, label in enumerate(labels)}
    targets = torch.tensor([index[label] for label in train_labels])
    mean, std = train_features.mean(dim=0), train_features.std(dim=0) + 1e-6
    features = (train_features - mean) / std
    torch.manual_seed(seed)
    head = nn.Linear(features.shape[1], len(labels))
    batch_size = 256

    def step_loss(step: int) -> StepResult:
        rows = batch_rows(len(features), batch_size, seed, step)
        return StepResult(F.cross_entropy(head(features[rows]), targets[rows]))

    steps = math.ceil(epochs * max(1, len(features) // batch_size))
    optimizer = torch.optim.AdamW(head.parameters(), lr=3e-3, weight_decay=0.01)
    TrainLoop(
        "probe", list(head.parameters()), optimizer, Schedule(3e-3, steps, None), None, progress=False
    ).run(step_loss)
    with torch.no_grad():
        predicted = head((test_features - mean) / std).argmax(dim=1).tolist()
    return classification_metrics(test_labels, [labels[i] for i in predicted])["accuracy"]


def compare_classify(
    model_path: Path,
    teacher_path: Path,
    data_path: Path,
    probe_train: Path | None = None,
    probe_limit: int | None = None,
    threads: int = 0,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """Accuracy of student and teacher on single-label data: of their classifiers, or, with
    `probe_train`, of a linear probe on each one's frozen embeddings (a teacher without a classifier)."""
    run = load_run(model_path)
    teacher = Teacher(teacher_path, threads=threads)
    texts, targets = read_classification_rows(data_path, multi_label=False)
    wanted = [target[0] for target in targets]
    tokenizer = load_tokenizer(run.tokenizer_path)
    module = run.inference_module()
    device = torch.device("cpu")
    student_embeddings, student_logits = infer(module, tokenizer, texts, device, desc="student")
    teacher_outputs = teacher_outputs_on(teacher, texts, cache_dir, "teacher")
    result: dict[str, Any] = {"examples": len(texts), "model": str(model_path), "teacher_name": teacher.name}
    if probe_train is not None:
        train_texts, train_targets = read_classification_rows(probe_train, multi_label=False)
        train_texts, train_labels = train_texts[:probe_limit], [t[0] for t in train_targets[:probe_limit]]
        unknown = sorted(set(wanted) - set(train_labels))
        if unknown:
            raise ModelError(f"{data_path}: label {unknown[0]!r} does not occur in {probe_train}")
        student_train = infer(module, tokenizer, train_texts, device, desc="student probe")[0]
        teacher_train = torch.from_numpy(
            np.asarray(teacher_outputs_on(teacher, train_texts, cache_dir, "teacher probe").embeddings)
        )
        student_accuracy = linear_probe_accuracy(student_train, train_labels, student_embeddings, wanted)
        teacher_accuracy = linear_probe_accuracy(
            teacher_train, train_labels, torch.from_numpy(np.asarray(teacher_outputs.embeddings)), wanted
        )
        result.update(probe_train_rows=len(train_texts), mode="linear_probe")
    else:
        if student_logits is None or teacher_outputs.logits is None or not run.labels or not teacher.labels:
            raise ModelError(
                f"{model_path} and {teacher_path} both need a classifier head (or give a probe training set)"
            )
        student_labels, teacher_labels = run.labels, teacher.labels
        student_accuracy = classification_metrics(
            wanted, [student_labels[i] for i in student_logits.argmax(dim=1).tolist()]
        )["accuracy"]
        teacher_accuracy = classification_metrics(
            wanted, [teacher_labels[i] for i in np.asarray(teacher_outputs.logits).argmax(axis=1).tolist()]
        )["accuracy"]
        result["mode"] = "classifier"
        same_order = student_labels == teacher_labels  # logits compare index by index
        result["agreement"] = agreement(
            student_embeddings.numpy(),
            student_logits.numpy() if same_order else None,
            teacher_outputs.embeddings,
            teacher_outputs.logits,
        )
    result.update(
        student_accuracy=round(student_accuracy, 4),
        teacher_accuracy=round(teacher_accuracy, 4),
        student_vs_teacher_accuracy=_ratio(student_accuracy, teacher_accuracy),
    )
    return result
