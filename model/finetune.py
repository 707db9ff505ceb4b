"""`encoder finetune classify|embed|rerank`: a classification head, contrastive sentence embeddings, or
both on one encoder (multi-task: `finetune classify --pairs`); or a cross-encoder (model/rerank.py).

Both read their init RUN through load_run, so any RUN kind can be the starting point; a
`pretrain --max-steps 0` RUN is the random-initialisation baseline. Both train through the one
TrainLoop of model/training.py; they differ only in the loss of a step:

- ClassificationTask: cross-entropy (or per-label BCE) of a linear head on the mean-pooled encoder;
- ContrastiveTask: InfoNCE of query against document embeddings, with in-batch negatives, optional
  hard negatives (given in the data or mined with BM25), both directions (symmetric); with a teacher
  bundle (`--teacher`), mixed with the teacher's in-batch similarities as soft targets (distillation
  on labelled pairs: the teacher says how close each query is to the batch's other documents too);
- RerankTask (model/rerank.py): listwise and pointwise cross-entropy of a one-logit head on pair-encoded
  (query, passage) inputs, against hard (given or BM25-mined) and in-batch negatives.

An embed fine-tune then adds the embedding's lexical channel (model/lexical.py), weighted against the
encoder by what ranks held-out training pairs best.
"""

import itertools
import math
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.cross_encoder import CrossEncoder
from model.data import DataError, TokenizedTexts, read_jsonl, read_text_lines
from model.encoder import Encoder, InferenceModule, mean_pool, optimizer_groups, set_dropout
from model.errors import ModelError
from model.evaluate import INFERENCE_BATCH, infer, read_classification_rows, score_classifier
from model.lexical import (
    MIN_DOCUMENT_FREQUENCY,
    TABLE_BATCH,
    LexicalHead,
    LexicalSketch,
    hybrid_embedding,
    inverse_document_frequencies,
)
from model.metrics import retrieval_metrics
from model.negatives import first_stage_negatives, mine_bm25_negatives
from model.rerank import RerankTask
from model.run import METRICS_FILE, LoadedRun, load_run, save_run
from model.teacher import Teacher, default_cache_dir, open_cache
from model.tokenizer import SPECIAL_TOKENS, load_tokenizer
from model.training import (
    MetricsLog,
    Schedule,
    StepResult,
    TrainLoop,
    batch_rows,
    held_out_split,
    pick_device,
    set_threads,
)


@dataclass
class ClassifyOptions:
    init: Path
    train: Path
    out: Path
    eval: Path | None = None
    # Of the fine-tune (default 3); the heads' fit (alone with freeze_encoder) has no epochs.
    epochs: float | None = None
    multi_label: bool = False
    freeze_encoder: bool = False
    # Multi-task: also train the contrastive loss on these pairs, so the one encoder keeps serving
    # /embed well while it learns the classes (a plain classification fine-tune degrades embeddings).
    pairs: Path | None = None
    pair_batch_size: int = 64
    temperature: float = 0.05
    # After the fine-tune (or alone, with freeze_encoder), the heads are fitted again on the frozen
    # encoder's features of *every* training row: one inference pass, then a logistic regression (see
    # _fit_heads). A fine-tune on a CPU budget sees only a fraction of a large training set.
    refit_heads: bool = True
    # The heads' inverse L2 strength: loss = head_c * (sum of the rows' losses) + |W|^2 / 2.
    head_c: float = 16.0
    # The lexical (wide) head's hashed-bigram buckets (None: sized to the training data's distinct
    # bigrams, at most MAX_LEXICAL_BUCKETS; 0: no lexical head).
    lexical_buckets: int | None = None
    # Single-label loss weights (1 / class frequency) ** class_balance: 0 is plain cross-entropy, 1 fully
    # balanced. 0.5 raised WordNet's macro-F1 by 0.014 at equal accuracy (rare classes are recalled
    # more often, frequent ones barely lose); topic data is usually skewed the same way.
    class_balance: float = 0.5
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    budget_minutes: float | None = None
    max_steps: int | None = None
    batch_size: int | None = None  # of the fine-tune: default 32
    lr: float | None = None  # of the fine-tune: default 5e-4
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
    symmetric: bool = True  # also score each document against the queries (both InfoNCE directions)
    mine_negatives: bool = False  # one BM25 hard negative for every pair that has none
    # The embedding's lexical channel (model/lexical.py): sketch dims (0: none) and its weight against
    # the encoder's cosine (None: the best of SKETCH_WEIGHTS on held-out training pairs).
    lexical_dim: int = 768
    lexical_weight: float | None = None
    # Passes over the pairs that train the channel's table (LexicalSketch.train_table), counted in steps;
    # 0 keeps the random count sketch (as does SimCSE, which has no pairs to learn from).
    lexical_epochs: float = 3.0
    # Distillation on the pairs: a teacher bundle's query x document similarities in each batch become
    # soft targets, `teacher_weight` of the loss (the rest is InfoNCE on the pairs' own labels).
    teacher: Path | None = None
    teacher_weight: float = 0.8
    teacher_temperature: float = 0.05
    teacher_cache_dir: Path | None = None
    dropout: float | None = None  # default 0, or 0.1 for SimCSE where dropout is the augmentation
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    budget_minutes: float | None = None
    max_steps: int | None = None
    batch_size: int | None = None  # default 64: in-batch negatives want large batches
    lr: float | None = None  # default 5e-4
    limit: int | None = None  # use only the first N training rows (quick builds)
    progress: bool = True


@dataclass
class RerankOptions:
    init: Path
    train: Path
    out: Path
    epochs: float = 1.0
    in_batch_negatives: int = 3  # other rows' positives scored against each query, besides its hard one
    # Where hard negatives come from: "first-stage" (the init's top passages by its own embedding, the
    # first stage an embed run's reranker reranks; only rows whose positive is there are trained on),
    # "bm25" (one for each pair without a negative) or "none"; default first-stage from an embed run.
    negatives: str | None = None
    # Fine-tune the encoder's layers too; default only from a pretrain run. From an embed run they stay
    # frozen, so the reranker keeps the bi-encoder's similarity and learns what the pair block adds.
    train_encoder: bool | None = None
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    budget_minutes: float | None = None
    max_steps: int | None = None
    batch_size: int | None = None  # default 16 queries (x 1 + 1 + in_batch_negatives pairs)
    lr: float | None = None  # default 3e-4
    limit: int | None = None  # use only the first N training rows (quick builds)
    progress: bool = True


DEFAULT_EMBED_LR = 5e-4
DEFAULT_RERANK_LR = 3e-4
NEGATIVE_SOURCES = ("first-stage", "bm25", "none")
FIRST_STAGE_DEPTH = 50  # a reranker of an embed run learns on its top 50, what `eval rerank` reranks
FIRST_STAGE_NEGATIVES = 3  # negatives per query drawn from there
FIRST_STAGE_SAMPLE = 6  # rows ranked per row a step budget trains on (WordNet: a quarter are kept)
DEFAULT_CLASSIFY_LR = 5e-4
SPECIAL_IDS = list(range(len(SPECIAL_TOKENS)))
# Up to 8: a trained lexical table can rank better than a small encoder, which then only breaks its ties.
SKETCH_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
DEFAULT_SKETCH_WEIGHT = 1.0  # when there are too few pairs to hold some out (or SimCSE, which has none)
# Few pairs make few steps: 2,000 Debian pairs give 23 steps in 3 passes, which leave the table near its
# random start (test MRR@10 of the channel alone 0.716; 300 steps 0.733, 600 steps 0.735; 3,000 WordNet
# pairs 0.126 / 0.150 / 0.153; no loss from the extra passes on either). Steps are cheap (about 0.05 s).
MIN_TABLE_STEPS = 300
VALIDATION_PAIRS = 1000  # at most; a tenth of the pairs when there are fewer than 10,000
MIN_VALIDATION_PAIRS = 32


@dataclass
class Pairs:
    queries: list[str]
    positives: list[str]
    negatives: list[str | None]
    simcse: bool

    def select(self, rows: list[int]) -> "Pairs":
        return Pairs(
            [self.queries[i] for i in rows],
            [self.positives[i] for i in rows],
            [self.negatives[i] for i in rows],
            self.simcse,
        )

    def split_validation(self, seed: int) -> tuple["Pairs", "Pairs | None"]:
        """-> (training pairs, held-out pairs), the held-out ones a seeded random tenth (at most
        VALIDATION_PAIRS); no held-out pairs for SimCSE or when there would be too few to rank."""
        if self.simcse or min(VALIDATION_PAIRS, len(self.queries) // 10) < MIN_VALIDATION_PAIRS:
            return self, None
        training, held_out = held_out_split(len(self.queries), VALIDATION_PAIRS, seed)
        return self.select(training), self.select(held_out)


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
    negatives = [None if row.get("negative") is None else str(row["negative"]) for row in rows]
    return Pairs([str(r["query"]) for r in rows], [str(r["positive"]) for r in rows], negatives, simcse=False)


def contrastive_loss(
    queries: torch.Tensor,
    documents: torch.Tensor,
    temperature: float,
    dims: list[int],
    symmetric: bool = False,
) -> torch.Tensor:
    """InfoNCE: query i's positive is document i; the other documents (in-batch positives, then hard
    negatives) are negatives. Symmetric adds the document -> query direction over the positives (each
    positive must pick its own query among the batch's). With Matryoshka dims the loss is averaged over
    the truncations too."""
    batch = queries.shape[0]
    targets = torch.arange(batch, device=queries.device)
    losses = []
    for dim in [*dims, queries.shape[1]]:
        q = F.normalize(queries[:, :dim], dim=1)
        d = F.normalize(documents[:, :dim], dim=1)
        scores = q @ d.T / temperature  # (B, B + negatives)
        loss = F.cross_entropy(scores, targets)
        if symmetric:
            loss = (loss + F.cross_entropy(scores[:, :batch].T, targets)) / 2
        losses.append(loss)
    return torch.stack(losses).mean()


def similarity_distillation_loss(
    queries: torch.Tensor,
    documents: torch.Tensor,
    teacher_queries: torch.Tensor,
    teacher_documents: torch.Tensor,
    temperature: float,
    teacher_temperature: float,
    symmetric: bool,
) -> torch.Tensor:
    """KL(teacher || student) of each query's softmax over the batch's documents (and, symmetric, of
    each document's over the queries). Unlike the one-hot InfoNCE target, the teacher's distribution
    says which of the other documents are nearly right, which is what ranking beyond the top one needs.
    The teacher's vectors are unit length already."""
    student = F.normalize(queries, dim=1) @ F.normalize(documents, dim=1).T / temperature
    teacher = teacher_queries @ teacher_documents.T / teacher_temperature

    def kl(student_scores: torch.Tensor, teacher_scores: torch.Tensor) -> torch.Tensor:
        return F.kl_div(
            F.log_softmax(student_scores, dim=1),
            F.log_softmax(teacher_scores, dim=1),
            log_target=True,
            reduction="batchmean",
        )

    loss = kl(student, teacher)
    return (loss + kl(student.T, teacher.T)) / 2 if symmetric else loss


@dataclass(frozen=True)
class PairTeacher:
    """A teacher's unit vectors for the pairs a fine-tune visits: row r's query and positive are at
    `position[r]` of `queries` and `documents`."""

    queries: torch.Tensor
    documents: torch.Tensor
    position: dict[int, int]
    weight: float
    temperature: float


def pair_teacher(
    options: EmbedOptions, pairs: "Pairs", rows: list[int]
) -> tuple[PairTeacher, dict[str, Any]]:
    """Run the teacher bundle over the queries and positives of `rows` (through the distillation cache
    of model/teacher.py, so a second fine-tune on the same pairs reuses it)."""
    assert options.teacher is not None
    started = time.perf_counter()
    teacher = Teacher(options.teacher, threads=torch.get_num_threads())
    texts = [pairs.queries[row] for row in rows] + [pairs.positives[row] for row in rows]
    report = teacher.cached_outputs(texts, options.teacher_cache_dir or default_cache_dir(), options.progress)
    vectors = F.normalize(torch.from_numpy(np.array(open_cache(report.path).embeddings)), dim=1)
    summary = {
        "teacher": {"name": teacher.name, "sha256": teacher.sha256, "shared_space": False},
        "teacher_pass": {
            "weight": options.teacher_weight,
            "temperature": options.teacher_temperature,
            "pairs": len(rows),
            "computed_texts": report.computed_rows,
            "seconds": round(time.perf_counter() - started, 1),
        },
    }
    position = {row: index for index, row in enumerate(rows)}
    taught = PairTeacher(
        vectors[: len(rows)],
        vectors[len(rows) :],
        position,
        options.teacher_weight,
        options.teacher_temperature,
    )
    return taught, summary


LENGTH_CHUNK = 16


def pooled_embeddings(
    encoder: Encoder, tokens: TokenizedTexts, rows: list[int], device: torch.device
) -> tuple[torch.Tensor, int]:
    """Mean-pooled embeddings (len(rows), C) of the rows, in order, and the real tokens they hold.

    Short texts vary a lot in length, and a batch padded to its longest row is mostly padding (70% for
    WordNet's pairs); the rows are therefore run in length-sorted chunks, each padded only to its own
    longest row. Attention never sees padding, so the result is the same as one padded batch; the
    compute is about half."""
    order = sorted(range(len(rows)), key=lambda i: len(tokens.ids[rows[i]]))
    pieces, real = [], 0
    for start in range(0, len(order), LENGTH_CHUNK):
        input_ids, attention_mask = tokens.batch([rows[i] for i in order[start : start + LENGTH_CHUNK]])
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        pieces.append(mean_pool(encoder(input_ids, attention_mask), attention_mask))
        real += int(attention_mask.sum())
    inverse = torch.argsort(torch.tensor(order, device=device))
    return torch.cat(pieces)[inverse], real


class ContrastiveTask:
    """Query/document pairs, tokenised once; `loss(step)` embeds batch `step` and scores it."""

    def __init__(
        self,
        pairs: Pairs,
        tokenizer: Any,
        encoder: Encoder,
        device: torch.device,
        batch_size: int,
        temperature: float,
        seed: int,
        symmetric: bool,
        dims: list[int] | None = None,
        teacher: PairTeacher | None = None,
    ) -> None:
        self.pairs, self.encoder, self.device = pairs, encoder, device
        self.batch_size, self.temperature, self.seed = batch_size, temperature, seed
        self.symmetric, self.dims, self.teacher = symmetric, dims or [], teacher
        self.queries = TokenizedTexts.encode(tokenizer, pairs.queries)
        self.positives = self.queries if pairs.simcse else TokenizedTexts.encode(tokenizer, pairs.positives)
        self.negative_rows = [i for i, negative in enumerate(pairs.negatives) if negative is not None]
        negative_texts = [str(pairs.negatives[i]) for i in self.negative_rows]
        self.negatives = TokenizedTexts.encode(tokenizer, negative_texts)
        self.negative_position = {row: position for position, row in enumerate(self.negative_rows)}

    def __len__(self) -> int:
        return len(self.pairs.queries)

    def _embed(self, tokens: TokenizedTexts, rows: list[int]) -> tuple[torch.Tensor, int]:
        return pooled_embeddings(self.encoder, tokens, rows, self.device)

    def loss(self, step: int) -> StepResult:
        rows = batch_rows(len(self), self.batch_size, self.seed, step)
        documents, document_tokens = self._embed(self.positives, rows)
        hard = [self.negative_position[row] for row in rows if row in self.negative_position]
        negative_tokens = 0
        if hard:
            negatives, negative_tokens = self._embed(self.negatives, hard)
            documents = torch.cat([documents, negatives])
        queries, query_tokens = self._embed(self.queries, rows)
        loss = contrastive_loss(queries, documents, self.temperature, self.dims, self.symmetric)
        tokens = query_tokens + document_tokens + negative_tokens
        if self.teacher is None:
            return StepResult(loss, tokens)
        taught = [self.teacher.position[row] for row in rows]
        soft = similarity_distillation_loss(
            queries,
            documents[: len(rows)],
            self.teacher.queries[taught].to(self.device),
            self.teacher.documents[taught].to(self.device),
            self.temperature,
            self.teacher.temperature,
            self.symmetric,
        )
        mixed = (1 - self.teacher.weight) * loss + self.teacher.weight * soft
        return StepResult(
            mixed, tokens, {"contrastive_loss": float(loss.item()), "teacher_loss": float(soft.item())}
        )


def class_weights(targets: torch.Tensor, balance: float) -> torch.Tensor:
    """Per-class loss weights (rows / (classes * rows of the class)) ** balance for one-hot `targets`
    (rows, classes); a class without rows gets weight 0 (it never appears as a target anyway)."""
    counts = targets.sum(dim=0)
    weights = (targets.shape[0] / (targets.shape[1] * counts.clamp(min=1.0))) ** balance
    return torch.where(counts > 0, weights, torch.zeros_like(weights))


class ClassificationTask:
    """Labelled texts, tokenised once; `loss(step)` runs batch `step` through encoder and head."""

    def __init__(
        self,
        texts: list[str],
        targets: torch.Tensor,
        multi_label: bool,
        tokenizer: Any,
        module: InferenceModule,
        device: torch.device,
        batch_size: int,
        seed: int,
        class_balance: float = 0.0,
    ) -> None:
        self.targets, self.multi_label, self.module, self.device = targets, multi_label, module, device
        self.batch_size, self.seed = batch_size, seed
        self.tokens = TokenizedTexts.encode(tokenizer, texts)
        self.class_weights = class_weights(targets, class_balance).to(device) if not multi_label else None

    def __len__(self) -> int:
        return len(self.tokens.ids)

    def head_loss(
        self, logits: torch.Tensor, rows: list[int] | None, reduction: str = "mean"
    ) -> torch.Tensor:
        """The loss of `logits` for `rows` (None: every row, in order)."""
        wanted = (self.targets if rows is None else self.targets[rows]).to(self.device)
        if self.multi_label:
            return F.binary_cross_entropy_with_logits(logits, wanted, reduction=reduction)
        return F.cross_entropy(logits, wanted.argmax(dim=1), weight=self.class_weights, reduction=reduction)

    def loss(self, step: int) -> StepResult:
        rows = batch_rows(len(self), self.batch_size, self.seed, step)
        embeddings, tokens = pooled_embeddings(self.module.encoder, self.tokens, rows, self.device)
        assert self.module.classifier is not None
        return StepResult(self.head_loss(self.module.classifier(embeddings), rows), tokens)


def _prepare(
    options: ClassifyOptions | EmbedOptions | RerankOptions,
) -> tuple[LoadedRun, torch.device, float]:
    started = time.perf_counter()
    set_threads(options.threads)
    device = pick_device(options.device)
    run = load_run(options.init)
    torch.manual_seed(options.seed)
    return run, device, started


def _train(
    name: str,
    module: nn.Module,
    step_loss: Any,
    planned_steps: int,
    options: ClassifyOptions | EmbedOptions | RerankOptions,
    peak_lr: float,
    started: float,
) -> dict[str, Any]:
    """AdamW with warmup + linear decay and clipping, over the planned epochs, cut to max_steps and to
    the wall-clock budget (whichever runs out first)."""
    max_steps = planned_steps
    budget_seconds = None
    if options.max_steps is not None:
        max_steps = min(planned_steps, options.max_steps)
    if options.budget_minutes is not None:
        budget_seconds = options.budget_minutes * 60 * 0.95 - (time.perf_counter() - started)
    options.out.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(options.out / METRICS_FILE)
    parameters = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(optimizer_groups(module, weight_decay=0.01), lr=peak_lr)
    loop = TrainLoop(
        name,
        parameters,
        optimizer,
        Schedule(peak_lr, max_steps, budget_seconds),
        metrics,
        progress=options.progress,
    )
    loop.run(step_loss)
    metrics.close()
    summary = loop.summary()
    summary.update(planned_steps=max_steps, seed=options.seed, budget_minutes=options.budget_minutes)
    return summary


MAX_LEXICAL_BUCKETS = 65536
# The encoder's standardised features enter the heads' regression scaled to this norm; the TF-IDF vector
# has norm 1. Measured on frozen features with the same C: 0.5 was best on both WordNet topics and
# Debian sections (1.0 and 0.25 were 0.003-0.03 below in accuracy).
DENSE_FEATURE_NORM = 0.5
# The heads' fit runs at most HEAD_MAX_ITERATIONS L-BFGS iterations (fewer once the gradient vanishes),
# and at most HEAD_ROW_ITERATIONS / rows, so that its work stays bounded on very large training sets.
# WordNet's 106k rows get the full 300 (about 5 minutes on 2 cores): accuracy 0.790 at 113 iterations
# (the earlier bound), 0.795 at 300. Debian's 4,000 rows converge in 120.
HEAD_MAX_ITERATIONS = 300
HEAD_ROW_ITERATIONS = 32_000_000


def head_iterations(rows: int) -> int:
    """The L-BFGS iteration cap of the heads' fit on `rows` training rows (at least 20)."""
    return max(20, min(HEAD_MAX_ITERATIONS, HEAD_ROW_ITERATIONS // max(1, rows)))


def lexical_buckets(tokens: TokenizedTexts) -> int:
    """Hash buckets for the training texts' bigrams: the power of two at or above their number of
    distinct bigrams (few collisions), between 1024 and MAX_LEXICAL_BUCKETS (a bounded table)."""
    distinct = {(a, b) for ids in tokens.ids for a, b in itertools.pairwise(ids)}
    return min(MAX_LEXICAL_BUCKETS, max(1024, 1 << max(0, len(distinct) - 1).bit_length()))


class _SparseProduct(torch.autograd.Function):
    """matrix @ weight for a fixed sparse CSR matrix, with its transpose computed once for the backward
    pass (PyTorch's own backward transposes the matrix on every call, which doubles an L-BFGS fit)."""

    @staticmethod
    def forward(
        ctx: Any, weight: torch.Tensor, matrix: torch.Tensor, transposed: torch.Tensor
    ) -> torch.Tensor:
        ctx.transposed = transposed
        return matrix @ weight

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return ctx.transposed @ grad, None, None


def _fit_heads(
    module: InferenceModule,
    task: ClassificationTask,
    tokenizer: Any,
    texts: list[str],
    options: ClassifyOptions,
) -> dict[str, Any]:
    """Fit the linear head (and the lexical head) on the frozen encoder's features of every row: one
    logistic regression (multinomial, or per label) over [encoder features, the text's TF-IDF vector],
    with L2 penalty, fitted to convergence by full-batch L-BFGS, as scikit-learn fits TF-IDF + LR.

    Convex and deterministic, with no learning rate or epochs to choose. Against the 3,000 AdamW steps it
    replaces, on the same frozen encoders: Debian sections 0.607 -> 0.64 accuracy (4,000 rows, where
    minibatch steps left the wide table under-fitted), WordNet topics about equal.

    Pooled embeddings share a large common direction, so the regression sees standardised features
    (better conditioned), scaled to DENSE_FEATURE_NORM; that affine map is folded into the linear head's
    weights afterwards, so the exported graph is unchanged."""
    assert module.classifier is not None
    classifier, lexical, device = module.classifier, module.lexical, task.device
    started = time.perf_counter()
    module.encoder.requires_grad_(False)
    features = infer(InferenceModule(module.encoder, None), tokenizer, texts, device, desc="features")[0]
    feature_mean, feature_std = features.mean(dim=0), features.std(dim=0) + 1e-6
    scale = DENSE_FEATURE_NORM / math.sqrt(features.shape[1])
    dense = ((features - feature_mean) / feature_std * scale).to(device)
    tfidf = lexical.tfidf_matrix(task.tokens, list(range(len(texts)))) if lexical is not None else None
    tfidf_csr = None
    if tfidf is not None:
        with warnings.catch_warnings():  # "CSR support is in beta": the product is all the fit uses
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            tfidf_csr = (tfidf.to_sparse_csr(), tfidf.t().coalesce().to_sparse_csr())
    dense_weight = torch.zeros(features.shape[1], classifier.out_features, device=device, requires_grad=True)
    bias = torch.zeros(classifier.out_features, device=device, requires_grad=True)
    penalised = [dense_weight] if lexical is None else [dense_weight, lexical.weight]
    with torch.no_grad():  # start from the class priors: the first iterations would only find them
        frequency = task.targets.mean(dim=0).clamp(1e-6, 1 - 1e-6).to(device)
        bias.copy_(torch.logit(frequency) if task.multi_label else frequency.log())
    max_iterations = head_iterations(len(texts))
    optimizer = torch.optim.LBFGS(
        [*penalised, bias],
        max_iter=max_iterations,
        history_size=20,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-6,
        tolerance_change=1e-10,
    )

    def logits() -> torch.Tensor:
        out = dense @ dense_weight + bias
        if tfidf_csr is None:
            return out
        return out + _SparseProduct.apply(lexical.weight, *tfidf_csr)  # type: ignore[union-attr]

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = options.head_c * task.head_loss(logits(), None, reduction="sum")
        loss = loss + 0.5 * sum(weight.square().sum() for weight in penalised)
        loss.backward()
        return loss

    with torch.no_grad():
        first_loss = task.head_loss(logits(), None).item()
    optimizer.step(closure)
    with torch.no_grad():
        final_loss = task.head_loss(logits(), None).item()
        # W (x - m) / s * c + b  ==  (W c / s) x + (b - (W c / s) m)
        classifier.weight.copy_((dense_weight * scale / feature_std.to(device)[:, None]).T)
        classifier.bias.copy_(bias - classifier.weight @ feature_mean.to(device))
    module.encoder.requires_grad_(True)
    iterations = optimizer.state[optimizer._params[0]]["n_iter"]
    return {
        "method": "lbfgs",
        "steps": iterations,
        "max_steps": max_iterations,
        "finished": True,
        "first_loss": first_loss,
        "final_loss": final_loss,
        "head_c": options.head_c,
        "train_seconds": round(time.perf_counter() - started, 1),
        "seed": options.seed,
    }


def finetune_classify(options: ClassifyOptions) -> dict[str, Any]:
    run, device, started = _prepare(options)
    if options.freeze_encoder and options.pairs is not None:
        raise ModelError("a frozen encoder cannot also train on pairs: drop freeze_encoder or pairs")
    if options.freeze_encoder and not options.refit_heads:
        raise ModelError("with a frozen encoder the heads' fit is the whole training: drop refit_heads=False")
    if options.head_c <= 0:
        raise ModelError(f"head_c must be positive, not {options.head_c}")
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
    batch_size = options.batch_size or 32
    task = ClassificationTask(
        texts,
        target_tensor,
        options.multi_label,
        tokenizer,
        module,
        device,
        batch_size,
        options.seed,
        options.class_balance,
    )
    summary: dict[str, Any] = {"examples": len(texts), "multitask_pairs": 0}
    if not options.freeze_encoder:
        # Phase 1: the encoder and the linear head (and the pairs' contrastive loss) together.
        module.train()
        pair_task = None
        if options.pairs is not None:
            pair_task = ContrastiveTask(
                read_pairs(options.pairs),
                tokenizer,
                encoder,
                device,
                options.pair_batch_size,
                options.temperature,
                options.seed,
                symmetric=True,
                dims=run.matryoshka_dims,
            )
            summary["multitask_pairs"] = len(pair_task)

        def step_loss(step: int) -> StepResult:
            result = task.loss(step)
            if pair_task is None:
                return result
            pairs = pair_task.loss(step)
            logs = {"classify_loss": result.loss.item(), "contrastive_loss": pairs.loss.item()}
            return StepResult(result.loss + pairs.loss, result.tokens + pairs.tokens, logs)

        planned = math.ceil((options.epochs or 3.0) * max(1, len(texts) // batch_size))
        peak_lr = options.lr or DEFAULT_CLASSIFY_LR
        summary["finetune"] = _train(
            "finetune classify", module, step_loss, planned, options, peak_lr, started
        )
    if options.refit_heads:
        # Phase 2 (alone with freeze_encoder): the heads on every training row of the frozen encoder.
        buckets = lexical_buckets(task.tokens) if options.lexical_buckets is None else options.lexical_buckets
        if buckets > 0:
            idf = inverse_document_frequencies(
                task.tokens, run.config.vocab_size, SPECIAL_IDS, buckets, MIN_DOCUMENT_FREQUENCY
            )
            module.lexical = LexicalHead(idf, run.config.vocab_size, len(labels)).to(device)
        summary["heads"] = _fit_heads(module, task, tokenizer, texts, options)
    summary.update(
        summary.get("finetune") or summary["heads"],
        kind="classify",
        freeze_encoder=options.freeze_encoder,
        lexical_buckets=module.lexical.buckets if module.lexical is not None else 0,
    )
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
    if module.lexical is not None:
        weights.update({f"lexical.{k}": v for k, v in module.lexical.state_dict().items()})
    # An embed init (or multi-task pairs) keeps embedding behaviour, so one bundle serves /embed and
    # /classify: the vectors are then normalised as an embed run's are.
    save_run(
        options.out,
        kind="classify",
        config=run.config,
        weights=weights,
        tokenizer_path=run.tokenizer_path,
        labels=labels,
        multi_label=options.multi_label,
        normalize=run.normalize or options.pairs is not None,
        matryoshka_dims=run.matryoshka_dims,
        # The embedding's lexical channel depends on the token ids alone, so it stays valid.
        sketch=run.build_sketch(),
        sketch_weight=run.sketch_weight,
        summary={**summary, "init": run.summary},
        parent=run.path,
    )
    return {"run": str(options.out), "labels": len(labels), **summary}


def build_sketch(pairs: Pairs, tokenizer: Any, vocab_size: int, dim: int, seed: int) -> LexicalSketch:
    """The lexical channel, with idf over the distinct texts of the training pairs."""
    texts = sorted({*pairs.queries, *pairs.positives, *(n for n in pairs.negatives if n is not None)})
    idf = inverse_document_frequencies(TokenizedTexts.encode(tokenizer, texts), vocab_size, SPECIAL_IDS)
    return LexicalSketch(idf, dim, seed)


def train_sketch_table(
    sketch: LexicalSketch, queries: TokenizedTexts, positives: TokenizedTexts, epochs: float, seed: int
) -> dict[str, Any]:
    """Train the lexical channel's table on (query, positive) pairs for `epochs` passes, counted in
    steps of LexicalSketch's batch so that the outcome does not depend on the machine, and for at least
    MIN_TABLE_STEPS steps."""
    started = time.perf_counter()
    batch = min(TABLE_BATCH, len(queries.ids))
    steps = max(math.ceil(epochs * len(queries.ids) / batch), MIN_TABLE_STEPS)
    losses = sketch.train_table(queries, positives, steps, seed)
    seconds = time.perf_counter() - started
    return {
        "steps": steps,
        "batch": batch,
        **{k: round(v, 4) for k, v in losses.items()},
        "seconds": round(seconds, 1),
    }


@torch.no_grad()
def sketch_texts(sketch: LexicalSketch, tokenizer: Any, texts: list[str]) -> torch.Tensor:
    tokens = TokenizedTexts.encode(tokenizer, texts)
    batches = tokens.length_sorted_batches(INFERENCE_BATCH)
    pieces = [sketch(*tokens.batch(rows)) for rows in batches]
    order = [row for rows in batches for row in rows]
    return torch.cat(pieces)[torch.argsort(torch.tensor(order))]


def choose_sketch_weight(
    encoder: Encoder, sketch: LexicalSketch, tokenizer: Any, held_out: Pairs, device: torch.device
) -> dict[float, float]:
    """MRR@10 of the held-out queries against the held-out positives for every weight in
    SKETCH_WEIGHTS: how much the lexical channel should count against this encoder on this data."""
    dense = InferenceModule(encoder, None)
    query_dense = infer(dense, tokenizer, held_out.queries, device, desc="held-out queries")[0]
    doc_dense = infer(dense, tokenizer, held_out.positives, device, desc="held-out positives")[0]
    sketch = sketch.to("cpu")
    query_lexical = sketch_texts(sketch, tokenizer, held_out.queries)
    doc_lexical = sketch_texts(sketch, tokenizer, held_out.positives)
    ids = [str(row) for row in range(len(held_out.queries))]
    scores = {}
    for weight in SKETCH_WEIGHTS:
        queries = hybrid_embedding(query_dense.cpu(), query_lexical, weight)
        documents = hybrid_embedding(doc_dense.cpu(), doc_lexical, weight)
        top = (queries @ documents.T).topk(min(10, len(ids)), dim=1).indices.tolist()
        ranked = [[ids[i] for i in row] for row in top]
        scores[weight] = retrieval_metrics(ranked, [{row} for row in ids])["mrr@10"]
    return scores


def finetune_embed(options: EmbedOptions) -> dict[str, Any]:
    run, device, started = _prepare(options)
    dims = [d for d in options.matryoshka if d < run.config.n_embd]
    if len(dims) != len(options.matryoshka):
        raise ModelError(f"matryoshka dims must be smaller than the model's dim {run.config.n_embd}")
    if options.lexical_dim < 0:
        raise ModelError(f"lexical_dim must be 0 (none) or positive, not {options.lexical_dim}")
    if options.lexical_epochs < 0:
        raise ModelError(
            f"lexical_epochs must be 0 (keep the random sketch) or more, not {options.lexical_epochs}"
        )
    tokenizer = load_tokenizer(run.tokenizer_path)
    pairs = read_pairs(options.train, options.limit)
    held_out = None
    if options.lexical_dim and options.lexical_weight is None:
        pairs, held_out = pairs.split_validation(options.seed)
    batch_size = options.batch_size or 64
    planned = math.ceil(options.epochs * max(1, len(pairs.queries) // batch_size))
    if options.teacher is not None and pairs.simcse:
        raise ModelError("--teacher distils on query/positive pairs; raw text is for `encoder distill`")
    if not 0 <= options.teacher_weight <= 1:
        raise ModelError(f"teacher weight must be within 0-1, not {options.teacher_weight}")
    mined = 0
    mine = options.mine_negatives and not pairs.simcse
    visited: list[int] = []
    if mine or options.teacher is not None:
        # The rows the schedule will visit (all of them when only a wall-clock budget bounds it): what
        # BM25 mines negatives for and the teacher runs on.
        steps = planned if options.max_steps is None else min(planned, options.max_steps)
        rows = len(pairs.queries)
        visited = sorted(
            {row for step in range(steps) for row in batch_rows(rows, batch_size, options.seed, step)}
        )
    teacher, teacher_summary = None, None
    if options.teacher is not None:
        teacher, teacher_summary = pair_teacher(options, pairs, visited)
    if mine:
        negatives, mined = mine_bm25_negatives(
            pairs.queries, pairs.positives, pairs.negatives, options.seed, rows=set(visited)
        )
        pairs = Pairs(pairs.queries, pairs.positives, negatives, simcse=False)
    encoder: Encoder = run.build_encoder().to(device)
    dropout = options.dropout if options.dropout is not None else (0.1 if pairs.simcse else 0.0)
    set_dropout(encoder, dropout)
    encoder.train()
    task = ContrastiveTask(
        pairs,
        tokenizer,
        encoder,
        device,
        batch_size,
        options.temperature,
        options.seed,
        symmetric=options.symmetric and not pairs.simcse,
        dims=dims,
        teacher=teacher,
    )
    summary = _train(
        "finetune embed", encoder, task.loss, planned, options, options.lr or DEFAULT_EMBED_LR, started
    )
    summary.update(
        kind="embed",
        simcse=pairs.simcse,
        pairs=len(task),
        hard_negatives=len(task.negative_rows),
        mined_negatives=mined,
        symmetric=task.symmetric,
        temperature=options.temperature,
        dropout=dropout,
        matryoshka_dims=dims,
    )
    summary.update(teacher_summary or {})
    sketch, sketch_weight = None, 0.0
    if options.lexical_dim:
        sketch = build_sketch(pairs, tokenizer, run.config.vocab_size, options.lexical_dim, options.seed)
        if options.lexical_epochs and not pairs.simcse:
            summary["lexical_table"] = train_sketch_table(
                sketch, task.queries, task.positives, options.lexical_epochs, options.seed
            )
        sketch_weight = DEFAULT_SKETCH_WEIGHT if options.lexical_weight is None else options.lexical_weight
        if held_out is not None:
            encoder.eval()
            validation = choose_sketch_weight(encoder, sketch, tokenizer, held_out, device)
            sketch_weight = max(validation, key=lambda weight: validation[weight])
            summary["held_out_mrr@10"] = {str(weight): round(mrr, 4) for weight, mrr in validation.items()}
        summary.update(lexical_dim=options.lexical_dim, lexical_weight=sketch_weight)
    weights = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    save_run(
        options.out,
        kind="embed",
        config=run.config,
        weights=weights,
        tokenizer_path=run.tokenizer_path,
        normalize=True,
        matryoshka_dims=dims,
        sketch=sketch,
        sketch_weight=sketch_weight,
        summary={**summary, "init": run.summary},
        parent=run.path,
    )
    return {"run": str(options.out), **summary}


def finetune_rerank(options: RerankOptions) -> dict[str, Any]:
    """The init RUN's encoder as a cross-encoder (model/cross_encoder.py: it starts as the init's
    bi-encoder, lexical sketch included), trained on (query, positive[, negative]) pairs; a pair without
    a negative gets a mined one (`negatives`) and every query also meets in-batch negatives."""
    run, device, started = _prepare(options)
    if options.in_batch_negatives < 0:
        raise ModelError(f"in_batch_negatives must be 0 or more, not {options.in_batch_negatives}")
    tokenizer = load_tokenizer(run.tokenizer_path)
    pairs = read_pairs(options.train, options.limit)
    if pairs.simcse:
        raise DataError(f"{options.train}: a reranker learns from {{query, positive}} rows, not raw text")
    batch_size = options.batch_size or 16
    if batch_size < 2 and options.in_batch_negatives:
        raise ModelError("in-batch negatives need a batch of at least 2 queries")
    planned = math.ceil(options.epochs * max(1, len(pairs.queries) // batch_size))
    negatives_from = options.negatives or ("first-stage" if run.kind == "embed" else "bm25")
    if negatives_from not in NEGATIVE_SOURCES:
        raise ModelError(f"negatives must be one of {', '.join(NEGATIVE_SOURCES)}, not {negatives_from!r}")
    hard: list[list[str]] = [[] if negative is None else [negative] for negative in pairs.negatives]
    mined = ranked = 0
    if negatives_from == "bm25":
        steps = planned if options.max_steps is None else min(planned, options.max_steps)
        rows = len(pairs.queries)
        visited = {row for step in range(steps) for row in batch_rows(rows, batch_size, options.seed, step)}
        negatives, mined = mine_bm25_negatives(
            pairs.queries, pairs.positives, pairs.negatives, options.seed, rows=visited
        )
        hard = [[] if negative is None else [negative] for negative in negatives]
    elif negatives_from == "first-stage":
        first_stage = run.inference_module().to(device)
        # Ranking every row costs a pass over the passages per query; a step budget needs far fewer
        # rows, so a seeded sample of FIRST_STAGE_SAMPLE times as many as it trains on is ranked.
        rows = list(range(len(pairs.queries)))
        if options.max_steps is not None and options.max_steps * batch_size * FIRST_STAGE_SAMPLE < len(rows):
            rows = sorted(
                random.Random(options.seed).sample(rows, options.max_steps * batch_size * FIRST_STAGE_SAMPLE)
            )
        ranked = len(rows)
        kept, found = first_stage_negatives(
            lambda texts, desc: infer(first_stage, tokenizer, texts, device, desc=desc)[0],
            pairs.queries,
            pairs.positives,
            options.seed,
            depth=FIRST_STAGE_DEPTH,
            count=FIRST_STAGE_NEGATIVES,
            rows=rows,
        )
        if len(kept) < batch_size:
            raise DataError(
                f"{options.train}: the init's embedding ranks only {len(kept)} positives in its top "
                f"{FIRST_STAGE_DEPTH}; give --negatives bm25"
            )
        pairs = pairs.select(kept)
        hard = [[*hard[row], *negatives] for row, negatives in zip(kept, found, strict=True)]
        mined = sum(len(negatives) for negatives in found)
        planned = math.ceil(options.epochs * max(1, len(kept) // batch_size))
    train_encoder = run.kind != "embed" if options.train_encoder is None else options.train_encoder
    module = CrossEncoder(run.build_encoder(), run.build_sketch(), run.sketch_weight).to(device)
    module.encoder.requires_grad_(train_encoder)
    module.train()
    task = RerankTask(
        pairs.queries,
        pairs.positives,
        hard,
        tokenizer,
        module,
        device,
        batch_size,
        options.in_batch_negatives,
        options.seed,
        run.config.max_seq_len,
    )
    task.calibrate()
    summary = _train(
        "finetune rerank", module, task.loss, planned, options, options.lr or DEFAULT_RERANK_LR, started
    )
    summary.update(
        kind="rerank",
        pairs=len(task),
        hard_negatives=sum(len(negatives) for negatives in hard),
        mined_negatives=mined,
        negatives_from=negatives_from,
        first_stage_ranked=ranked,
        trained_encoder=train_encoder,
        in_batch_negatives=options.in_batch_negatives,
        batch_size=batch_size,
    )
    weights = {
        (key if key.startswith("encoder.") else f"reranker.{key}"): value
        for key, value in module.state_dict().items()
    }
    save_run(
        options.out,
        kind="rerank",
        config=run.config,
        weights=weights,
        tokenizer_path=run.tokenizer_path,
        summary={**summary, "init": run.summary},
        parent=run.path,
    )
    return {"run": str(options.out), **summary}
