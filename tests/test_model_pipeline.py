"""End-to-end through the `encoder` CLI on a tiny model: tokenizer -> pretraining with falling loss ->
embedding and classification fine-tunes -> evaluation; resume equivalence; a 2-process DDP step."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import encoder_cli
from model.run import load_run

CATEGORIES = {
    "animal": ["dog", "cat", "horse", "sheep", "goat", "mouse", "lion", "tiger", "bear", "wolf"],
    "food": ["bread", "cheese", "apple", "soup", "rice", "pasta", "cake", "honey", "butter", "salad"],
    "tool": ["hammer", "saw", "drill", "wrench", "shovel", "chisel", "axe", "rake", "knife", "ladder"],
}
TEMPLATES = {
    "animal": ["the {w} runs across the field", "a wild {w} sleeps in the forest", "my {w} eats grass"],
    "food": ["we cook the {w} for dinner", "fresh {w} tastes sweet", "she bakes {w} in the oven"],
    "tool": ["he fixes the fence with a {w}", "the {w} cuts wood", "a heavy {w} hangs in the shed"],
}
TINY_TRAINING = "--preset tiny --batch-size 8 --threads 2 --no-progress --device cpu"
Capture = pytest.CaptureFixture[str]


def encoder(command: str, capsys: Capture) -> dict[str, Any]:
    """Run `encoder COMMAND` in-process and return the JSON object on its last stdout line."""
    capsys.readouterr()
    encoder_cli.main(command.split())
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def sentences(seed: int, count: int) -> list[tuple[str, str, str]]:
    """(category, word, sentence) triples from the templates."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        category = rng.choice(sorted(CATEGORIES))
        word = rng.choice(CATEGORIES[category])
        rows.append((category, word, rng.choice(TEMPLATES[category]).format(w=word)))
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_data")
    text = root / "corpus.txt"
    text.write_text("\n".join(sentence for _, _, sentence in sentences(0, 3000)) + "\n")
    train, test = sentences(1, 400), sentences(2, 90)
    write_jsonl(root / "classify_train.jsonl", [{"text": s, "label": c} for c, _, s in train])
    write_jsonl(root / "classify_test.jsonl", [{"text": s, "label": c} for c, _, s in test])
    write_jsonl(root / "pairs.jsonl", [{"query": w, "positive": s} for _, w, s in train])
    write_jsonl(root / "corpus.jsonl", [{"id": f"d{i}", "text": s} for i, (_, _, s) in enumerate(test[:30])])
    queries = [{"id": f"q{i}", "text": w, "relevant": [f"d{i}"]} for i, (_, w, _) in enumerate(test[:30])]
    write_jsonl(root / "queries.jsonl", queries)
    return {"root": root, "text": text}


@pytest.fixture(scope="module")
def tokenizer(corpus: dict[str, Path]) -> Path:
    path = corpus["root"] / "tokenizer.json"
    encoder_cli.main(
        ["tokenizer", "train", "--corpus", str(corpus["text"]), "--vocab-size", "200", "--out", str(path)]
    )
    return path


def metric_records(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def metric_losses(run: Path) -> list[float]:
    return [record["loss"] for record in metric_records(run)]


def test_mlm_objective_learns_from_context(
    corpus: dict[str, Path], tokenizer: Path, tmp_path: Path, capsys: Capture
) -> None:
    result = encoder(
        f"pretrain --tokenizer {tokenizer} --corpus {corpus['text']} --out {tmp_path} "
        "--max-steps 60 --lr 3e-3 " + TINY_TRAINING + " --batch-size 16",
        capsys,
    )
    assert result["objective"] == "mlm" and result["mask_prob"] == 0.3
    losses = metric_losses(tmp_path)
    # The decoder bias starts at the unigram log-frequencies, so the loss starts at the unigram
    # entropy (~3.9 here, not log(200) = 5.3); below it, the encoder is using the context.
    assert losses[0] < 4.2
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.05, losses
    # Sequence-length schedule: 64-token packs, then full-length ones for the last 10% of the steps,
    # at the same tokens per step.
    records = metric_records(tmp_path)
    assert [record["seq_len"] for record in records] == [64] * 54 + [128] * 6
    assert records[-1]["tokens"] == 60 * 16 * 64


def test_end_to_end(corpus: dict[str, Path], tokenizer: Path, tmp_path: Path, capsys: Capture) -> None:
    root, pre, embed, classify = corpus["root"], tmp_path / "pre", tmp_path / "embed", tmp_path / "classify"
    result = encoder(
        f"pretrain --tokenizer {tokenizer} --corpus {corpus['text']} --out {pre} --max-steps 60 --lr 3e-3 "
        "--objective electra " + TINY_TRAINING,
        capsys,
    )
    assert result["steps"] == 60 and result["finished"] and result["objective"] == "electra"
    records = metric_records(pre)
    # The generator's decoder bias starts at the unigram log-frequencies (~3.9 here, not log(200)).
    assert records[0]["generator_loss"] < 4.2
    detection = [record["detection_loss"] for record in records]
    # Chance for the discriminator is the entropy of the replaced share (~0.4 nats at 15%); below it,
    # the encoder is telling real tokens from the generator's.
    assert sum(detection[-10:]) / 10 < sum(detection[:10]) / 10 - 0.05, detection
    assert load_run(pre).kind == "pretrain"

    result = encoder(
        f"finetune embed --init {pre} --train {root / 'pairs.jsonl'} --out {embed} --max-steps 15 "
        "--batch-size 16 --matryoshka 16,32 --threads 2 --no-progress",
        capsys,
    )
    assert result["steps"] == 15 and result["pairs"] == 360  # a tenth held out to weigh the lexical channel
    # The lexical channel's table trained in steps of 256 pairs: 3 passes over 360 pairs make 5 steps,
    # fewer than the minimum.
    assert result["lexical_table"]["steps"] == 300 and result["lexical_table"]["batch"] == 256
    embed_run = load_run(embed)
    assert (embed_run.kind, embed_run.normalize, embed_run.matryoshka_dims) == ("embed", True, [16, 32])
    # Every query word occurs in its positive: exact-word evidence must rank the held-out pairs better
    # than 15 steps of a 2x64 encoder, and the weight chosen is the best one on them.
    held_out = {float(weight): mrr for weight, mrr in result["held_out_mrr@10"].items()}
    assert max(held_out.values()) > held_out[0.0] + 0.1, held_out
    lexical_weight = result["lexical_weight"]
    assert held_out[lexical_weight] == max(held_out.values())
    assert (embed_run.sketch_dim, embed_run.embedding_dim) == (768, 64 + 768)

    result = encoder(
        f"finetune classify --init {embed} --train {root / 'classify_train.jsonl'} --out {classify} "
        f"--eval {root / 'classify_test.jsonl'} --freeze-encoder --threads 2 "
        "--no-progress",
        capsys,
    )
    assert result["eval"]["accuracy"] > 0.5  # a linear head on 15-step features; chance is 1/3
    classify_run = load_run(classify)
    assert classify_run.labels == ["animal", "food", "tool"]
    assert (classify_run.normalize, classify_run.matryoshka_dims) == (True, [16, 32])
    for key, value in embed_run.weights.items():  # the lexical sketch's buffers carried over too
        assert torch.equal(classify_run.weights[key], value), f"--freeze-encoder changed {key}"
    assert (classify_run.sketch_dim, classify_run.sketch_weight) == (768, lexical_weight)

    scores = encoder(f"eval classify --model {classify} --data {root / 'classify_test.jsonl'}", capsys)
    assert scores["accuracy"] == pytest.approx(result["eval"]["accuracy"])
    assert 0 < scores["macro_f1"] <= 1
    scores = encoder(
        f"eval retrieval --model {classify} --queries {root / 'queries.jsonl'} "
        f"--corpus {root / 'corpus.jsonl'} --record",
        capsys,
    )
    assert set(scores) >= {"recall@1", "recall@10", "mrr@10"} and scores["recall@10"] >= scores["recall@1"]
    recorded = load_run(classify).summary
    assert recorded["retrieval_eval"] == scores and recorded["eval"] == result["eval"]  # nothing else lost

    # Multi-task: one encoder fine-tuned on the classes and the pairs together.
    multitask = tmp_path / "multitask"
    result = encoder(
        f"finetune classify --init {pre} --train {root / 'classify_train.jsonl'} --out {multitask} "
        f"--pairs {root / 'pairs.jsonl'} --eval {root / 'classify_test.jsonl'} --lr 3e-3 "
        "--threads 2 --no-progress",
        capsys,
    )
    assert result["eval"]["accuracy"] > 0.6  # chance is 1/3; the pairs compete for a 2x32 encoder
    assert result["multitask_pairs"] == 400
    records = metric_records(multitask)
    contrastive = [record["contrastive_loss"] for record in records]
    assert sum(contrastive[-5:]) / 5 < sum(contrastive[:5]) / 5 - 0.1, contrastive
    assert all(
        record["loss"] == pytest.approx(record["classify_loss"] + record["contrastive_loss"], rel=1e-4)
        for record in records
    )
    assert load_run(multitask).normalize  # it now serves embeddings: vectors are normalised


def test_full_finetune_and_simcse(
    corpus: dict[str, Path], tokenizer: Path, tmp_path: Path, capsys: Capture
) -> None:
    random_init = tmp_path / "random"
    encoder(
        f"pretrain --tokenizer {tokenizer} --corpus {corpus['text']} --out {random_init} --max-steps 0 "
        + TINY_TRAINING,
        capsys,
    )
    result = encoder(
        f"finetune classify --init {random_init} --train {corpus['root'] / 'classify_train.jsonl'} "
        f"--out {tmp_path / 'classify'} --max-steps 5 --limit 100 --threads 2 --no-progress",
        capsys,
    )
    assert result["steps"] == 5 and result["examples"] == 100 and not result["freeze_encoder"]
    # The fine-tune is followed by the heads' L-BFGS fit on every row, which adds the lexical head;
    # --no-refit-heads keeps the fine-tune's own linear head alone.
    assert (
        result["heads"]["method"] == "lbfgs" and load_run(tmp_path / "classify").build_lexical() is not None
    )
    result = encoder(
        f"finetune classify --init {random_init} --train {corpus['root'] / 'classify_train.jsonl'} "
        f"--out {tmp_path / 'kept'} --max-steps 5 --limit 100 --no-refit-heads --threads 2 --no-progress",
        capsys,
    )
    assert "heads" not in result and load_run(tmp_path / "kept").build_lexical() is None
    multi = write_jsonl(
        tmp_path / "multi.jsonl",
        [{"text": s, "labels": [c, "any"] if i % 2 else [c]} for i, (c, _, s) in enumerate(sentences(3, 64))],
    )
    result = encoder(
        f"finetune classify --init {random_init} --train {multi} --out {tmp_path / 'multi'} --multi-label "
        "--max-steps 3 --threads 2 --no-progress",
        capsys,
    )
    assert result["labels"] == 4 and load_run(tmp_path / "multi").multi_label
    scores = encoder(f"eval classify --model {tmp_path / 'multi'} --data {multi}", capsys)
    assert 0 <= scores["accuracy"] <= 1 and 0 <= scores["macro_f1"] <= 1
    result = encoder(
        f"finetune embed --init {random_init} --train {corpus['text']} --out {tmp_path / 'simcse'} "
        "--max-steps 5 --batch-size 16 --threads 2 --no-progress",
        capsys,
    )
    assert result["simcse"] and result["dropout"] == 0.1


def test_resume_gives_the_same_loss_curve(
    corpus: dict[str, Path], tokenizer: Path, tmp_path: Path, capsys: Capture
) -> None:
    common = f"pretrain --tokenizer {tokenizer} --corpus {corpus['text']} --max-steps 8 " + TINY_TRAINING
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    encoder(f"{common} --out {straight}", capsys)
    result = encoder(f"{common} --out {interrupted} --stop-after-steps 3", capsys)
    assert result["steps"] == 3 and not result["finished"]
    assert not (interrupted / "model.safetensors").exists()
    encoder(f"{common} --out {interrupted} --resume", capsys)
    resumed_losses = metric_losses(interrupted)
    assert len(resumed_losses) == 8
    assert resumed_losses == pytest.approx(metric_losses(straight), rel=1e-5)
    for key, value in load_run(straight).weights.items():
        torch.testing.assert_close(load_run(interrupted).weights[key], value, rtol=1e-5, atol=1e-6)


def test_ddp_two_processes_with_gloo(corpus: dict[str, Path], tokenizer: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "encoder_cli", *f"pretrain --tokenizer {tokenizer} --corpus {corpus['text']}".split()]
    command += f"--out {out} --max-steps 2 --preset tiny --batch-size 4 --threads 1 --device cpu".split()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = [json.loads(line) for line in completed.stdout.splitlines() if line.startswith('{"run"')]
    assert len(results) == 2 and all(r["world_size"] == 2 and r["steps"] == 2 for r in results)
    losses = metric_losses(out)
    assert len(losses) == 2 and all(0 < loss < 100 for loss in losses)
    assert load_run(out).kind == "pretrain"
