"""A local Hugging Face BERT-family checkpoint (or sentence-transformers folder) as an export source.

A sequence-classification checkpoint with one label (a cross-encoder, e.g. the ms-marco MiniLM
rerankers) becomes a reranker bundle instead: its graph takes pair-encoded inputs and returns the
classifier's logit (`PairScorer`).

The transformers model is wrapped with the pooling of the folder's 1_Pooling/config.json (mean or
CLS), so the exported graph has the same interface as the project's own: pooled, not normalised.
A Normalize module only sets the bundle's `normalize` flag; the named prompts of
config_sentence_transformers.json become the bundle's. Needs `transformers` (the hf extra).
"""

import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import nn

from bundle.manifest import Architecture, EmbeddingSpec, RerankerSpec
from export.bundle_writer import ExportSource
from export.errors import ExportError

NORMALIZE_MODULE = "sentence_transformers.models.Normalize"
POOLING_MODULE = "sentence_transformers.models.Pooling"


class PooledTransformer(nn.Module):
    """(input_ids, attention_mask) -> (embedding,), pooled like sentence-transformers' Pooling module."""

    def __init__(self, backbone: nn.Module, pooling: str) -> None:
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor]:
        # Single-segment inputs: token_type_ids are all zero, as the service never sends pairs.
        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=torch.zeros_like(input_ids)
        ).last_hidden_state  # (B, T, C)
        if self.pooling == "cls":
            return (hidden[:, 0],)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        # clamp(min=1): an all-padding row pools to zeros instead of 0/0.
        return ((hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0),)


class PairScorer(nn.Module):
    """(input_ids, attention_mask) of pair-encoded rows -> (pooled [CLS] state, relevance logit (B, 1)).

    The bundle's graph takes only ids and mask, so the token types BERT needs for a pair are derived in
    the graph, as the tokenizer's pair template sets them: 0 up to and including the first [SEP], 1
    after it (padding too, which the mask hides)."""

    def __init__(self, model: nn.Module, sep_id: int, token_types: bool) -> None:
        super().__init__()
        self.model = model
        self.sep_id = sep_id
        self.token_types = token_types

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        token_type_ids = torch.zeros_like(input_ids)
        if self.token_types:
            is_sep = (input_ids == self.sep_id).to(torch.int64)
            token_type_ids = ((is_sep.cumsum(dim=1) - is_sep) > 0).to(torch.int64)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            output_hidden_states=True,
        )
        return outputs.hidden_states[-1][:, 0], outputs.logits


def is_cross_encoder(config: Any) -> bool:
    """A sequence-classification checkpoint with one label: a reranker (cross-encoder)."""
    architectures = getattr(config, "architectures", None) or []
    return (
        any(name.endswith("ForSequenceClassification") for name in architectures) and config.num_labels == 1
    )


def sentence_transformers_layout(model_dir: Path) -> tuple[str | None, bool, int | None]:
    """(pooling, has a Normalize module, max_seq_length) of a sentence-transformers folder.

    (None, False, None) for a plain Hugging Face checkpoint.
    """
    modules_path = model_dir / "modules.json"
    if not modules_path.is_file():
        return None, False, None
    modules = json.loads(modules_path.read_text())
    types = [module["type"] for module in modules]
    pooling = None
    for module in modules:
        if module["type"] == POOLING_MODULE:
            pooling = _pooling_mode(json.loads((model_dir / module["path"] / "config.json").read_text()))
    unsupported = [
        t
        for t in types
        if t not in (POOLING_MODULE, NORMALIZE_MODULE) and t != "sentence_transformers.models.Transformer"
    ]
    if unsupported:
        raise ExportError(f"{modules_path}: unsupported sentence-transformers modules {unsupported}")
    max_seq_length = None
    config_path = model_dir / "sentence_bert_config.json"
    if config_path.is_file():
        max_seq_length = json.loads(config_path.read_text()).get("max_seq_length")
    return pooling, NORMALIZE_MODULE in types, max_seq_length


def sentence_transformers_prompts(model_dir: Path) -> tuple[dict[str, str], str | None]:
    """(prompts, default prompt name) of config_sentence_transformers.json; ({}, None) without one."""
    config_path = model_dir / "config_sentence_transformers.json"
    if not config_path.is_file():
        return {}, None
    config = json.loads(config_path.read_text())
    prompts = config.get("prompts") or {}
    default_name = config.get("default_prompt_name")
    if not isinstance(prompts, dict) or not all(
        isinstance(name, str) and isinstance(text, str) for name, text in prompts.items()
    ):
        raise ExportError(f"{config_path}: prompts must map names to prompt texts")
    if default_name is not None and default_name not in prompts:
        raise ExportError(f"{config_path}: default_prompt_name {default_name!r} is not one of the prompts")
    return prompts, default_name


def _pooling_mode(config: dict[str, Any]) -> str:
    enabled = [key for key, value in config.items() if key.startswith("pooling_mode") and value]
    if enabled == ["pooling_mode_mean_tokens"]:
        return "mean"
    if enabled == ["pooling_mode_cls_token"]:
        return "cls"
    raise ExportError(f"unsupported sentence-transformers pooling {enabled}: only mean or cls")


def load_tokenizer(model_dir: Path, max_seq_len: int) -> Tokenizer:
    if (model_dir / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    else:
        from transformers import AutoTokenizer

        fast = AutoTokenizer.from_pretrained(str(model_dir), use_fast=True)
        if not getattr(fast, "is_fast", False):
            raise ExportError(f"{model_dir}: no tokenizer.json and no fast tokenizer to convert")
        tokenizer = fast.backend_tokenizer
    # The service pads batches itself and reads the truncation length from tokenizer.json; a fixed
    # padding (all-MiniLM ships Fixed(128)) would pad every text to it.
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_seq_len)
    return tokenizer


def source_from_hf(
    model_dir: Path,
    name: str | None = None,
    pooling: str = "auto",
    normalize: bool | None = None,
    max_seq_len: int | None = None,
) -> ExportSource:
    try:
        from transformers import AutoConfig, AutoModel
    except ImportError:
        raise ExportError(
            "importing a Hugging Face checkpoint needs transformers: pip install 'encoder-service[hf]'"
        ) from None
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ExportError(f"{model_dir}: no config.json (is it a Hugging Face checkpoint directory?)")
    st_pooling, st_normalize, st_max_len = sentence_transformers_layout(model_dir)
    prompts, default_prompt_name = sentence_transformers_prompts(model_dir)
    config = AutoConfig.from_pretrained(str(model_dir))
    if getattr(config, "is_encoder_decoder", False) or not hasattr(config, "num_hidden_layers"):
        raise ExportError(f"{model_dir}: {config.model_type} is not a BERT-family encoder")
    position_limit = getattr(config, "max_position_embeddings", 512)
    max_seq_len = min(max_seq_len or st_max_len or position_limit, position_limit)
    if is_cross_encoder(config):
        return _cross_encoder_source(model_dir, config, name, max_seq_len)
    # Eager attention exports to plain MatMul/Softmax and stays finite on an all-padding row.
    backbone = AutoModel.from_pretrained(str(model_dir), config=config, attn_implementation="eager").eval()
    chosen_pooling = (st_pooling or "mean") if pooling == "auto" else pooling
    chosen_normalize = normalize if normalize is not None else (st_normalize or st_pooling is None)
    return ExportSource(
        module=PooledTransformer(backbone, chosen_pooling).eval(),
        tokenizer=load_tokenizer(model_dir, max_seq_len),
        name=name or model_dir.resolve().name,
        max_seq_len=max_seq_len,
        architecture=hf_architecture(config, backbone),
        embedding=EmbeddingSpec(
            dim=config.hidden_size,
            pooling=chosen_pooling,
            normalize=chosen_normalize,
            prompts=prompts,
            default_prompt_name=default_prompt_name,
        ),
        source=f"import-hf:{model_dir.resolve().name}",
        training={"imported_from": str(model_dir.resolve()), "sentence_transformers": st_pooling is not None},
    )


def hf_architecture(config: Any, model: nn.Module) -> Architecture:
    """The manifest's architecture record of a Hugging Face BERT-family model."""
    return Architecture(
        kind=f"hf-{config.model_type}",
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        num_heads=config.num_attention_heads,
        vocab_size=config.vocab_size,
        parameter_count=sum(parameter.numel() for parameter in model.parameters()),
    )


def _cross_encoder_source(model_dir: Path, config: Any, name: str | None, max_seq_len: int) -> ExportSource:
    from transformers import AutoModelForSequenceClassification

    tokenizer = load_tokenizer(model_dir, max_seq_len)
    sep_id = tokenizer.token_to_id("[SEP]")
    pair = tokenizer.encode("a", "b")
    if sep_id is None or pair.ids.count(sep_id) != 2:
        raise ExportError(f"{model_dir}: the tokenizer's pair template is not [CLS] a [SEP] b [SEP]")
    model = AutoModelForSequenceClassification.from_pretrained(
        str(model_dir), config=config, attn_implementation="eager"
    ).eval()
    return ExportSource(
        module=PairScorer(model, sep_id, token_types=getattr(config, "type_vocab_size", 0) >= 2).eval(),
        tokenizer=tokenizer,
        name=name or model_dir.resolve().name,
        max_seq_len=max_seq_len,
        architecture=hf_architecture(config, model),
        embedding=EmbeddingSpec(dim=config.hidden_size, pooling="cls", normalize=False),
        reranker=RerankerSpec(),
        source=f"import-hf:{model_dir.resolve().name}",
        training={"imported_from": str(model_dir.resolve()), "cross_encoder": True},
    )
