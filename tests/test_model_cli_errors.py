"""Bad input to the model/ commands: one line on stderr naming the problem, exit status 2, no traceback."""

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import encoder_cli


@pytest.fixture(scope="module")
def files(tiny_runs: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The suite's tiny classify RUN, its tokenizer and corpus, and a few broken input files."""
    root = tmp_path_factory.mktemp("cli_errors")
    (root / "empty.txt").write_text("\n  \n")
    (root / "data.jsonl").write_text(json.dumps({"text": "x", "label": "zebra"}) + "\n")
    (root / "bad.jsonl").write_text('{"text": "x", "label": "a"}\nnot json\n')
    return {
        "root": root,
        "corpus": tiny_runs.corpus,
        "tokenizer": tiny_runs.tokenizer,
        "run": tiny_runs.classify_run,
    }


def fails_with(argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        encoder_cli.main(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(lines)
    assert expected in lines[-1], lines
    if not argv[0].startswith("--") and "usage" not in lines[0]:
        assert len(lines) == 1, lines


def test_missing_corpus_and_empty_corpus(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(files["root"] / "nope.txt")
    fails_with(
        ["tokenizer", "train", "--corpus", missing, "--out", "x.json"],
        "nope.txt: corpus file not found",
        capsys,
    )
    empty = str(files["root"] / "empty.txt")
    fails_with(["tokenizer", "train", "--corpus", empty, "--out", "x.json"], "corpus is empty", capsys)
    args = [
        "pretrain",
        "--tokenizer",
        str(files["tokenizer"]),
        "--corpus",
        empty,
        "--out",
        str(files["root"] / "p"),
    ]
    fails_with([*args, "--max-steps", "1"], "corpus is empty", capsys)


def test_pretrain_needs_a_schedule_and_a_tokenizer(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(files["root"] / "p")
    args = ["pretrain", "--corpus", str(files["corpus"]), "--out", out, "--preset", "tiny"]
    fails_with([*args, "--tokenizer", str(files["tokenizer"])], "--max-steps or --budget-minutes", capsys)
    fails_with(
        [*args, "--tokenizer", str(files["corpus"]), "--max-steps", "1"], "not a valid tokenizer.json", capsys
    )


def test_unknown_label_at_eval(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    data = str(files["root"] / "data.jsonl")
    fails_with(
        ["eval", "classify", "--model", str(files["run"]), "--data", data], "'zebra' is not one of", capsys
    )
    bad = str(files["root"] / "bad.jsonl")
    fails_with(
        ["eval", "classify", "--model", str(files["run"]), "--data", bad],
        "bad.jsonl:2: not valid JSON",
        capsys,
    )


def test_corrupt_checkpoint(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    broken = files["root"] / "broken"
    broken.mkdir()
    for name in ("config.json", "run.json", "tokenizer.json"):
        (broken / name).write_bytes((files["run"] / name).read_bytes())
    (broken / "model.safetensors").write_bytes((files["run"] / "model.safetensors").read_bytes()[:100])
    data = str(files["root"] / "data.jsonl")
    fails_with(["eval", "classify", "--model", str(broken), "--data", data], "corrupt checkpoint", capsys)
    fails_with(
        ["finetune", "embed", "--init", str(files["root"] / "absent"), "--train", data, "--out", "o"],
        "run directory not found",
        capsys,
    )
    resume = files["root"] / "resume"
    (resume / "checkpoint").mkdir(parents=True)
    (resume / "checkpoint" / "state.json").write_text("{}")
    args = [
        "pretrain",
        "--tokenizer",
        str(files["tokenizer"]),
        "--corpus",
        str(files["corpus"]),
        "--out",
        str(resume),
    ]
    fails_with(
        [*args, "--preset", "tiny", "--max-steps", "2", "--resume"],
        "corrupt or incompatible checkpoint",
        capsys,
    )


def test_wrong_flags_and_missing_wordnet(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    args = ["pretrain", "--tokenizer", "t", "--corpus", "c", "--out", "o"]
    fails_with([*args, "--bogus"], "unrecognized arguments: --bogus", capsys)
    fails_with(["pretrain", "--corpus", "c"], "the following arguments are required: --tokenizer", capsys)
    fails_with([*args, "--preset", "huge"], "invalid choice", capsys)
    fails_with([*args, "--max-steps", "-3"], "must be >= 0", capsys)
    fails_with(
        ["data", "wordnet", "--out", "o", "--wordnet-dir", "/nonexistent"],
        "install Debian's wordnet-base",
        capsys,
    )


def test_heads_fit_options(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    args = ["finetune", "classify", "--init", str(files["run"]), "--train", str(files["root"] / "data.jsonl")]
    args += ["--out", str(files["root"] / "heads")]
    fails_with(
        [*args, "--freeze-encoder", "--no-refit-heads"], "the heads' fit is the whole training", capsys
    )
    fails_with([*args, "--head-c", "0"], "--head-c", capsys)


def test_a_classify_run_from_before_the_tfidf_head(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import load_file, save_file

    old = files["root"] / "old-heads"
    old.mkdir()
    for name in ("config.json", "run.json", "tokenizer.json"):
        (old / name).write_bytes((files["run"] / name).read_bytes())
    weights = {
        k: v for k, v in load_file(files["run"] / "model.safetensors").items() if not k.startswith("lexical.")
    }
    save_file(weights | {"lexical.table.weight": torch.zeros(10, 4)}, old / "model.safetensors")
    data = old / "data.jsonl"
    data.write_text(json.dumps({"text": "the dog sees the garden.", "label": "animal"}) + "\n")
    fails_with(["eval", "classify", "--model", str(old), "--data", str(data)], "fit the heads again", capsys)


def test_console_script_prints_one_line(files: dict[str, Path]) -> None:
    """Through the real entry point, in a fresh process."""
    console_script = Path(sys.executable).parent / "encoder"
    command = [str(console_script), "eval", "retrieval", "--model", str(files["run"])]
    command += [
        "--queries",
        str(files["root"] / "missing.jsonl"),
        "--corpus",
        str(files["root"] / "data.jsonl"),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines() == [
        f"encoder eval: error: {files['root'] / 'missing.jsonl'}: file not found"
    ]
