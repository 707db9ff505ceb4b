"""`encoder distill`: train a small student encoder to reproduce a teacher bundle's outputs on a corpus.

The teacher (any bundle, e.g. one made by `encoder import-hf`) runs once over the corpus through ONNX
Runtime and its outputs are cached on disk (model/teacher.py). The student (a RUN, or a random
`preset` with a tokenizer) then trains through the one TrainLoop of model/training.py, under torchrun
too, on the loss of DistillTask:

- embedding, direct: cosine distance or MSE between the student's vector, projected to the teacher's
  dimension when the two differ, and the teacher's (by default only with match_teacher_space);
- embedding, relational: KL divergence between the teacher's and the student's in-batch similarity
  distributions (each row's softmax over its cosine similarities to the other rows), which needs no
  shared space and teaches the neighbourhood structure that retrieval uses;
- classification, when the teacher has a classifier: the teacher's logits as soft targets at a
  temperature (Hinton et al. 2015), mixed with cross-entropy on the corpus's own labels where rows
  have them.

The projection is kept in the exported graph only with `match_teacher_space`: the student's embedding
then lives in the teacher's space, so an index built with the teacher keeps working.
"""

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from bundle.manifest import MANIFEST_FILE, file_sha256, verify_bundle
from model.compare import agreement
from model.config import preset_config
from model.data import DataError, TokenizedTexts, read_jsonl, read_text_lines
from model.encoder import Encoder, InferenceModule, mean_pool, optimizer_groups
from model.errors import ModelError
from model.evaluate import infer
from model.run import METRICS_FILE, load_run, save_run
from model.teacher import Teacher, TeacherOutputs, cache_path, default_cache_dir, open_cache
from model.tokenizer import load_tokenizer
from model.training import (
    Distributed,
    MetricsLog,
    Schedule,
    StepResult,
    TrainLoop,
    batch_rows,
    held_out_split,
    pick_device,
    set_threads,
)

DirectLoss = Literal["cosine", "mse", "none"]


@dataclass
class DistillOptions:
    teacher: Path
    corpus: Path
    out: Path
    init: Path | None = None  # a RUN to start from; None: random init of `preset` with `tokenizer`
    preset: str = "mini"
    tokenizer: Path | None = None
    match_teacher_space: bool = False  # keep the projection to the teacher's dim in the exported graph
    # None: cosine with match_teacher_space (the projection is then the served embedding), else none.
    # In the student's own space the direct term only trains a projection that is thrown away, and on
    # WordNet it pulled the student to the teacher's mean vector (Recall@10 0.31 -> 0.03 in 600 steps
    # from the contrastive RUN; the relational term alone: 0.26; BENCHMARKS.md, "Distillation").
    direct_loss: DirectLoss | None = None
    relational_weight: float = 1.0
    relational_temperature: float = 0.05
    temperature: float = 2.0  # softens the teacher's logits (classification)
    hard_weight: float = 0.5  # share of the hard-label cross-entropy where rows carry a label
    epochs: float = 1.0
    holdout: int = 1000  # corpus rows kept out of training to measure the agreement (at most 10%)
    cache_dir: Path | None = None  # default: $XDG_CACHE_HOME/encoder/teacher
    teacher_variant: str = "fp32"
    teacher_provider: str = "auto"
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    budget_minutes: float | None = None  # the training's; the (cached) teacher pass is not counted
    max_steps: int | None = None
    batch_size: int = 64
    lr: float = 5e-4
    limit: int | None = None
    progress: bool = True


@dataclass(frozen=True)
class Corpus:
    texts: list[str]
    labels: list[str | None]  # a row's own label (JSON lines {"text", "label"}), if any


def read_corpus(path: Path, limit: int | None) -> Corpus:
    """Plain text (one text per line) or JSON lines {"text"[, "label"]}."""
    if path.suffix in (".jsonl", ".json"):
        rows = read_jsonl(path, ("text",))[:limit]
        texts, labels = [], []
        for number, row in enumerate(rows, start=1):
            label = row.get("label")
            if not isinstance(row["text"], str) or not (label is None or isinstance(label, str)):
                raise DataError(f"{path}: row {number}: text and label must be strings")
            texts.append(row["text"])
            labels.append(label)
        return Corpus(texts, labels)
    texts = read_text_lines([path])[:limit]
    return Corpus(texts, [None] * len(texts))


class Student(nn.Module):
    """What trains: the encoder, the projection to the teacher's dim (if any), the classifier (if any).
    One module, so that DistributedDataParallel sees every trained parameter."""

    def __init__(self, encoder: Encoder, projection: nn.Linear | None, classifier: nn.Linear | None) -> None:
        super().__init__()
        self.encoder, self.projection, self.classifier = encoder, projection, classifier

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        pooled = mean_pool(self.encoder(input_ids, attention_mask), attention_mask).float()
        projected = self.projection(pooled) if self.projection is not None else None
        logits = self.classifier(pooled) if self.classifier is not None else None
        return pooled, projected, logits


def relational_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of each row's softmax over its cosine similarities to the other rows."""
    rows = student.shape[0]
    off_diagonal = ~torch.eye(rows, dtype=torch.bool, device=student.device)

    def log_distribution(vectors: torch.Tensor) -> torch.Tensor:
        normalised = F.normalize(vectors, dim=1)
        scores = normalised @ normalised.T / temperature  # (B, B)
        # A row's similarity to itself says nothing about the structure; a large negative score
        # (not -inf, whose 0 * -inf would be NaN in the KL) takes it out of the softmax.
        return F.log_softmax(scores.masked_fill(~off_diagonal, -1e4), dim=1)

    return F.kl_div(
        log_distribution(student), log_distribution(teacher), log_target=True, reduction="batchmean"
    )


class DistillTask:
    """The corpus's training rows, tokenised once, with the teacher's cached outputs; `loss(step)` runs
    this rank's share of global batch `step` through the student."""

    def __init__(
        self,
        options: DistillOptions,
        model: nn.Module,
        tokens: TokenizedTexts,
        rows: list[int],
        teacher: TeacherOutputs,
        hard_labels: torch.Tensor | None,
        device: torch.device,
        distributed: Distributed,
    ) -> None:
        self.options, self.model, self.tokens, self.rows = options, model, tokens, rows
        self.teacher, self.hard_labels, self.device = teacher, hard_labels, device
        self.rank_rows = slice(distributed.rank, None, distributed.world_size)
        self.multi_label = False

    def loss(self, step: int) -> StepResult:
        options = self.options
        batch = batch_rows(len(self.rows), options.batch_size, options.seed, step)[self.rank_rows]
        corpus_rows = [self.rows[i] for i in batch]
        input_ids, attention_mask = self.tokens.batch(corpus_rows)
        pooled, projected, logits = self.model(input_ids.to(self.device), attention_mask.to(self.device))
        served = projected if projected is not None and options.match_teacher_space else pooled
        # Sorted indices read the memory-mapped cache front to back; `order` puts them back.
        sorted_rows = np.sort(corpus_rows)
        order = np.searchsorted(sorted_rows, corpus_rows)
        target = torch.from_numpy(np.asarray(self.teacher.embeddings[sorted_rows])[order]).to(self.device)
        terms: dict[str, torch.Tensor] = {}
        direct = projected if projected is not None else pooled
        if options.direct_loss == "cosine":
            terms["cosine_loss"] = (1 - F.cosine_similarity(direct, target, dim=1)).mean()
        elif options.direct_loss == "mse":
            terms["mse_loss"] = F.mse_loss(direct, target)
        if options.relational_weight > 0 and len(corpus_rows) > 1:
            relational = relational_loss(served, target, options.relational_temperature)
            terms["relational_loss"] = options.relational_weight * relational
        if logits is not None and self.teacher.logits is not None:
            teacher_logits = torch.from_numpy(np.asarray(self.teacher.logits[sorted_rows])[order]).to(
                self.device
            )
            terms["classify_loss"] = self._classify_loss(logits, teacher_logits, corpus_rows)
        loss = torch.stack(list(terms.values())).sum()
        logs = {name: float(value.item()) for name, value in terms.items()}
        return StepResult(loss, int(attention_mask.sum()), logs)

    def _classify_loss(
        self, logits: torch.Tensor, teacher_logits: torch.Tensor, rows: list[int]
    ) -> torch.Tensor:
        temperature = self.options.temperature
        if self.multi_label:
            soft = F.binary_cross_entropy_with_logits(
                logits / temperature, torch.sigmoid(teacher_logits / temperature)
            )
        else:
            soft = F.kl_div(
                F.log_softmax(logits / temperature, dim=1),
                F.log_softmax(teacher_logits / temperature, dim=1),
                log_target=True,
                reduction="batchmean",
            )
        # The T^2 factor keeps the soft term's gradients on the scale of the hard term's (Hinton et al.).
        soft = soft * temperature**2
        if self.hard_labels is None:
            return soft
        wanted = self.hard_labels[rows].to(self.device)
        labelled = wanted >= 0
        if not bool(labelled.any()):
            return soft
        hard = F.cross_entropy(logits[labelled], wanted[labelled])
        return self.options.hard_weight * hard + (1 - self.options.hard_weight) * soft


def _check(options: DistillOptions, distributed: Distributed) -> None:
    if options.direct_loss not in ("cosine", "mse", "none"):
        raise ModelError(f"unknown direct loss {options.direct_loss!r} (choose cosine, mse or none)")
    if not 0 <= options.hard_weight <= 1 or options.temperature <= 0 or options.relational_temperature <= 0:
        raise ModelError("hard weight must be within 0-1, temperatures above 0")
    if options.init is None and options.tokenizer is None:
        raise ModelError("a student without an init RUN needs a tokenizer (and a preset) for its random init")
    if options.batch_size % distributed.world_size != 0:
        ranks = distributed.world_size
        raise ModelError(f"batch size {options.batch_size} must be divisible by the {ranks} ranks")


def distill(options: DistillOptions) -> dict[str, Any]:
    started = time.perf_counter()
    if options.direct_loss is None:
        options = replace(options, direct_loss="cosine" if options.match_teacher_space else "none")
    threads = set_threads(options.threads)
    distributed = Distributed.from_environment(pick_device(options.device))
    device = distributed.device(pick_device(options.device))
    try:
        return _distill(options, distributed, device, threads, started)
    finally:
        distributed.close()


def _teacher_pass(
    options: DistillOptions, texts: list[str], distributed: Distributed, threads: int
) -> tuple[TeacherOutputs, dict[str, Any]]:
    """The main rank fills (or resumes, or reuses) the cache; the others wait for it, then all read it."""
    cache_root = options.cache_dir or default_cache_dir()
    sha256 = file_sha256(options.teacher / MANIFEST_FILE)
    started = time.perf_counter()
    report: dict[str, Any] = {}
    if distributed.is_main:
        teacher = Teacher(options.teacher, options.teacher_variant, options.teacher_provider, threads)
        cached = teacher.cached_outputs(texts, cache_root, progress=options.progress)
        report = {
            "cache": str(cached.path),
            "computed_rows": cached.computed_rows,
            "reused_rows": cached.reused_rows,
            "provider": teacher.runtime.provider,
        }
    distributed.barrier()
    path = cache_path(cache_root, sha256, options.teacher_variant, texts)
    report["seconds"] = round(time.perf_counter() - started, 1)
    return open_cache(path), report


def _distill(
    options: DistillOptions, distributed: Distributed, device: torch.device, threads: int, started: float
) -> dict[str, Any]:
    _check(options, distributed)
    # The teacher's manifest alone (no session) says what the student must match.
    manifest = verify_bundle(options.teacher)
    teacher_labels = list(manifest.classifier.labels) if manifest.classifier else None
    corpus = read_corpus(options.corpus, options.limit)
    if len(corpus.texts) < 2:
        raise DataError(f"{options.corpus}: distillation needs at least two texts")
    teacher_outputs, teacher_report = _teacher_pass(options, corpus.texts, distributed, threads)

    torch.manual_seed(options.seed)
    if options.init is not None:
        run = load_run(options.init)
        config, tokenizer_path, encoder = run.config, run.tokenizer_path, run.build_encoder()
        init_classifier = run.build_classifier() if run.labels == teacher_labels else None
        init_summary: dict[str, Any] = run.summary
        # In the student's own space the init's lexical channel still counts (the sketch depends on
        # the tokenizer alone); in the teacher's space the projection is the whole embedding.
        sketch = None if options.match_teacher_space else run.build_sketch()
        sketch_weight = run.sketch_weight if sketch is not None else 0.0
    else:
        assert options.tokenizer is not None
        tokenizer_path = options.tokenizer
        vocab_size = load_tokenizer(tokenizer_path).get_vocab_size()
        try:
            config = preset_config(options.preset, vocab_size)
        except ValueError as exc:
            raise ModelError(str(exc)) from None
        encoder, init_classifier, init_summary = Encoder(config), None, {"random_init": options.preset}
        sketch, sketch_weight = None, 0.0
    tokenizer = load_tokenizer(tokenizer_path)
    projection = None
    if options.match_teacher_space or (
        options.direct_loss != "none" and manifest.embedding.dim != config.n_embd
    ):
        projection = nn.Linear(config.n_embd, manifest.embedding.dim)
    classifier = None
    if teacher_labels:
        classifier = init_classifier or nn.Linear(config.n_embd, len(teacher_labels))
        if init_classifier is None:
            nn.init.normal_(classifier.weight, std=0.02)
            nn.init.zeros_(classifier.bias)
    student = Student(encoder, projection, classifier).to(device)
    exported = InferenceModule(
        encoder, classifier, projection=projection if options.match_teacher_space else None
    )

    train_rows, held_rows = held_out_split(len(corpus.texts), options.holdout, options.seed)
    held_texts = [corpus.texts[i] for i in held_rows]

    def held_out_agreement() -> dict[str, float]:
        embeddings, logits = infer(exported, tokenizer, held_texts, device, desc="held-out")
        teacher_logits = (
            None if teacher_outputs.logits is None else np.asarray(teacher_outputs.logits[held_rows])
        )
        return agreement(
            embeddings.numpy(),
            None if logits is None else logits.numpy(),
            np.asarray(teacher_outputs.embeddings[held_rows]),
            teacher_logits,
        )

    before = held_out_agreement() if distributed.is_main and held_texts else {}
    hard_labels = None
    if teacher_labels and any(label is not None for label in corpus.labels):
        index = {label: i for i, label in enumerate(teacher_labels)}
        unknown = sorted({label for label in corpus.labels if label is not None and label not in index})
        if unknown:
            raise DataError(f"{options.corpus}: label {unknown[0]!r} is not one of the teacher's labels")
        hard_labels = torch.tensor([-1 if label is None else index[label] for label in corpus.labels])
    train_model: nn.Module = student
    if distributed.world_size > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        train_model = DistributedDataParallel(student, device_ids=device_ids)
    task = DistillTask(
        options,
        train_model,
        TokenizedTexts.encode(tokenizer, corpus.texts),
        train_rows,
        teacher_outputs,
        hard_labels,
        device,
        distributed,
    )
    task.multi_label = bool(manifest.classifier and manifest.classifier.multi_label)

    planned = math.ceil(options.epochs * max(1, len(train_rows) // options.batch_size))
    max_steps = planned if options.max_steps is None else min(planned, options.max_steps)
    budget_seconds = None if options.budget_minutes is None else options.budget_minutes * 60 * 0.95
    options.out.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(options.out / METRICS_FILE) if distributed.is_main else None
    optimizer = torch.optim.AdamW(optimizer_groups(student, weight_decay=0.01), lr=options.lr)
    loop = TrainLoop(
        "distill",
        [p for p in student.parameters() if p.requires_grad],
        optimizer,
        Schedule(options.lr, max_steps, budget_seconds),
        metrics,
        distributed=distributed,
        progress=options.progress,
    )
    student.train()
    loop.run(task.loss)
    student.eval()
    distributed.barrier()
    if metrics is not None:
        metrics.close()
    summary: dict[str, Any] = {
        **loop.summary(),
        "kind": "classify" if classifier is not None else "embed",
        "planned_steps": max_steps,
        "seed": options.seed,
        "budget_minutes": options.budget_minutes,
        "world_size": distributed.world_size,
        "device": device.type,
        "distill": {
            "corpus_rows": len(corpus.texts),
            "train_rows": len(train_rows),
            "held_out_rows": len(held_rows),
            "direct_loss": options.direct_loss,
            "relational_weight": options.relational_weight,
            "relational_temperature": options.relational_temperature,
            "temperature": options.temperature if teacher_labels else None,
            "hard_labels": hard_labels is not None,
            "hard_weight": options.hard_weight if hard_labels is not None else None,
            "projection": projection is not None,
            "teacher_pass": teacher_report,
            "agreement_before": before,
        },
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    if not distributed.is_main:
        return {"run": str(options.out), **summary}
    after = held_out_agreement() if held_texts else {}
    summary["teacher"] = {
        "name": manifest.name,
        "sha256": file_sha256(options.teacher / MANIFEST_FILE),
        "shared_space": options.match_teacher_space,
        "agreement": after,
    }
    weights = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    if classifier is not None:
        weights.update({f"classifier.{k}": v for k, v in classifier.state_dict().items()})
    if projection is not None and options.match_teacher_space:
        weights.update({f"projection.{k}": v for k, v in projection.state_dict().items()})
    # In the teacher's space the student is normalised by default exactly when the teacher is.
    normalize = manifest.embedding.normalize if options.match_teacher_space else True
    save_run(
        options.out,
        kind="classify" if classifier is not None else "embed",
        config=config,
        weights=weights,
        tokenizer_path=tokenizer_path,
        labels=teacher_labels,
        multi_label=task.multi_label,
        normalize=normalize,
        summary={**summary, "init": init_summary},
        parent=options.init,
        sketch=sketch,
        sketch_weight=sketch_weight,
    )
    return {"run": str(options.out), **summary}
