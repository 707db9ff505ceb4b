"""The parity gate refuses unfaithful graphs and writes nothing; edge cases, fp16 and the task metric."""

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from bundle.manifest import verify_bundle
from export import bundle_writer, parity
from export.bundle_writer import ExportOptions, write_bundle
from export.errors import ExportError
from export.onnx_graph import check_interface, example_inputs
from export.run_source import source_from_run


def _perturb_largest_initializer(path: Path, relative_noise: float) -> None:
    """Add Gaussian noise to the largest float weight of a saved graph (a tampered export)."""
    model = onnx.load(str(path))
    floats = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    target = max(floats, key=lambda tensor: int(np.prod(tensor.dims)))
    values = numpy_helper.to_array(target)
    noise = np.random.default_rng(0).normal(0.0, relative_noise * float(values.std()), values.shape)
    target.CopyFrom(numpy_helper.from_array((values + noise).astype(np.float32), target.name))
    onnx.save(model, str(path))


def _assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert [path.name for path in out.parent.iterdir() if path.name.startswith(".")] == []


def test_tampered_fp32_graph_is_refused(
    tiny_runs: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_export = bundle_writer.export_onnx

    def tampered_export(module: torch.nn.Module, path: Path, max_seq_len: int) -> list[str]:
        names = real_export(module, path, max_seq_len)
        _perturb_largest_initializer(path, relative_noise=0.01)
        return names

    monkeypatch.setattr(bundle_writer, "export_onnx", tampered_export)
    out = tmp_path / "bundle"
    with pytest.raises(
        parity.ParityError, match=r"fp32 parity gate failed: max_abs_diff = .*, must be <= 0.0001"
    ):
        write_bundle(source_from_run(tiny_runs.classify_run), out, ExportOptions(), lambda _: None)
    _assert_nothing_written(out)


def test_tampered_int8_graph_is_refused(
    tiny_runs: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_quantize = bundle_writer.quantize_int8

    def tampered_quantize(fp32_path: Path, out_path: Path, **options: Any) -> None:
        real_quantize(fp32_path, out_path, **options)
        _perturb_largest_initializer(out_path, relative_noise=1.0)

    monkeypatch.setattr(bundle_writer, "quantize_int8", tampered_quantize)
    out = tmp_path / "bundle"
    with pytest.raises(
        parity.ParityError, match=r"int8 parity gate failed: min_cosine = .*, must be >= 0.97"
    ):
        write_bundle(source_from_run(tiny_runs.classify_run), out, ExportOptions(), lambda _: None)
    _assert_nothing_written(out)


class _NanOnEmptyRows(torch.nn.Module):
    """Pools by dividing by the raw token count: NaN on an all-padding row, as a naive model would."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(512, 8)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor]:
        mask = attention_mask.unsqueeze(-1).float()
        return ((self.embedding(input_ids) * mask).sum(1) / mask.sum(1),)


def test_non_finite_output_on_all_padding_row_is_refused(tiny_runs: Any, tmp_path: Path) -> None:
    source = source_from_run(tiny_runs.embed_run)
    source.module = _NanOnEmptyRows()
    out = tmp_path / "bundle"
    with pytest.raises(parity.ParityError, match="non-finite embedding on the all_padding_row case"):
        write_bundle(source, out, ExportOptions(variants=["fp32"]), lambda _: None)
    _assert_nothing_written(out)


def test_fixed_axes_are_refused(tmp_path: Path) -> None:
    module = _NanOnEmptyRows().eval()
    path = tmp_path / "static.onnx"
    torch.onnx.export(
        module,
        example_inputs(),
        str(path),
        dynamo=True,
        input_names=["input_ids", "attention_mask"],
        output_names=["embedding"],
        external_data=False,
    )
    with pytest.raises(ExportError, match="must be symbolic"):
        check_interface(path, ["embedding"])


def test_edge_case_batches_cover_the_issue(tiny_runs: Any) -> None:
    source = source_from_run(tiny_runs.classify_run)
    batches = {
        batch.name: batch for batch in parity.build_batches(source.tokenizer, parity.BUILTIN_TEXTS, 32)
    }
    assert batches["batch_of_one"].input_ids.shape[0] == 1
    assert batches["length_one"].input_ids.shape == (1, 1)
    assert batches["max_length"].attention_mask.sum() == 32
    heavy = batches["heavy_padding"].attention_mask
    assert heavy.shape[1] == 32 and heavy.sum(axis=1).min() == 1
    assert batches["all_padding_row"].attention_mask[1].sum() == 0
    assert batches["texts"].input_ids.shape[0] == len(parity.BUILTIN_TEXTS)


def test_fp16_variant_and_task_metric_on_eval_data(tiny_runs: Any, tmp_path: Path) -> None:
    eval_path = tmp_path / "eval.jsonl"
    rows = [
        {"text": text, "label": ["animal", "plant", "tool"][i % 3]}
        for i, text in enumerate(parity.BUILTIN_TEXTS)
    ]
    eval_path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    options = ExportOptions(variants=["fp32", "int8", "fp16"], eval_data=parity.EvalData.read(eval_path))
    out = tmp_path / "bundle"
    write_bundle(source_from_run(tiny_runs.classify_run), out, options, lambda _: None)
    manifest = verify_bundle(out)
    assert set(manifest.variants) == {"fp32", "int8", "fp16"}
    assert manifest.preferred == {"cpu": "int8", "cuda": "fp16"}
    fp16 = manifest.variants["fp16"].parity
    assert fp16["min_cosine"] >= 0.999 and fp16["accuracy_drop"] <= 0.02
    fp32 = manifest.variants["fp32"].parity
    assert fp32["accuracy"] == fp32["torch_accuracy"] and 0 <= fp32["accuracy"] <= 1
    graph = onnx.load(str(out / "model.fp16.onnx")).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # keep_io_types


def test_metric_drop_beyond_the_limit_fails() -> None:
    thresholds = parity.ParityThresholds(max_metric_drop=0.02)
    assert (
        parity.check_metric("int8", {"accuracy": 0.8}, {"accuracy": 0.79}, thresholds)["accuracy_drop"] < 0.02
    )
    expected = r"int8 parity gate failed: accuracy drop vs PyTorch = 0\.05"
    with pytest.raises(parity.ParityError, match=expected):
        parity.check_metric("int8", {"accuracy": 0.8}, {"accuracy": 0.75}, thresholds)


def test_retrieval_pairs_metric(tiny_runs: Any, tmp_path: Path) -> None:
    source = source_from_run(tiny_runs.embed_run)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"query": t, "positive": t}) for t in parity.BUILTIN_TEXTS) + "\n")
    metric = parity.task_metric(
        parity.torch_runner(source.module), source.tokenizer, parity.EvalData.read(pairs), None
    )
    assert metric == {"recall@1": 1.0}  # identical query and positive always retrieve themselves


def test_fused_graph_is_gated_and_its_fusions_recorded(tiny_runs: Any, tmp_path: Path) -> None:
    # The default export: ONNX Runtime's fused graph is stored, and int8 is quantised from it.
    out = tmp_path / "bundle"
    write_bundle(source_from_run(tiny_runs.classify_run), out, ExportOptions(), lambda _: None)
    manifest = verify_bundle(out)
    fp32 = manifest.variants["fp32"]
    # The project's encoder (pre-norm, bias-free layer norms) gets ORT's attention and skip-layer-norm.
    assert any(fusion.startswith("MultiHeadAttentionx") for fusion in fp32.fusions)
    assert any(fusion.startswith("SkipLayerNormalizationx") for fusion in fp32.fusions)
    assert fp32.parity["max_abs_diff"] <= 1e-4
    domains = {node.domain for node in onnx.load(str(out / "model.onnx")).graph.node}
    assert "com.microsoft" in domains  # ORT contrib ops: the stored graph is the fused one
    int8_ops = {node.op_type for node in onnx.load(str(out / "model.int8.onnx")).graph.node}
    assert "SkipLayerNormalization" in int8_ops and "MatMulInteger" in int8_ops
    assert manifest.variants["int8"].parity["min_cosine"] >= 0.97
    assert manifest.preferred == {"cpu": "int8", "cuda": "fp32"}


def test_unfused_export_stores_the_plain_graph(tiny_runs: Any, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    options = ExportOptions(variants=["fp32"], fuse=False)
    write_bundle(source_from_run(tiny_runs.classify_run), out, options, lambda _: None)
    manifest = verify_bundle(out)
    assert manifest.variants["fp32"].fusions == []
    assert manifest.preferred == {"cpu": "fp32", "cuda": "fp32"}
    domains = {node.domain for node in onnx.load(str(out / "model.onnx")).graph.node}
    assert "com.microsoft" not in domains
