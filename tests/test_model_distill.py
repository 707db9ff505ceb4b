"""`encoder distill` on tiny models: the teacher is a tiny bundle from the project's own export (random
weights, so only distillation can teach the student its outputs), the student a random `tiny` preset.

A student must come closer to the teacher on held-out text, and must not when the cached targets are
shuffled against the texts; the teacher cache is reused and resumed; a --match-teacher-space bundle
answers in the teacher's space; the classifier learns the teacher's soft labels; torchrun works."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import TINY_LABELS, TinyRuns

import encoder_cli
from bundle.manifest import MANIFEST_FILE, file_sha256, load_manifest
from model.errors import ModelError
from model.teacher import Teacher, open_cache

Capture = pytest.CaptureFixture[str]
WORDS = [
    "the",
    "dog",
    "a",
    "cat",
    "an",
    "old",
    "oak",
    "hammer",
    "small",
    "fern",
    "saw",
    "horse",
    "rose",
    "sees",
    "needs",
    "grows",
    "near",
    "breaks",
    "likes",
    "holds",
    "follows",
    "covers",
    "garden",
    "wooden",
    "box",
    "river",
    "bank",
    "some",
    "water",
    "green",
    "leaf",
    "barn",
    "nail",
]
TRAINING = "--preset tiny --batch-size 32 --epochs 5 --threads 2 --no-progress --device cpu --lr 2e-3"


def encoder(command: str, capsys: Capture) -> dict[str, Any]:
    capsys.readouterr()
    encoder_cli.main(command.split())
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def texts(seed: int, count: int) -> list[str]:
    """Distinct word sequences of 3-9 words: held-out rows are never seen in training."""
    rng = random.Random(seed)
    chosen: dict[str, None] = {}
    while len(chosen) < count:
        chosen[" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9)))] = None
    return list(chosen)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("distill_data") / "corpus.txt"
    path.write_text("\n".join(texts(0, 1500)) + "\n")
    return path


def distill(
    capsys: Capture, teacher: Path, corpus: Path, out: Path, cache: Path, tiny_runs: TinyRuns, extra: str = ""
) -> dict[str, Any]:
    return encoder(
        f"distill --teacher {teacher} --corpus {corpus} --out {out} --cache-dir {cache} "
        f"--tokenizer {tiny_runs.tokenizer} --holdout 150 {TRAINING} {extra}",
        capsys,
    )


def test_distillation_brings_the_student_closer_on_held_out_text_and_reuses_the_cache(
    tiny_bundle_no_classifier: Path, tiny_runs: TinyRuns, corpus: Path, tmp_path: Path, capsys: Capture
) -> None:
    cache = tmp_path / "cache"
    first = distill(
        capsys, tiny_bundle_no_classifier, corpus, tmp_path / "a", cache, tiny_runs, "--max-steps 120"
    )
    report = first["distill"]["teacher_pass"]
    assert report["computed_rows"] == 1500 and report["reused_rows"] == 0
    before = first["distill"]["agreement_before"]["similarity_correlation"]
    after = first["teacher"]["agreement"]["similarity_correlation"]
    assert after > 0.8 and after > before + 0.3, (before, after)
    # Without --match-teacher-space the RUN keeps the student's own 64-dim space, and by default no
    # projection to the teacher's 32 dims is trained (the relational term alone needs none).
    assert first["distill"]["direct_loss"] == "none" and not first["distill"]["projection"]
    assert "cosine" not in first["teacher"]["agreement"]

    second = distill(
        capsys, tiny_bundle_no_classifier, corpus, tmp_path / "b", cache, tiny_runs, "--max-steps 1"
    )
    report = second["distill"]["teacher_pass"]
    assert report["computed_rows"] == 0 and report["reused_rows"] == 1500
    assert report["cache"] == first["distill"]["teacher_pass"]["cache"]


def test_shuffled_teacher_targets_teach_nothing(
    tiny_bundle_no_classifier: Path,
    tiny_runs: TinyRuns,
    corpus: Path,
    tmp_path: Path,
    capsys: Capture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The control for the test above: the same run with the cached rows permuted against the texts."""
    import model.distill

    def shuffled(path: Path) -> Any:
        outputs = open_cache(path)
        order = np.random.default_rng(0).permutation(len(outputs.embeddings))
        return type(outputs)(np.asarray(outputs.embeddings)[order], None)

    monkeypatch.setattr(model.distill, "open_cache", shuffled)
    result = distill(
        capsys,
        tiny_bundle_no_classifier,
        corpus,
        tmp_path / "s",
        tmp_path / "c",
        tiny_runs,
        "--max-steps 120",
    )
    assert result["teacher"]["agreement"]["similarity_correlation"] < 0.5


def test_teacher_cache_rows_follow_the_texts_and_resume_after_an_interruption(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    teacher = Teacher(tiny_bundle, threads=1)
    corpus = texts(1, 200)
    report = teacher.cached_outputs(corpus, tmp_path, progress=False)
    assert (report.computed_rows, report.reused_rows) == (200, 0)

    def alone(index: int) -> Any:
        input_ids = np.array([teacher.tokenizer.encode(corpus[index]).ids], dtype=np.int64)
        return teacher.runtime.run(input_ids, np.ones_like(input_ids))

    # Row i holds text i's outputs: checked one text at a time against the runtime (no batching).
    cached = open_cache(report.path)
    assert cached.logits is not None and cached.logits.shape == (200, len(TINY_LABELS))
    for index in range(0, 200, 7):
        np.testing.assert_allclose(cached.embeddings[index], alone(index).embeddings[0], atol=1e-4)
        np.testing.assert_allclose(cached.logits[index], alone(index).logits[0], atol=1e-4)

    # An interrupted pass: progress says one batch is done, every row written after it is garbage.
    embeddings = np.load(report.path / "embedding.npy", mmap_mode="r+")
    embeddings[:] = np.nan
    embeddings.flush()
    (report.path / "progress.json").write_text(json.dumps({"batches_done": 1}))
    with pytest.raises(ModelError, match="incomplete"):
        open_cache(report.path)
    resumed = teacher.cached_outputs(corpus, tmp_path, progress=False)
    assert (resumed.computed_rows, resumed.reused_rows) == (136, 64)
    cached = open_cache(resumed.path)
    # The first batch was trusted, not recomputed (so it still holds what the "interrupted" pass left).
    kept = np.isnan(cached.embeddings).any(axis=1)
    assert int(kept.sum()) == 64
    for index in np.flatnonzero(~kept)[::5]:
        np.testing.assert_allclose(cached.embeddings[index], alone(int(index)).embeddings[0], atol=1e-4)


def test_match_teacher_space_bundle_answers_in_the_teachers_space(
    tiny_bundle_no_classifier: Path, tiny_runs: TinyRuns, corpus: Path, tmp_path: Path, capsys: Capture
) -> None:
    run, bundle = tmp_path / "student", tmp_path / "bundle"
    result = distill(
        capsys,
        tiny_bundle_no_classifier,
        corpus,
        run,
        tmp_path / "cache",
        tiny_runs,
        "--max-steps 120 --match-teacher-space",
    )
    before, after = result["distill"]["agreement_before"]["cosine"], result["teacher"]["agreement"]["cosine"]
    assert result["teacher"]["shared_space"] and after > 0.75 and after > before + 0.2, (before, after)
    encoder(f"export --model {run} --out {bundle} --variants fp32", capsys)
    manifest = load_manifest(bundle)
    assert manifest.embedding.dim == 32 and manifest.teacher is not None
    assert manifest.teacher.sha256 == file_sha256(tiny_bundle_no_classifier / MANIFEST_FILE)
    assert manifest.teacher.name == "tiny" and manifest.teacher.shared_space
    assert manifest.teacher.agreement == result["teacher"]["agreement"]

    # Held-out texts through both bundles' graphs: the student's vectors sit next to the teacher's.
    held_out = texts(7, 64)
    teacher = Teacher(tiny_bundle_no_classifier, threads=1).outputs(held_out).embeddings
    student = Teacher(bundle, threads=1).outputs(held_out).embeddings
    unit = lambda v: v / np.linalg.norm(v, axis=1, keepdims=True)  # noqa: E731
    cosines = (unit(student) * unit(teacher)).sum(axis=1)
    assert float(cosines.mean()) > 0.75, cosines

    queries = tmp_path / "queries.jsonl"
    documents = tmp_path / "documents.jsonl"
    queries.write_text(
        "".join(
            json.dumps({"id": f"q{i}", "text": t, "relevant": [f"d{i}"]}) + "\n"
            for i, t in enumerate(held_out)
        )
    )
    documents.write_text(
        "".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(held_out))
    )
    compared = encoder(
        f"eval retrieval --model {run} --teacher {tiny_bundle_no_classifier} "
        f"--queries {queries} --corpus {documents}",
        capsys,
    )
    # Queries identical to their documents: the teacher finds each at rank 1, and so does mixed search.
    assert compared["teacher"]["recall@1"] == 1.0
    assert compared["mixed"]["recall@10"] > 0.9 and compared["mixed_vs_teacher_recall@10"] > 0.9


def test_finetune_embed_learns_the_teachers_similarities_on_pairs(
    tiny_bundle_no_classifier: Path, tiny_runs: TinyRuns, tmp_path: Path, capsys: Capture
) -> None:
    """`finetune embed --teacher`: pairs whose positives are unrelated to their queries teach InfoNCE
    nothing about the teacher, so the held-out similarity structure comes from the soft targets alone:
    it must move towards the teacher's, and InfoNCE alone on the same pairs must not get there."""
    words = texts(3, 2400)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps({"query": q, "positive": p}) + "\n"
            for q, p in zip(words[:1200], words[1200:], strict=True)
        )
    )
    held_out = texts(11, 64)
    queries, documents = tmp_path / "queries.jsonl", tmp_path / "documents.jsonl"
    queries.write_text(
        "".join(
            json.dumps({"id": f"q{i}", "text": t, "relevant": ["d0"]}) + "\n" for i, t in enumerate(held_out)
        )
    )
    documents.write_text(
        "".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(held_out))
    )
    init = tmp_path / "init"
    encoder(
        f"pretrain --corpus {tiny_runs.corpus} --tokenizer {tiny_runs.tokenizer} --preset tiny "
        f"--max-steps 0 --seed 5 --threads 2 --no-progress --out {init}",
        capsys,
    )

    def correlation(run: Path) -> float:
        compared = encoder(
            f"eval retrieval --model {run} --teacher {tiny_bundle_no_classifier} "
            f"--queries {queries} --corpus {documents}",
            capsys,
        )
        return float(compared["agreement"]["similarity_correlation"])

    cache = tmp_path / "cache"
    common = (
        f"--train {pairs} --cache-dir {cache} --teacher {tiny_bundle_no_classifier} --lexical-dim 0 "
        "--batch-size 32 --max-steps 120 --lr 2e-3 --threads 2 --no-progress --device cpu"
    )
    taught = encoder(
        f"finetune embed --init {init} --out {tmp_path / 'taught'} --teacher-weight 1 {common}", capsys
    )
    assert taught["teacher_pass"]["computed_texts"] == 2 * taught["teacher_pass"]["pairs"] > 0
    before, after = correlation(init), correlation(tmp_path / "taught")
    assert after > 0.8 and after > before + 0.3, (before, after)
    encoder(f"export --model {tmp_path / 'taught'} --out {tmp_path / 'bundle'} --variants fp32", capsys)
    recorded = load_manifest(tmp_path / "bundle").teacher
    assert recorded is not None and not recorded.shared_space
    assert recorded.sha256 == file_sha256(tiny_bundle_no_classifier / MANIFEST_FILE)

    # The same schedule reuses the cache; InfoNCE alone on these unrelated pairs does not get there.
    alone = encoder(
        f"finetune embed --init {init} --out {tmp_path / 'alone'} --teacher-weight 0 {common}", capsys
    )
    assert alone["teacher_pass"]["computed_texts"] == 0
    assert correlation(tmp_path / "alone") < after - 0.3


def test_classifier_learns_the_teachers_soft_labels(
    tiny_bundle: Path, tiny_runs: TinyRuns, corpus: Path, tmp_path: Path, capsys: Capture
) -> None:
    lines = corpus.read_text().splitlines()
    teacher_labels = Teacher(tiny_bundle, threads=1).outputs(lines).logits.argmax(axis=1)  # type: ignore[union-attr]
    rows = tmp_path / "corpus.jsonl"
    # One row in 50 carries its own label (hard targets, mixed with the teacher's soft ones).
    rows.write_text(
        "".join(
            json.dumps({"text": text, **({"label": TINY_LABELS[teacher_labels[i]]} if i % 50 == 0 else {})})
            + "\n"
            for i, text in enumerate(lines)
        )
    )
    run = tmp_path / "student"
    result = distill(capsys, tiny_bundle, rows, run, tmp_path / "cache", tiny_runs, "--max-steps 120")
    assert result["kind"] == "classify" and result["distill"]["hard_labels"]
    before = result["distill"]["agreement_before"]["label_agreement"]
    after = result["teacher"]["agreement"]["label_agreement"]
    # The random teacher's logits differ by ~0.1 between classes, a hard target for 120 steps; chance
    # (the random student) agrees on 0.45 of the held-out rows.
    assert after > before + 0.15, (before, after)
    data = tmp_path / "eval.jsonl"
    data.write_text(
        "".join(
            json.dumps({"text": t, "label": TINY_LABELS[i % 3]}) + "\n" for i, t in enumerate(texts(9, 60))
        )
    )
    compared = encoder(f"eval classify --model {run} --teacher {tiny_bundle} --data {data}", capsys)
    assert compared["mode"] == "classifier" and 0 <= compared["student_accuracy"] <= 1
    assert compared["agreement"]["label_agreement"] > 0.5


def test_distill_errors_are_one_line(
    tiny_bundle: Path, corpus: Path, tmp_path: Path, capsys: Capture
) -> None:
    with pytest.raises(SystemExit) as raised:
        encoder_cli.main(f"distill --teacher {tiny_bundle} --corpus {corpus} --out {tmp_path / 'x'}".split())
    assert raised.value.code == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith("a random-init student needs --tokenizer (or give --init RUN)")
    )
    with pytest.raises(SystemExit):
        encoder_cli.main(
            f"distill --teacher {tmp_path} --corpus {corpus} --out {tmp_path / 'x'} --init {tmp_path}".split()
        )
    assert "manifest not found" in capsys.readouterr().err


def test_distill_under_torchrun_with_two_processes(
    tiny_bundle_no_classifier: Path, tiny_runs: TinyRuns, corpus: Path, tmp_path: Path
) -> None:
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "encoder_cli", "distill", "--teacher", str(tiny_bundle_no_classifier)]
    command += f"--corpus {corpus} --out {out} --cache-dir {tmp_path / 'cache'}".split()
    command += f"--tokenizer {tiny_runs.tokenizer}".split()
    command += [
        "--preset",
        "tiny",
        "--max-steps",
        "2",
        "--batch-size",
        "8",
        "--threads",
        "1",
        "--device",
        "cpu",
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = [json.loads(line) for line in completed.stdout.splitlines() if line.startswith('{"run"')]
    assert len(results) == 2 and all(r["world_size"] == 2 and r["steps"] == 2 for r in results)
    assert json.loads((out / "run.json").read_text())["summary"]["teacher"]["name"] == "tiny"
