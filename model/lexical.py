"""Exact-word evidence next to the encoder: a lexical channel for embeddings and a lexical classifier head.

A small encoder trained for minutes compresses away which exact (sub)words a text contains, and that is
often the strongest evidence there is: BM25 and TF-IDF beat it on most retrieval and topic tasks. Both
modules here add that evidence back inside the exported graph, as table lookups over the input ids.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.data import TokenizedTexts


class LexicalSketch(nn.Module):
    """The text's TF-IDF vector over the tokenizer's vocabulary (sublinear tf, L2-normalised), count-
    sketched (Charikar et al. 2002) to `dim` dimensions so that it fits in a dense embedding.

    Token t adds sign[t] * idf[t] to dimension column[t]. The sketch preserves inner products in
    expectation, so the cosine of two sketches estimates the TF-IDF cosine of the two texts, with noise
    of order 1/sqrt(dim) from hash collisions. Subword tokens make it match across inflections
    ("owlish" shares "owl"), which word-level BM25 cannot. Special tokens and padding carry idf 0.
    """

    def __init__(self, idf: torch.Tensor, dim: int, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        vocab_size = idf.numel()
        self.register_buffer("idf", idf.float().clone())
        self.register_buffer("column", torch.randint(0, dim, (vocab_size,), generator=generator))
        sign = torch.randint(0, 2, (vocab_size,), generator=generator).float() * 2 - 1
        self.register_buffer("sign", sign)
        self.dim = dim

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], dim: int) -> "LexicalSketch":
        """Rebuild a saved sketch (its columns and signs are stored, not drawn again)."""
        sketch = cls(state["idf"], dim)
        sketch.load_state_dict(state)
        return sketch

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.float()  # (B, T)
        # How often each position's token occurs in its text, so that each occurrence carries an equal
        # share of the token's sublinear weight idf * (1 + log tf).
        same = (input_ids[:, :, None] == input_ids[:, None, :]).float() * mask[:, None, :]  # (B, T, T)
        tf = same.sum(dim=2).clamp(min=1.0)  # (B, T)
        share = self.idf[input_ids] * (1.0 + torch.log(tf)) / tf * mask  # (B, T)
        sketch = torch.zeros(input_ids.shape[0], self.dim, dtype=share.dtype, device=share.device)
        sketch = sketch.scatter_add(1, self.column[input_ids], share * self.sign[input_ids])  # (B, dim)
        return F.normalize(sketch, dim=1)


def hybrid_embedding(dense: torch.Tensor, lexical: torch.Tensor, weight: float) -> torch.Tensor:
    """[dense / |dense|, sqrt(w) * lexical] / sqrt(1 + w): a unit vector whose cosine with another is
    (dense cosine + w * lexical cosine) / (1 + w), a weighted hybrid score from one dot product."""
    return torch.cat([F.normalize(dense, dim=1), math.sqrt(weight) * lexical], dim=1) / math.sqrt(1 + weight)


def inverse_document_frequencies(
    tokens: TokenizedTexts, vocab_size: int, special_ids: list[int]
) -> torch.Tensor:
    """Smoothed idf = log((N + 1) / (df + 1)) + 1 of every vocabulary id over the texts; 0 for the
    special tokens, which say nothing about a text's content."""
    document_frequency = torch.zeros(vocab_size)
    for ids in tokens.ids:
        document_frequency[torch.tensor(sorted(set(ids)), dtype=torch.long)] += 1
    idf = torch.log((len(tokens.ids) + 1) / (document_frequency + 1)) + 1
    idf[special_ids] = 0.0
    return idf


class LexicalHead(nn.Module):
    """The wide half of a wide-and-deep classifier (Cheng et al. 2016): a learned vector for every token
    and every hashed token bigram of the input, averaged over the text and projected to the class
    logits (fastText, Joulin et al. 2017). It adds exact-word evidence, which a small encoder trained
    for minutes compresses away, and costs one table lookup at serving time.

    Bigram (a, b) of the ids uses row vocab_size + (a * 1_000_003 + b) mod buckets of the same table.
    """

    def __init__(self, vocab_size: int, buckets: int, dim: int, n_labels: int) -> None:
        super().__init__()
        self.vocab_size, self.buckets = vocab_size, buckets
        self.table = nn.Embedding(vocab_size + buckets, dim)
        self.out = nn.Linear(dim, n_labels)
        nn.init.normal_(self.table.weight, std=0.02)
        nn.init.zeros_(self.out.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.float()  # (B, T)
        pair_mask = mask[:, :-1] * mask[:, 1:]  # (B, T - 1): both tokens real
        bigrams = self.vocab_size + (input_ids[:, :-1] * 1_000_003 + input_ids[:, 1:]) % self.buckets
        total = (self.table(input_ids) * mask.unsqueeze(-1)).sum(dim=1)
        total = total + (self.table(bigrams) * pair_mask.unsqueeze(-1)).sum(dim=1)  # (B, dim)
        count = (mask.sum(dim=1) + pair_mask.sum(dim=1)).clamp(min=1.0).unsqueeze(-1)
        return self.out(total / count)
