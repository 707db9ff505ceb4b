"""The encoder as a cross-encoder: pair encoding, the training loss of `encoder finetune rerank`
(model/finetune.py drives it through the one TrainLoop) and `encoder eval rerank`.

A cross-encoder reads a query and a passage together, `[CLS] query [SEP] passage [SEP]`, and scores
their relevance with one logit (model/cross_encoder.py: the bi-encoder's similarity of the two texts,
plus what a block that reads them together adds), which a bi-encoder (one vector per text) cannot
compute. It is too slow to search a corpus with, so it reranks the top candidates of a first stage
(BM25 or the bi-encoder).

The encoder has no token-type embeddings: the graph finds the two texts by the [SEP] between them.
These are the ids the tokenizer's pair template writes (model/tokenizer.py), which is what the service
sends the exported graph. A long pair is cut from the passage's end, never the query's.
"""

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bm25s
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from tqdm import tqdm

from bundle.contract import pad_to_longest
from model.cross_encoder import SIMILARITY_SCALE, CrossEncoder
from model.errors import ModelError
from model.evaluate import INFERENCE_BATCH, infer, read_retrieval_data
from model.metrics import ranking_metrics
from model.run import load_run
from model.tokenizer import CLS_ID, PAD_ID, SEP_ID, load_tokenizer
from model.training import StepResult, batch_rows

LENGTH_CHUNK = 32  # pairs per forward pass in training, length-sorted (less padding)
DEFAULT_DEPTH = 50  # first-stage candidates reranked per query
CALIBRATION_BATCHES = 8  # batches the scale and offset are fitted on before training


def text_ids(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text without special tokens: the pieces pairs are assembled from."""
    return [encoding.ids for encoding in tokenizer.encode_batch(texts, add_special_tokens=False)]


def encode_pair(query_ids: list[int], passage_ids: list[int], max_seq_len: int) -> list[int]:
    """[CLS] query [SEP] passage [SEP] in at most max_seq_len ids, cut from the passage's end. A query
    of more than half of max_seq_len tokens (rare in training data) keeps its first half, so that a
    passage always fits; the service refuses such a query instead (it never cuts a query)."""
    query_ids = query_ids[: max_seq_len // 2]
    room = max_seq_len - len(query_ids) - 3
    return [CLS_ID, *query_ids, SEP_ID, *passage_ids[:room], SEP_ID]


def over_pairs(
    score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    pairs: list[list[int]],
    device: torch.device,
    chunk: int,
) -> torch.Tensor:
    """`score(input_ids, attention_mask)` -> (B, ...) of each pair-encoded input, in order. Pairs run in
    length-sorted chunks, each padded only to its own longest; attention never sees padding, so the
    result is the same."""
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i]))
    pieces = []
    for start in range(0, len(order), chunk):
        input_ids, attention_mask = pad_to_longest([pairs[i] for i in order[start : start + chunk]], PAD_ID)
        pieces.append(
            score(torch.from_numpy(input_ids).to(device), torch.from_numpy(attention_mask).to(device))
        )
    inverse = torch.argsort(torch.tensor(order, device=device))
    return torch.cat(pieces)[inverse]


def pair_logits(
    module: CrossEncoder, pairs: list[list[int]], device: torch.device, chunk: int
) -> torch.Tensor:
    """The relevance logit of each pair-encoded input (N,), in order."""
    return over_pairs(lambda input_ids, mask: module(input_ids, mask)[1][:, 0], pairs, device, chunk)


class RerankTask:
    """(query, positive, hard negatives) rows, tokenised once; `loss(step)` scores each query of batch
    `step` against its positive, its hard negatives (given or mined) and `in_batch_negatives` positives
    of other rows of the batch.

    The loss is listwise, softmax cross-entropy with the positive as the target among the query's
    candidates (what ranks), plus pointwise binary cross-entropy of every pair against its label (what
    makes sigmoid(logit), the served score, read as a probability of relevance)."""

    def __init__(
        self,
        queries: list[str],
        positives: list[str],
        negatives: list[list[str]],
        tokenizer: Tokenizer,
        module: CrossEncoder,
        device: torch.device,
        batch_size: int,
        in_batch_negatives: int,
        seed: int,
        max_seq_len: int,
    ) -> None:
        self.module, self.device, self.batch_size, self.seed = module, device, batch_size, seed
        self.in_batch_negatives, self.max_seq_len = in_batch_negatives, max_seq_len
        texts = list(dict.fromkeys([*queries, *positives, *(n for row in negatives for n in row)]))
        position = {text: index for index, text in enumerate(texts)}
        self.ids = text_ids(tokenizer, texts)
        self.queries = [position[text] for text in queries]
        self.positives = [position[text] for text in positives]
        self.negatives = [[position[text] for text in row] for row in negatives]

    def __len__(self) -> int:
        return len(self.queries)

    def candidates(self, rows: list[int]) -> list[list[int]]:
        """Per row of the batch, the text indexes of its candidate passages, the positive first. A
        passage equal to the positive is never its negative, nor is the positive of another row with
        the same query (it is relevant too)."""
        groups = []
        for place, row in enumerate(rows):
            group = [self.positives[row]]
            group.extend(negative for negative in dict.fromkeys(self.negatives[row]) if negative != group[0])
            wanted = len(group) + self.in_batch_negatives
            for offset in range(1, len(rows)):
                if len(group) == wanted:
                    break
                other_row = rows[(place + offset) % len(rows)]
                other = self.positives[other_row]
                if other not in group and self.queries[other_row] != self.queries[row]:
                    group.append(other)
            groups.append(group)
        return groups

    def batch_pairs(self, step: int) -> tuple[list[list[int]], list[list[int]]]:
        """Batch `step`'s pair-encoded inputs, group after group, each group's positive first; the groups."""
        rows = batch_rows(len(self), self.batch_size, self.seed, step)
        groups = self.candidates(rows)
        pairs = [
            encode_pair(self.ids[self.queries[row]], self.ids[passage], self.max_seq_len)
            for row, group in zip(rows, groups, strict=True)
            for passage in group
        ]
        return pairs, groups

    def calibrate(self, batches: int = CALIBRATION_BATCHES) -> None:
        """Fit the cross-encoder's scale, offset and MaxSim weight to the loss on the first `batches`
        batches, before training. While the head is zero the logits are scale * (similarity - offset) +
        maxsim_weight * MaxSim: a logistic regression on two features. The bi-encoder's similarity comes
        with the contrastive fine-tune's scale, far too confident on hard negatives, and three scalars
        move too slowly at the training's learning rate for the head not to spend its first steps
        making up for them."""
        module = self.module
        seen = []
        with torch.no_grad():
            for step in range(batches):
                pairs, groups = self.batch_pairs(step)
                features = over_pairs(
                    lambda input_ids, mask: torch.stack(
                        module.first_stage_scores(input_ids, mask)[:2], dim=1
                    ),
                    pairs,
                    self.device,
                    LENGTH_CHUNK,
                )
                seen.append((features.cpu(), groups))
        scale = torch.tensor(SIMILARITY_SCALE, requires_grad=True)
        offset = torch.zeros((), requires_grad=True)
        maxsim_weight = torch.zeros((), requires_grad=True)
        optimizer = torch.optim.LBFGS(
            [scale, offset, maxsim_weight], max_iter=100, line_search_fn="strong_wolfe"
        )

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            total = torch.zeros(())
            for features, groups in seen:
                logits = scale * (features[:, 0] - offset) + maxsim_weight * features[:, 1]
                listwise, pointwise = group_losses(logits, groups)
                total = total + listwise + pointwise
            total.backward()
            return total

        optimizer.step(closure)  # type: ignore[no-untyped-call]
        with torch.no_grad():
            module.scale.fill_(float(scale))
            module.offset.fill_(float(offset))
            module.maxsim_weight.fill_(float(maxsim_weight))

    def loss(self, step: int) -> StepResult:
        pairs, groups = self.batch_pairs(step)
        listwise, pointwise = group_losses(pair_logits(self.module, pairs, self.device, LENGTH_CHUNK), groups)
        logs = {"listwise_loss": listwise.item(), "pointwise_loss": pointwise.item()}
        return StepResult(listwise + pointwise, sum(len(pair) for pair in pairs), logs)


def group_losses(logits: torch.Tensor, groups: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(listwise, pointwise) losses of the logits of groups of pairs laid out one after the other, each
    group's positive first: softmax cross-entropy of the positive among its group, and binary
    cross-entropy of every pair against its label."""
    width = max(len(group) for group in groups)
    scores = torch.full((len(groups), width), float("-inf"), device=logits.device)
    labels = torch.zeros(len(logits), device=logits.device)
    flat = 0
    for place, group in enumerate(groups):
        scores[place, : len(group)] = logits[flat : flat + len(group)]
        labels[flat] = 1.0
        flat += len(group)
    listwise = F.cross_entropy(scores, torch.zeros(len(groups), dtype=torch.long, device=logits.device))
    return listwise, F.binary_cross_entropy_with_logits(logits, labels)


def bm25_candidates(queries: list[str], documents: list[str], depth: int) -> list[list[int]]:
    """The `depth` best documents of each query by BM25 (bm25s, English stopwords), best first."""
    index = bm25s.BM25()
    index.index(bm25s.tokenize(documents, stopwords="en", show_progress=False), show_progress=False)
    hits, _ = index.retrieve(
        bm25s.tokenize(queries, stopwords="en", show_progress=False),
        k=min(depth, len(documents)),
        show_progress=False,
    )
    return hits.tolist()


def embedding_candidates(
    run_dir: Path, queries: list[str], documents: list[str], depth: int
) -> list[list[int]]:
    """The `depth` best documents of each query by the cosine of a bi-encoder RUN's embeddings."""
    run = load_run(run_dir)
    if run.kind == "rerank":
        raise ModelError(f"{run_dir}: a rerank run is not a first stage; give an embed run or bm25")
    tokenizer = load_tokenizer(run.tokenizer_path)
    module = run.inference_module()
    device = torch.device("cpu")
    query_vectors = F.normalize(infer(module, tokenizer, queries, device, desc="queries")[0], dim=1)
    doc_vectors = F.normalize(infer(module, tokenizer, documents, device, desc="corpus")[0], dim=1)
    ranked = []
    for start in range(0, len(queries), 1024):
        scores = query_vectors[start : start + 1024] @ doc_vectors.T  # (Q, D)
        ranked.extend(scores.topk(min(depth, len(documents)), dim=1).indices.tolist())
    return ranked


@torch.no_grad()
def rerank_candidates(
    module: CrossEncoder,
    tokenizer: Tokenizer,
    max_seq_len: int,
    queries: list[str],
    documents: list[str],
    candidates: list[list[int]],
) -> list[list[int]]:
    """Each query's candidates ordered by the cross-encoder's relevance logit, best first."""
    module.eval()
    query_ids = text_ids(tokenizer, queries)
    wanted = sorted({doc for row in candidates for doc in row})
    doc_ids = dict(zip(wanted, text_ids(tokenizer, [documents[doc] for doc in wanted]), strict=True))
    reranked = []
    device = torch.device("cpu")
    for query, row in tqdm(
        list(zip(query_ids, candidates, strict=True)), desc="rerank", file=sys.stderr, leave=False
    ):
        pairs = [encode_pair(query, doc_ids[doc], max_seq_len) for doc in row]
        logits = pair_logits(module, pairs, device, INFERENCE_BATCH)
        reranked.append([row[i] for i in torch.argsort(logits, descending=True, stable=True).tolist()])
    return reranked


def evaluate_rerank(
    model_path: Path,
    queries_path: Path,
    corpus_path: Path,
    first_stage: str = "bm25",
    depth: int = DEFAULT_DEPTH,
    limit: int | None = None,
) -> dict[str, Any]:
    """MRR@10 and nDCG@10 of the first stage's ranking (BM25, or the RUN at `first_stage`) and of its top
    `depth` reranked by the cross-encoder RUN at `model_path`; the reranking's cost per query."""
    run = load_run(model_path)
    if run.kind != "rerank":
        raise ModelError(f"{model_path}: a {run.kind} run has no rerank head (use a finetune rerank run)")
    if depth < 1:
        raise ModelError(f"depth must be at least 1, not {depth}")
    data = read_retrieval_data(queries_path, corpus_path)
    queries, relevant = data.query_texts[:limit], data.relevant[:limit]
    if first_stage == "bm25":
        candidates = bm25_candidates(queries, data.doc_texts, depth)
    else:
        candidates = embedding_candidates(Path(first_stage), queries, data.doc_texts, depth)
    started = time.perf_counter()
    tokenizer = load_tokenizer(run.tokenizer_path)
    reranked = rerank_candidates(
        run.build_reranker().eval(), tokenizer, run.config.max_seq_len, queries, data.doc_texts, candidates
    )
    seconds = time.perf_counter() - started

    def named(rankings: list[list[int]]) -> list[list[str]]:
        return [[data.doc_ids[doc] for doc in row] for row in rankings]

    first = ranking_metrics(named(candidates), relevant)
    ceiling = sum(bool(set(row) & wanted) for row, wanted in zip(named(candidates), relevant, strict=True))
    result = ranking_metrics(named(reranked), relevant)
    return {
        "first_stage": {"name": first_stage, **first, f"hit@{depth}": ceiling / len(queries)},
        "reranked": result,
        "mrr@10_gain": result["mrr@10"] - first["mrr@10"],
        "ndcg@10_gain": result["ndcg@10"] - first["ndcg@10"],
        "rerank_ms_per_query": round(1000 * seconds / len(queries), 2),
        "queries": len(queries),
        "corpus": len(data.doc_ids),
        "depth": depth,
        "model": str(model_path),
    }
