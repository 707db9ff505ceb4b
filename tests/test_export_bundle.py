"""The bundle written by the export path: interface, manifest round-trip, checksums, CLI, atomic writes."""

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import pytest
from tokenizers import Tokenizer

from bundle.manifest import BundleError, Manifest, load_manifest, verify_bundle
from export.errors import ExportError

EDGE_CASES = ["texts", "batch_of_one", "length_one", "max_length", "heavy_padding", "all_padding_row"]


def test_tiny_bundle_records_every_parity_figure(tiny_bundle: Path) -> None:
    manifest = verify_bundle(tiny_bundle)
    assert set(manifest.variants) == {"fp32", "int8"}
    assert manifest.classifier is not None and manifest.classifier.labels == ["animal", "plant", "tool"]
    fp32 = manifest.variants["fp32"].parity
    for case in EDGE_CASES:
        assert 0 <= fp32[f"max_abs_diff_{case}"] <= 1e-4
    assert fp32["batched_vs_single_max_abs_diff"] <= 1e-4
    int8 = manifest.variants["int8"].parity
    assert 0.97 <= int8["min_cosine"] <= int8["mean_cosine"] <= 1.0 + 1e-6
    assert int8["top1_agreement"] > 0.5
    assert manifest.embedding.dim == manifest.architecture.hidden_size == 32
    assert manifest.embedding.normalize is True and manifest.max_seq_len == 32


@pytest.mark.parametrize("variant_file", ["model.onnx", "model.int8.onnx"])
def test_graph_interface_has_symbolic_axes_and_runs_any_shape(tiny_bundle: Path, variant_file: str) -> None:
    graph = onnx.load(str(tiny_bundle / variant_file)).graph
    assert [value.name for value in graph.input] == ["input_ids", "attention_mask"]
    assert [value.name for value in graph.output] == ["embedding", "logits"]
    for value in graph.input:
        assert value.type.tensor_type.elem_type == onnx.TensorProto.INT64
        assert all(dim.dim_param for dim in value.type.tensor_type.shape.dim)
    session = onnxruntime.InferenceSession(
        str(tiny_bundle / variant_file), providers=["CPUExecutionProvider"]
    )
    for batch, sequence in [(1, 1), (5, 3), (3, 32)]:
        ids = np.full((batch, sequence), 7, dtype=np.int64)
        embedding, logits = session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
        assert embedding.shape == (batch, 32) and logits.shape == (batch, 3)


def test_the_lexical_head_is_in_the_exported_logits(tiny_runs: Any, tiny_bundle: Path) -> None:
    import torch

    from model.data import TokenizedTexts
    from model.encoder import InferenceModule
    from model.run import load_run

    run = load_run(tiny_runs.classify_run)
    lexical = run.build_lexical()
    assert lexical is not None
    texts = ["the dog sees the garden.", "a small fern covers a green leaf.", "the saw breaks a nail nail."]
    input_ids, attention_mask = TokenizedTexts.encode(
        Tokenizer.from_file(str(tiny_runs.tokenizer)), texts
    ).batch([0, 1, 2])
    with torch.no_grad():
        encoder = run.build_encoder().eval()
        whole = InferenceModule(encoder, run.build_classifier(), lexical)(input_ids, attention_mask)[1]
        linear_only = InferenceModule(encoder, run.build_classifier())(input_ids, attention_mask)[1]
    session = onnxruntime.InferenceSession(
        str(tiny_bundle / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    feed = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}
    logits = session.run(["logits"], feed)[0]
    np.testing.assert_allclose(logits, whole.numpy(), atol=1e-4)
    assert np.abs(logits - linear_only.numpy()).max() > 0.01


def test_opset_and_no_external_data(tiny_bundle: Path) -> None:
    model = onnx.load(str(tiny_bundle / "model.onnx"), load_external_data=False)
    assert max(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")) >= 18
    assert not any(onnx.external_data_helper.uses_external_data(t) for t in model.graph.initializer)
    assert sorted(path.name for path in tiny_bundle.iterdir()) == [
        "manifest.json",
        "model.int8.onnx",
        "model.onnx",
        "tokenizer.json",
    ]


def test_bundle_tokenizer_truncates_at_max_seq_len_without_padding(tiny_bundle: Path) -> None:
    tokenizer = Tokenizer.from_file(str(tiny_bundle / "tokenizer.json"))
    assert len(tokenizer.encode("dog " * 100).ids) == 32
    assert len(tokenizer.encode("dog").ids) == 3  # [CLS] dog [SEP], no padding


def test_manifest_round_trip(tiny_bundle: Path, tmp_path: Path) -> None:
    manifest = load_manifest(tiny_bundle)
    manifest.write(tmp_path)
    again = load_manifest(tmp_path)
    assert again == manifest
    assert Manifest.model_validate_json(manifest.model_dump_json()) == manifest
    assert json.loads((tiny_bundle / "manifest.json").read_text())["format_version"] == 1


def test_manifest_without_classifier(tiny_bundle_no_classifier: Path) -> None:
    manifest = verify_bundle(tiny_bundle_no_classifier)
    assert manifest.classifier is None
    graph = onnx.load(str(tiny_bundle_no_classifier / "model.onnx")).graph
    assert [value.name for value in graph.output] == ["embedding"]


@pytest.mark.parametrize("tampered", ["model.onnx", "model.int8.onnx", "tokenizer.json"])
def test_sha256_mismatch_is_detected(tiny_bundle: Path, tmp_path: Path, tampered: str) -> None:
    copy = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    data = bytearray((copy / tampered).read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / tampered).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=rf"{tampered}: sha256 mismatch"):
        verify_bundle(copy)


def test_manifest_schema_mismatch_is_detected(tiny_bundle: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = 2
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="format_version"):
        verify_bundle(copy)


def test_manifest_refuses_a_preferred_variant_it_does_not_hold(tiny_bundle: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["preferred"] = {"cuda": "fp16"}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="preferred cuda variant fp16 is not one of the variants"):
        verify_bundle(copy)


def test_export_cli_writes_bundle_and_refuses_to_overwrite(
    tiny_runs: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from encoder_cli import main

    out = tmp_path / "cli_bundle"
    argv = ["export", "--model", str(tiny_runs.embed_run), "--out", str(out), "--variants", "fp32"]
    main(argv)
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["bundle"] == str(out) and set(result["variants"]) == {"fp32"}
    assert verify_bundle(out).name == "embed"
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "already exists" in capsys.readouterr().err
    for bad_flags, message in [
        (["--prompt", "query"], "expected NAME=TEXT"),
        (["--prompt", "query=query: ", "--default-prompt-name", "passage"], "not one of the prompts"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--force", *bad_flags])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    prompts = ["--prompt", "query=query: ", "--prompt", "passage=passage: ", "--default-prompt-name", "query"]
    main([*argv, "--force", "--version", "2", *prompts])
    manifest = verify_bundle(out)
    assert manifest.version == "2"
    assert manifest.embedding.prompts == {"query": "query: ", "passage": "passage: "}
    assert manifest.embedding.default_prompt_name == "query"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cli_bundle"]  # no staging left behind
    assert out.stat().st_mode & 0o755 == 0o755  # readable by the service's (possibly other) user


def test_export_refuses_unknown_variant(tiny_runs: Any, tmp_path: Path) -> None:
    from export.bundle_writer import ExportOptions, write_bundle
    from export.run_source import source_from_run

    source = source_from_run(tiny_runs.classify_run)
    with pytest.raises(ExportError, match="variants must include fp32"):
        write_bundle(source, tmp_path / "b", ExportOptions(variants=["int8"]), lambda _: None)
    with pytest.raises(ExportError, match="variants must include fp32"):
        write_bundle(source, tmp_path / "b", ExportOptions(variants=["fp32", "bf16"]), lambda _: None)
    assert not (tmp_path / "b").exists()


def test_lexical_channel_exports_through_the_gates(tiny_runs: Any, tmp_path: Path) -> None:
    """An embed run with a lexical channel whose table was trained (dense, unlike the count sketch it
    starts as): the graph computes the unit-norm hybrid embedding, whose lexical part is the channel's,
    and the fp32 and int8 gates pass."""
    import torch

    from export.bundle_writer import ExportOptions, write_bundle
    from export.run_source import source_from_run
    from model.lexical import LexicalSketch
    from model.run import load_run, save_run

    embed = load_run(tiny_runs.embed_run)
    idf = torch.linspace(0.5, 3.0, embed.config.vocab_size)
    idf[:5] = 0.0
    sketch = LexicalSketch(idf, dim=16, seed=1)
    sketch.table.add_(0.3 * torch.randn(sketch.table.shape, generator=torch.Generator().manual_seed(1)))
    run = save_run(
        tmp_path / "run",
        kind="embed",
        config=embed.config,
        weights=embed.weights,
        tokenizer_path=embed.tokenizer_path,
        normalize=True,
        sketch=sketch,
        sketch_weight=4.0,
    )
    bundle = tmp_path / "bundle"
    write_bundle(
        source_from_run(run, name="lexical"),
        bundle,
        ExportOptions(variants=["fp32", "int8"]),
        lambda _: None,
    )
    manifest = verify_bundle(bundle)
    assert manifest.embedding.dim == 32 + 16
    assert manifest.variants["fp32"].parity["max_abs_diff_texts"] <= 1e-4
    tokenizer = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    texts = ["the wolf howls at night", "a wolf howls", "we cook rice for dinner"]
    encodings = [tokenizer.encode(text).ids for text in texts]
    width = max(map(len, encodings))
    ids = np.array([row + [0] * (width - len(row)) for row in encodings], dtype=np.int64)
    mask = (ids != 0).astype(np.int64)
    session = onnxruntime.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    (embedding,) = session.run(None, {"input_ids": ids, "attention_mask": mask})
    np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1.0, atol=1e-5)
    # The lexical part is the run's sketch of these ids, scaled by sqrt(w / (1 + w)).
    expected = sketch(torch.from_numpy(ids), torch.from_numpy(mask)).numpy() * (4.0 / 5.0) ** 0.5
    np.testing.assert_allclose(embedding[:, 32:], expected, atol=1e-5)
