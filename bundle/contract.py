"""The graph contract: what the exporter (export/) writes, the training code (model/) feeds its
modules, and the service (service/) runs. Stated once, here; docs/architecture.md, "Bundle format".

A bundle's ONNX graph takes two int64 inputs of shape [batch, sequence], both axes symbolic:
`input_ids` (right-padded with the tokenizer's [PAD] id) and `attention_mask` (1 for a real token,
0 for padding). It returns `embedding` [batch, dim] and, when the model has a classifier head,
`logits` [batch, labels], in that order. The tokenizer is a Hugging Face `tokenizers` file.

A reranker (cross-encoder) bundle has the same interface: each row is a (query, passage) pair encoded
with the tokenizer's pair template ([CLS] q [SEP] p [SEP]; a model with token types derives them from
the [SEP] positions inside the graph), `logits` is [batch, 1], the pair's relevance, and `embedding`
the pooled pair that the head reads.
"""

from collections.abc import Sequence

import numpy as np

INPUT_NAMES = ("input_ids", "attention_mask")
EMBEDDING_OUTPUT = "embedding"
LOGITS_OUTPUT = "logits"
OUTPUT_NAMES = (EMBEDDING_OUTPUT, LOGITS_OUTPUT)  # a graph without a classifier has only the first
TOKENIZER_FILE = "tokenizer.json"


def pad_to_longest(token_ids: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad each row to the longest one: (input_ids, attention_mask), both int64 (B, T).

    A batch is padded only to its own longest row, never to max_seq_len: padded positions cost as much
    compute as real ones, and the mask keeps them out of attention and pooling."""
    longest = max((len(ids) for ids in token_ids), default=0)
    input_ids = np.full((len(token_ids), longest), pad_id, dtype=np.int64)  # (B, T)
    attention_mask = np.zeros((len(token_ids), longest), dtype=np.int64)  # (B, T)
    for row, ids in enumerate(token_ids):
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask
