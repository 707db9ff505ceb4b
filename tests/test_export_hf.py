"""import-hf on a tiny BertModel built here (plain and sentence-transformers layout) matches transformers."""

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import pytest
import torch
from tokenizers import Tokenizer

from bundle.manifest import verify_bundle
from export.bundle_writer import ExportOptions, write_bundle
from export.hf_import import sentence_transformers_layout, sentence_transformers_prompts, source_from_hf

transformers = pytest.importorskip("transformers")

TEXTS = ["the dog sees the garden.", "a nail", "the old oak grows near the river bank and covers the barn."]


@pytest.fixture(scope="module")
def tiny_bert_dir(tiny_runs: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer BertModel saved with save_pretrained, plus the tiny WordPiece tokenizer."""
    vocab_size = Tokenizer.from_file(str(tiny_runs.tokenizer)).get_vocab_size()
    config = transformers.BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model_dir = tmp_path_factory.mktemp("hf") / "tiny-bert"
    transformers.BertModel(config).save_pretrained(str(model_dir))
    shutil.copyfile(tiny_runs.tokenizer, model_dir / "tokenizer.json")
    return model_dir


def _transformers_hidden(model_dir: Path, tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """last_hidden_state straight from transformers, for the texts padded into one batch."""
    encodings = tokenizer.encode_batch(TEXTS)
    length = max(len(encoding.ids) for encoding in encodings)
    ids = np.zeros((len(TEXTS), length), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, encoding in enumerate(encodings):
        ids[row, : len(encoding.ids)] = encoding.ids
        mask[row, : len(encoding.ids)] = 1
    model = transformers.AutoModel.from_pretrained(str(model_dir)).eval()
    with torch.inference_mode():
        hidden = model(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)
        ).last_hidden_state
    return hidden.numpy(), ids, mask


def _onnx_embedding(
    bundle: Path, ids: np.ndarray, mask: np.ndarray, variant_file: str = "model.onnx"
) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(bundle / variant_file), providers=["CPUExecutionProvider"])
    return session.run(None, {"input_ids": ids, "attention_mask": mask})[0]


def test_import_plain_bert_matches_transformers_mean_pooling(tiny_bert_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    write_bundle(source_from_hf(tiny_bert_dir), out, ExportOptions(), lambda _: None)
    manifest = verify_bundle(out)
    assert manifest.source == "import-hf:tiny-bert" and manifest.classifier is None
    assert manifest.architecture.kind == "hf-bert" and manifest.architecture.num_layers == 2
    assert manifest.embedding.pooling == "mean" and manifest.max_seq_len == 64
    hidden, ids, mask = _transformers_hidden(tiny_bert_dir, Tokenizer.from_file(str(out / "tokenizer.json")))
    expected = (hidden * mask[..., None]).sum(axis=1) / mask.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(_onnx_embedding(out, ids, mask), expected, atol=1e-4)
    # The stored graph is ONNX Runtime's fused one (the reference recipe's fusions), int8 quantises it.
    fused_ops = {fusion.split("x")[0] for fusion in manifest.variants["fp32"].fusions}
    assert "SkipLayerNormalization" in fused_ops and fused_ops & {"Attention", "MultiHeadAttention"}
    assert manifest.preferred["cpu"] == "int8"
    int8 = _onnx_embedding(out, ids, mask, "model.int8.onnx")
    cosines = (int8 * expected).sum(axis=1) / np.linalg.norm(int8, axis=1) / np.linalg.norm(expected, axis=1)
    assert cosines.min() >= 0.97


def test_import_sentence_transformers_layout_honours_pooling_and_normalize(
    tiny_bert_dir: Path, tmp_path: Path
) -> None:
    st_dir = shutil.copytree(tiny_bert_dir, tmp_path / "st-model")
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (st_dir / "modules.json").write_text(json.dumps(modules))
    (st_dir / "1_Pooling").mkdir()
    pooling = {
        "word_embedding_dimension": 32,
        "pooling_mode_cls_token": True,
        "pooling_mode_mean_tokens": False,
    }
    (st_dir / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    (st_dir / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 16}))
    st_config = {"prompts": {"query": "query: ", "document": ""}, "default_prompt_name": "query"}
    (st_dir / "config_sentence_transformers.json").write_text(json.dumps(st_config))

    out = tmp_path / "bundle"
    write_bundle(source_from_hf(st_dir), out, ExportOptions(variants=["fp32"]), lambda _: None)
    manifest = verify_bundle(out)
    assert manifest.embedding.pooling == "cls" and manifest.embedding.normalize is True
    assert manifest.max_seq_len == 16
    assert manifest.embedding.prompts == {"query": "query: ", "document": ""}
    assert manifest.embedding.default_prompt_name == "query"
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert len(tokenizer.encode(TEXTS[2] * 10).ids) == 16
    hidden, ids, mask = _transformers_hidden(st_dir, tokenizer)
    np.testing.assert_allclose(_onnx_embedding(out, ids, mask), hidden[:, 0], atol=1e-4)


def test_sentence_transformers_layout_without_normalize_and_unsupported_pooling(
    tiny_bert_dir: Path, tmp_path: Path
) -> None:
    from export.errors import ExportError

    st_dir = shutil.copytree(tiny_bert_dir, tmp_path / "st-mean")
    modules = [{"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (st_dir / "modules.json").write_text(json.dumps(modules))
    (st_dir / "1_Pooling").mkdir()
    (st_dir / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    assert sentence_transformers_layout(st_dir) == ("mean", False, None)
    assert source_from_hf(st_dir).embedding.normalize is False
    (st_dir / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    with pytest.raises(ExportError, match="unsupported sentence-transformers pooling"):
        source_from_hf(st_dir)


def test_sentence_transformers_prompts_are_checked(tmp_path: Path) -> None:
    from export.errors import ExportError

    assert sentence_transformers_prompts(tmp_path) == ({}, None)
    config = tmp_path / "config_sentence_transformers.json"
    config.write_text(json.dumps({"prompts": {}, "default_prompt_name": None}))
    assert sentence_transformers_prompts(tmp_path) == ({}, None)
    config.write_text(json.dumps({"prompts": {"query": "query: "}, "default_prompt_name": "passage"}))
    with pytest.raises(ExportError, match="default_prompt_name 'passage'"):
        sentence_transformers_prompts(tmp_path)
    config.write_text(json.dumps({"prompts": {"query": 1}}))
    with pytest.raises(ExportError, match="prompts must map names to prompt texts"):
        sentence_transformers_prompts(tmp_path)


def test_import_cross_encoder_scores_pairs_as_transformers_does(tiny_runs: Any, tmp_path: Path) -> None:
    """A BertForSequenceClassification with one label (the ms-marco MiniLM cross-encoders' layout) becomes
    a reranker bundle whose graph, given only ids and mask, scores pairs as transformers does with the
    tokenizer's token types."""
    vocab_size = Tokenizer.from_file(str(tiny_runs.tokenizer)).get_vocab_size()
    config = transformers.BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=1,
        architectures=["BertForSequenceClassification"],
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    with torch.no_grad():  # token types must matter, or a graph that ignored them would pass
        model.bert.embeddings.token_type_embeddings.weight.mul_(20)
        model.classifier.weight.mul_(100)  # logits of order one, so the difference they make shows
    model_dir = tmp_path / "tiny-cross-encoder"
    model.save_pretrained(str(model_dir))
    shutil.copyfile(tiny_runs.tokenizer, model_dir / "tokenizer.json")

    out = tmp_path / "bundle"
    write_bundle(source_from_hf(model_dir), out, ExportOptions(), lambda _: None)
    manifest = verify_bundle(out)
    assert manifest.heads == ["reranker"] and manifest.reranker is not None and manifest.classifier is None

    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    pairs = [("the dog", text) for text in TEXTS]
    encodings = tokenizer.encode_batch(pairs)
    length = max(len(encoding.ids) for encoding in encodings)
    ids, mask, types = (np.zeros((len(pairs), length), dtype=np.int64) for _ in range(3))
    for row, encoding in enumerate(encodings):
        ids[row, : len(encoding.ids)] = encoding.ids
        mask[row, : len(encoding.ids)] = 1
        types[row, : len(encoding.ids)] = encoding.type_ids
    assert types.any()  # the template gives the second text type 1
    with torch.inference_mode():
        arguments = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        expected = model(
            **{name: torch.from_numpy(value) for name, value in arguments.items()}
        ).logits.numpy()
        untyped = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    assert np.abs(expected - untyped).max() > 1e-2
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]
    assert logits.shape == (len(pairs), 1)
    np.testing.assert_allclose(logits, expected, atol=1e-4)
