"""`encoder finetune classify|embed`: a classification head, or contrastive sentence embeddings.

Both read their init RUN through load_run, so any RUN kind can be the starting point; a
`pretrain --max-steps 0` RUN is the random-initialisation baseline.
"""

import functools
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from model.data import DataError, TokenizedTexts, read_jsonl, read_text_lines
from model.encoder import Encoder, InferenceModule, mean_pool, optimizer_groups, set_dropout
from model.errors import ModelError
from model.evaluate import infer, read_classification_rows, score_classifier
from model.run import METRICS_FILE, LoadedRun, load_run, save_run
from model.tokenizer import load_tokenizer
from model.training import (
    MetricsLog,
    Schedule,
    pick_device,
    set_threads,
)


@dataclass
class ClassifyOptions:
    init: Path
    train: Path
    out: Path
    eval: Path | None = None
    epochs: float | None = None  # default 3, or 10 with freeze_encoder (a linear head on fixed features)
    multi_label: bool = False
    freeze_encoder: bool = False
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    budget_minutes: float | None = None
    max_steps: int | None = None
    batch_size: int | None = None  # default 32, or 256 with freeze_encoder
    lr: float | None = None  # default 3e-4, or 3e-3 with freeze_encoder
    limit: int | None = None  # use only the first N training rows (quick builds)
    progress: bool = True


@dataclass
class EmbedOptions:
    init: Path
    train: Path
    out: Path
    epochs: float = 1.0
    matryoshka: list[int] = field(default_factory=list)
    temperature: float = 0.05
    dropout: float | None = None  # default 0, or 0.1 for SimCSE where dropout is the augmentation
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    budget_minutes: float | None = None
    max_steps: int | None = None
    batch_size: int | None = None  # default 64: in-batch negatives want large batches
    lr: float | None = None  # default 2e-4
    limit: int | None = None  # use only the first N training rows (quick builds)
    progress: bool = True


@functools.lru_cache(maxsize=2)
def _epoch_order(rows: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(rows, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


def _batch_indices(rows: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Rows of batch `step`: epoch-wise seeded permutations, a batch never spans two epochs."""
    per_epoch = max(1, rows // batch_size)
    epoch, position = divmod(step, per_epoch)
    return _epoch_order(rows, seed, epoch)[position * batch_size : (position + 1) * batch_size]


def _train_loop(
    name: str,
    parameters: list[nn.Parameter],
    groups: list[dict[str, Any]],
    loss_at: Callable[[int], torch.Tensor],
    planned_steps: int,
    options: ClassifyOptions | EmbedOptions,
    peak_lr: float,
    out: Path,
    started: float,
) -> dict[str, Any]:
    """AdamW with warmup + linear decay and clipping, over the planned epochs, cut to --max-steps and
    to the wall-clock budget (whatever runs out first)."""
    optimizer = torch.optim.AdamW(groups, lr=peak_lr)
    max_steps = planned_steps if options.max_steps is None else min(planned_steps, options.max_steps)
    budget_seconds = None
    if options.budget_minutes is not None:
        budget_seconds = options.budget_minutes * 60 * 0.95 - (time.perf_counter() - started)
    schedule = Schedule(peak_lr, max_steps, budget_seconds)
    out.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(out / METRICS_FILE)
    losses: list[float] = []
    progress = tqdm(
        total=max_steps, desc=name, file=sys.stderr, dynamic_ncols=True, disable=not options.progress
    )
    step, trained_seconds = 0, 0.0
    while not schedule.done(step, schedule.time_fraction(trained_seconds)):
        step_started = time.perf_counter()
        lr = schedule.lr(step, schedule.time_fraction(trained_seconds))
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = loss_at(step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        trained_seconds += time.perf_counter() - step_started
        losses.append(loss.item())
        metrics.write({"step": step, "loss": losses[-1], "lr": lr})
        progress.set_postfix(loss=f"{losses[-1]:.3f}")
        progress.update(1)
    progress.close()
    metrics.close()
    tail = losses[-20:]
    return {
        "steps": step,
        "planned_steps": max_steps,
        "first_loss": losses[0] if losses else None,
        "final_loss": sum(tail) / len(tail) if tail else None,
        "seed": options.seed,
        "lr": peak_lr,
        "train_seconds": round(trained_seconds, 1),
        "budget_minutes": options.budget_minutes,
    }


def _prepare(options: ClassifyOptions | EmbedOptions) -> tuple[LoadedRun, torch.device, float]:
    started = time.perf_counter()
    set_threads(options.threads)
    device = pick_device(options.device)
    run = load_run(options.init)
    torch.manual_seed(options.seed)
    return run, device, started


def finetune_classify(options: ClassifyOptions) -> dict[str, Any]:
    run, device, started = _prepare(options)
    tokenizer = load_tokenizer(run.tokenizer_path)
    texts, targets = read_classification_rows(options.train, options.multi_label)
    texts, targets = texts[: options.limit], targets[: options.limit]
    if not options.multi_label and any(len(t) != 1 for t in targets):
        raise DataError(f"{options.train}: single-label rows need exactly one label")
    labels = sorted({label for target in targets for label in target})
    if len(labels) < 2 and not options.multi_label:
        raise DataError(f"{options.train}: need at least two distinct labels, found {labels}")
    label_index = {label: i for i, label in enumerate(labels)}
    target_tensor = torch.zeros(len(texts), len(labels))
    for row, target in enumerate(targets):
        target_tensor[row, [label_index[label] for label in target]] = 1.0
    encoder = run.build_encoder().to(device)
    classifier = nn.Linear(run.config.n_embd, len(labels)).to(device)
    nn.init.normal_(classifier.weight, std=0.02)
    nn.init.zeros_(classifier.bias)
    module = InferenceModule(encoder, classifier)

    def head_loss(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
        wanted = target_tensor[rows].to(device)
        if options.multi_label:
            return F.binary_cross_entropy_with_logits(logits, wanted)
        return F.cross_entropy(logits, wanted.argmax(dim=1))

    batch_size = options.batch_size or (256 if options.freeze_encoder else 32)
    epochs = options.epochs or (10.0 if options.freeze_encoder else 3.0)
    planned = math.ceil(epochs * max(1, len(texts) // batch_size))
    if options.freeze_encoder:
        # The encoder never changes, so its pooled outputs are computed once and the head trains on them.
        encoder.requires_grad_(False)
        features = infer(InferenceModule(encoder, None), tokenizer, texts, device, desc="features")[0]
        # Pooled embeddings share a large common direction; the head trains on standardised features
        # (much better conditioned) and the standardisation is folded into its weights afterwards.
        feature_mean, feature_std = features.mean(dim=0), features.std(dim=0) + 1e-6
        features = ((features - feature_mean) / feature_std).to(device)

        def loss_at(step: int) -> torch.Tensor:
            rows = _batch_indices(len(texts), batch_size, options.seed, step)
            return head_loss(classifier(features[rows]), rows)

        parameters = list(classifier.parameters())
        peak_lr = options.lr or 3e-3
    else:
        tokenized = TokenizedTexts.encode(tokenizer, texts)
        module.train()

        def loss_at(step: int) -> torch.Tensor:
            rows = _batch_indices(len(texts), batch_size, options.seed, step)
            input_ids, attention_mask = tokenized.batch(rows)
            _, logits = module(input_ids.to(device), attention_mask.to(device))
            return head_loss(logits, rows)

        parameters = list(module.parameters())
        peak_lr = options.lr or 3e-4
    groups = optimizer_groups(module, weight_decay=0.01)
    summary = _train_loop(
        "finetune classify", parameters, groups, loss_at, planned, options, peak_lr, options.out, started
    )
    summary.update(kind="classify", freeze_encoder=options.freeze_encoder, examples=len(texts))
    if options.freeze_encoder:
        with torch.no_grad():  # W (x - m) / s + b  ==  (W / s) x + (b - (W / s) m)
            classifier.weight.div_(feature_std.to(device))
            classifier.bias.sub_(classifier.weight @ feature_mean.to(device))
    if options.eval is not None:
        eval_texts, eval_targets = read_classification_rows(options.eval, options.multi_label)
        for number, target in enumerate(eval_targets, start=1):
            unknown = [label for label in target if label not in label_index]
            if unknown:
                raise DataError(f"{options.eval}: row {number}: label {unknown[0]!r} is not a training label")
        summary["eval"] = score_classifier(
            module, tokenizer, labels, options.multi_label, eval_texts, eval_targets, device
        )
    weights = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    weights.update({f"classifier.{k}": v for k, v in classifier.state_dict().items()})
    # An embed init keeps its embedding behaviour, so one bundle serves /embed and /classify.
    save_run(
        options.out,
        kind="classify",
        config=run.config,
        weights=weights,
        tokenizer_path=run.tokenizer_path,
        labels=labels,
        multi_label=options.multi_label,
        normalize=run.normalize,
        matryoshka_dims=run.matryoshka_dims,
        summary={**summary, "init": run.summary},
        parent=run.path,
    )
    return {"run": str(options.out), "labels": len(labels), **summary}


@dataclass
class Pairs:
    queries: list[str]
    positives: list[str]
    negatives: list[str | None]
    simcse: bool


def read_pairs(path: Path, limit: int | None = None) -> Pairs:
    """Pairs JSON lines, or raw text (a .txt file or {"text"} rows) for unsupervised SimCSE."""
    if path.suffix == ".txt":
        lines = read_text_lines([path])[:limit]
        return Pairs(lines, lines, [None] * len(lines), simcse=True)
    rows = read_jsonl(path, ())
    if "query" not in rows[0] and "text" in rows[0]:
        texts = [str(row["text"]) for row in read_jsonl(path, ("text",))][:limit]
        return Pairs(texts, texts, [None] * len(texts), simcse=True)
    rows = read_jsonl(path, ("query", "positive"))[:limit]
    negatives = [row.get("negative") for row in rows]
    return Pairs([r["query"] for r in rows], [r["positive"] for r in rows], negatives, simcse=False)


def contrastive_loss(
    queries: torch.Tensor, documents: torch.Tensor, temperature: float, dims: list[int]
) -> torch.Tensor:
    """InfoNCE: query i's positive is document i; the other documents (in-batch positives, then hard
    negatives) are negatives. With Matryoshka dims the loss is averaged over the truncations too."""
    targets = torch.arange(queries.shape[0], device=queries.device)
    losses = []
    for dim in [*dims, queries.shape[1]]:
        q = F.normalize(queries[:, :dim], dim=1)
        d = F.normalize(documents[:, :dim], dim=1)
        losses.append(F.cross_entropy(q @ d.T / temperature, targets))
    return torch.stack(losses).mean()


def finetune_embed(options: EmbedOptions) -> dict[str, Any]:
    run, device, started = _prepare(options)
    dims = [d for d in options.matryoshka if d < run.config.n_embd]
    if len(dims) != len(options.matryoshka):
        raise ModelError(f"matryoshka dims must be smaller than the model's dim {run.config.n_embd}")
    tokenizer = load_tokenizer(run.tokenizer_path)
    pairs = read_pairs(options.train, options.limit)
    query_tokens = TokenizedTexts.encode(tokenizer, pairs.queries)
    positive_tokens = query_tokens if pairs.simcse else TokenizedTexts.encode(tokenizer, pairs.positives)
    negative_rows = [i for i, negative in enumerate(pairs.negatives) if negative is not None]
    negative_tokens = TokenizedTexts.encode(tokenizer, [str(pairs.negatives[i]) for i in negative_rows])
    negative_position = {row: position for position, row in enumerate(negative_rows)}
    encoder: Encoder = run.build_encoder().to(device)
    dropout = options.dropout if options.dropout is not None else (0.1 if pairs.simcse else 0.0)
    set_dropout(encoder, dropout)
    encoder.train()
    batch_size = options.batch_size or 64

    def embed(tokens: TokenizedTexts, rows: list[int]) -> torch.Tensor:
        input_ids, attention_mask = tokens.batch(rows)
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        return mean_pool(encoder(input_ids, attention_mask), attention_mask)

    def loss_at(step: int) -> torch.Tensor:
        rows = _batch_indices(len(pairs.queries), batch_size, options.seed, step)
        documents = embed(positive_tokens, rows)
        hard = [negative_position[row] for row in rows if row in negative_position]
        if hard:
            documents = torch.cat([documents, embed(negative_tokens, hard)])
        return contrastive_loss(embed(query_tokens, rows), documents, options.temperature, dims)

    planned = math.ceil(options.epochs * max(1, len(pairs.queries) // batch_size))
    summary = _train_loop(
        "finetune embed",
        list(encoder.parameters()),
        optimizer_groups(encoder, 0.01),
        loss_at,
        planned,
        options,
        options.lr or 2e-4,
        options.out,
        started,
    )
    summary.update(
        kind="embed",
        simcse=pairs.simcse,
        pairs=len(pairs.queries),
        hard_negatives=len(negative_rows),
        temperature=options.temperature,
        dropout=dropout,
        matryoshka_dims=dims,
    )
    weights = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    save_run(
        options.out,
        kind="embed",
        config=run.config,
        weights=weights,
        tokenizer_path=run.tokenizer_path,
        normalize=True,
        matryoshka_dims=dims,
        summary={**summary, "init": run.summary},
        parent=run.path,
    )
    return {"run": str(options.out), **summary}
