"""The cross-encoder's training pieces on tiny data: the pair encoding is the tokenizer's template cut
from the passage side, the loss ranks the positive first (an oracle that reads the query in the pair
gets a near-zero loss, the inverted oracle a large one), a short `encoder finetune rerank` learns,
exports and evaluates, and nDCG@10 is computed as defined."""

import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer
from torch import nn

from encoder_cli import main
from model.cross_encoder import SIMILARITY_SCALE, CrossEncoder
from model.metrics import ranking_metrics
from model.rerank import CALIBRATION_BATCHES, RerankTask, encode_pair, text_ids
from model.run import load_run
from model.tokenizer import SEP_ID, load_tokenizer
from service.tokenization import TextTokenizer

SUBJECTS = ["the dog", "a cat", "an old oak", "the hammer", "a small fern", "the saw", "a horse", "the rose"]
OBJECTS = ["garden", "wooden box", "river bank", "water", "green leaf", "barn", "nail"]


def pairs_rows() -> list[dict[str, str]]:
    """The query is an object; its positive mentions it, its negative another object. Every passage is
    a positive for one query and a negative for others, so only reading the query and the passage
    together ranks them."""
    rng = random.Random(0)
    rows = []
    for target in OBJECTS:
        for subject in SUBJECTS:
            other = rng.choice([name for name in OBJECTS if name != target])
            rows.append(
                {
                    "query": target,
                    "positive": f"{subject} grows near the {target}.",
                    "negative": f"{rng.choice(SUBJECTS)} grows near the {other}.",
                }
            )
    return rows


def pairs_task(tokenizer: Tokenizer, module: CrossEncoder) -> RerankTask:
    """A RerankTask over pairs_rows(): each row's negative, 3 in-batch negatives, batches of 8."""
    rows = pairs_rows()
    return RerankTask(
        [row["query"] for row in rows],
        [row["positive"] for row in rows],
        [[row["negative"]] for row in rows],
        tokenizer,
        module,
        torch.device("cpu"),
        batch_size=8,
        in_batch_negatives=3,
        seed=0,
        max_seq_len=32,
    )


def test_pair_encoding_is_the_template_the_service_uses_cut_from_the_passage(tiny_runs: Any) -> None:
    tokenizer = load_tokenizer(tiny_runs.tokenizer)
    query, passage = "the old oak", "a small fern grows near the river bank."
    ids = encode_pair(*text_ids(tokenizer, [query, passage]), max_seq_len=32)
    assert ids == tokenizer.encode(query, passage).ids
    service = TextTokenizer(tiny_runs.tokenizer, 32)
    assert service.encode([(query, passage)], pair_cut="only_second").token_ids == [ids]

    long_passage = " ".join([passage] * 10)
    cut = encode_pair(*text_ids(tokenizer, [query, long_passage]), max_seq_len=32)
    query_ids = tokenizer.encode(query, add_special_tokens=False).ids
    assert len(cut) == 32 and cut[1 : 1 + len(query_ids)] == query_ids and cut[len(query_ids) + 1] == SEP_ID
    assert cut[-1] == SEP_ID
    (served,) = service.encode([(query, long_passage)], pair_cut="only_second").token_ids
    assert served == cut


class Oracle(nn.Module):
    """Scores a pair-encoded row +5 when the query's tokens reappear after the first [SEP], -5 when not
    (or the reverse): a perfect reranker, if and only if the pairs carry the query and the passage."""

    def __init__(self, sign: float) -> None:
        super().__init__()
        self.sign = sign
        self.weight = nn.Parameter(torch.ones(()))  # something for backward() to reach

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        scores = []
        for row in input_ids.tolist():
            first_sep = row.index(SEP_ID)
            query, passage = row[1:first_sep], row[first_sep + 1 :]
            found = all(token in passage for token in query)
            scores.append(5.0 if found else -5.0)
        logits = self.sign * torch.tensor(scores)[:, None] * self.weight
        return torch.zeros(len(scores), 4), logits


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_the_loss_wants_the_positive_first(tiny_runs: Any, sign: float) -> None:
    task = pairs_task(Tokenizer.from_file(str(tiny_runs.tokenizer)), Oracle(sign))  # type: ignore[arg-type]
    batch = [0, 8, 16, 24, 32, 40, 48, 1]  # a row of each object, then a second "garden" row
    groups = task.candidates(batch)
    assert all(
        len(group) == 5 and group[0] == task.positives[row] for row, group in zip(batch, groups, strict=True)
    )
    assert all(group[1:2] == task.negatives[row] for row, group in zip(batch, groups, strict=True))
    assert task.positives[0] not in groups[7]  # another "garden" row's positive is relevant, not a negative
    loss = task.loss(0).loss.item()
    if sign > 0:
        assert loss < 0.05
    else:
        assert loss > 5


def test_train_encoder_fine_tunes_the_encoders_layers_too(
    tiny_runs: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train = tmp_path / "pairs.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in pairs_rows()))
    out = tmp_path / "rerank"
    main(
        [
            *["finetune", "rerank", "--init", str(tiny_runs.embed_run), "--train", str(train)],
            *["--out", str(out), "--max-steps", "3", "--batch-size", "8", "--train-encoder", "--no-progress"],
            *["--negatives", "none", "--device", "cpu", "--threads", "1"],
        ]
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["trained_encoder"] is True and summary["negatives_from"] == "none"
    init, run = load_run(tiny_runs.embed_run), load_run(out)
    changed = [key for key in init.weights if not torch.equal(init.weights[key], run.weights[key])]
    assert any(key.startswith("encoder.blocks.") for key in changed)


def test_first_stage_negatives_rank_a_sample_sized_to_the_step_budget(
    tiny_runs: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train = tmp_path / "pairs.jsonl"
    rows = [{"query": row["query"], "positive": row["positive"]} for row in pairs_rows()]  # no negatives
    train.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "rerank"
    main(
        [
            *["finetune", "rerank", "--init", str(tiny_runs.embed_run), "--train", str(train)],
            *["--out", str(out), "--max-steps", "1", "--batch-size", "4", "--no-progress"],
            *["--device", "cpu", "--threads", "1"],
        ]
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # One step of 4 queries: 6 x 4 of the 56 rows are ranked; those kept get 3 negatives each.
    assert summary["negatives_from"] == "first-stage" and summary["first_stage_ranked"] == 24
    assert 4 <= summary["pairs"] <= 24 and summary["mined_negatives"] == 3 * summary["pairs"]


def test_calibration_fits_the_first_stage_scores_to_the_loss(tiny_runs: Any) -> None:
    run = load_run(tiny_runs.embed_run)
    module = CrossEncoder(run.build_encoder())
    task = pairs_task(load_tokenizer(run.tokenizer_path), module)

    def calibration_loss() -> float:
        with torch.no_grad():
            return sum(task.loss(step).loss.item() for step in range(CALIBRATION_BATCHES))

    before = calibration_loss()
    task.calibrate()
    assert calibration_loss() < before
    assert module.scale.item() != SIMILARITY_SCALE and module.maxsim_weight.item() != 0.0
    assert module.head.weight.detach().abs().sum().item() == 0.0  # the head is left to training


def test_ndcg_and_mrr_at_10() -> None:
    metrics = ranking_metrics([["a", "x", "b"], ["x", "y"]], [{"a", "b"}, {"z"}])
    ideal = 1 + 1 / math.log2(3)
    assert metrics["ndcg@10"] == pytest.approx((1 + 1 / math.log2(4)) / ideal / 2)
    assert metrics["mrr@10"] == pytest.approx(0.5)


@pytest.mark.slow
def test_finetune_rerank_learns_exports_and_evaluates(
    tiny_runs: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = pairs_rows()
    train = tmp_path / "pairs.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "rerank"
    common = ["--no-progress", "--device", "cpu", "--threads", "1", "--seed", "0"]
    arguments = ["finetune", "rerank", "--init", str(tiny_runs.embed_run), "--train", str(train)]
    main([*arguments, "--out", str(out), "--epochs", "40", "--batch-size", "8", "--lr", "3e-3", *common])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["kind"] == "rerank" and summary["final_loss"] < summary["first_loss"] * 0.5
    run = load_run(out)
    assert run.kind == "rerank" and run.build_reranker() is not None
    # From an embed run the encoder's layers stay frozen: the reranker keeps the bi-encoder's similarity.
    init = load_run(tiny_runs.embed_run)
    assert summary["trained_encoder"] is False
    assert all(
        torch.equal(init.weights[key], run.weights[key]) for key in init.weights if key.startswith("encoder.")
    )

    # The training passages as a corpus, each object's query relevant to the passages that mention it.
    corpus = tmp_path / "corpus.jsonl"
    queries = tmp_path / "queries.jsonl"
    corpus.write_text(
        "".join(json.dumps({"id": f"d{i}", "text": row["positive"]}) + "\n" for i, row in enumerate(rows))
    )
    relevant = {
        target: [f"d{i}" for i, row in enumerate(rows) if row["query"] == target] for target in OBJECTS
    }
    queries.write_text(
        "".join(
            json.dumps({"id": target, "text": target, "relevant": relevant[target]}) + "\n"
            for target in OBJECTS
        )
    )
    main(
        [
            "eval",
            "rerank",
            "--model",
            str(out),
            "--queries",
            str(queries),
            "--corpus",
            str(corpus),
            "--depth",
            "20",
        ]
    )
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["queries"] == len(OBJECTS) and report["depth"] == 20
    assert report["reranked"]["mrr@10"] >= 0.9 and 0 <= report["reranked"]["ndcg@10"] <= 1

    bundle = tmp_path / "bundle"
    main(["export", "--model", str(out), "--out", str(bundle), "--eval", str(train)])
    exported = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert exported["variants"]["int8"]["mrr@10_drop"] <= 0.02
    assert exported["variants"]["fp32"]["mrr@10"] >= 0.9
