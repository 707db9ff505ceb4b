"""The reranker's graph: a cross-encoder that starts as the bi-encoder it is fine-tuned from.

A plain cross-encoder (one head on the pooled `[CLS] q [SEP] p [SEP]`) has to learn relevance from
scratch: with our small encoder and a CPU budget it never got past a random order. This one reads the
pair in two stages, as PreTTR does (MacAvaney et al. 2020):

1. The encoder's layers read the query and the passage each on its own (block-diagonal attention,
   positions restarting at the passage), so their mean-pooled vectors are the bi-encoder's, and so is
   their cosine (with the run's lexical sketch, the same weighted hybrid the embedding serves).
2. One more block, a copy of the encoder's last one, reads the pair together: every passage token
   can attend to every query token. A linear head on its pooled output adds to the score.

logit = scale * (bi-encoder cosine - offset) + maxsim_weight * MaxSim + head(pooled pair), where MaxSim
is ColBERT's late interaction over the first stage's token vectors. The head starts at zero, so before
training the reranker orders candidates as the bi-encoder does (plus MaxSim where its fitted weight
says it helps), and fine-tuning only has to learn what the interactions add. `scale`, `offset` and
`maxsim_weight` are fitted to the training loss on the first batches (model/rerank.py), so that
sigmoid(logit), the served score, starts as a calibrated probability.
"""

import copy

import torch
import torch.nn.functional as F
from torch import nn

from model.encoder import Encoder, mean_pool
from model.lexical import LexicalSketch
from model.tokenizer import SEP_ID, SPECIAL_TOKENS

SIMILARITY_SCALE = 20.0  # 1 / the contrastive fine-tune's temperature: the bi-encoder's own logit scale


def pair_segments(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) pair-encoded ids -> bool masks (query, passage): `[CLS] query [SEP]` and `passage [SEP]`.
    The passage is whatever follows the first [SEP]; padding belongs to neither."""
    valid = attention_mask.bool()
    is_sep = (input_ids == SEP_ID).long()
    passage = ((torch.cumsum(is_sep, dim=1) - is_sep) > 0) & valid
    return valid & ~passage, passage


def segment_positions(query: torch.Tensor, passage: torch.Tensor) -> torch.Tensor:
    """Positions that restart at the passage: the query from 0 ([CLS]), the passage from 1, where its
    text starts in the bi-encoder's `[CLS] passage [SEP]`. Padding gets 0."""
    query_positions = torch.cumsum(query.long(), dim=1) - 1
    passage_positions = torch.cumsum(passage.long(), dim=1)
    return torch.where(passage, passage_positions, torch.where(query, query_positions, 0))


def segment_attention(query: torch.Tensor, passage: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool: each token attends to the real tokens of its own segment. A row that may attend
    to nothing (padding) attends to everything instead, to stay finite; pooling ignores it."""
    valid = query | passage
    allowed = (passage[:, :, None] == passage[:, None, :]) & valid[:, None, :]
    allowed = allowed | ~allowed.any(dim=2, keepdim=True)
    return allowed[:, None, :, :]


def late_interaction(
    input_ids: torch.Tensor, hidden: torch.Tensor, query: torch.Tensor, passage: torch.Tensor
) -> torch.Tensor:
    """ColBERT's MaxSim (Khattab and Zaharia 2020) over the first stage's token vectors (B,): each query
    word's best cosine with a passage token, averaged over the query's words. It sees which words match,
    which one pooled vector per text blurs; [CLS] and [SEP] are left out."""
    words = input_ids >= len(SPECIAL_TOKENS)  # the special tokens have the lowest ids
    tokens = F.normalize(hidden.float(), dim=-1)
    cosine = tokens @ tokens.transpose(1, 2)  # (B, T, T)
    cosine = cosine.masked_fill(~(passage & words)[:, None, :], -1.0)
    best = cosine.max(dim=2).values  # (B, T)
    query_words = (query & words).float()
    return (best * query_words).sum(dim=1) / query_words.sum(dim=1).clamp(min=1.0)


class CrossEncoder(nn.Module):
    """(input_ids, attention_mask) of pair-encoded inputs -> (pooled pair (B, C), relevance logit (B, 1))."""

    def __init__(
        self, encoder: Encoder, sketch: LexicalSketch | None = None, sketch_weight: float = 0.0
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.cross = copy.deepcopy(encoder.blocks[-1])
        self.head = nn.Linear(encoder.config.n_embd, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.scale = nn.Parameter(torch.tensor(SIMILARITY_SCALE))
        self.offset = nn.Parameter(torch.tensor(0.0))
        self.maxsim_weight = nn.Parameter(torch.tensor(0.0))
        self.sketch = sketch
        # Saved with the weights, so that a RUN rebuilds the same lexical channel.
        self.register_buffer("sketch_weight", torch.tensor(float(sketch_weight)))
        self.register_buffer("sketch_dim", torch.tensor(0 if sketch is None else sketch.dim))

    def separate_similarity(
        self, input_ids: torch.Tensor, hidden: torch.Tensor, query: torch.Tensor, passage: torch.Tensor
    ) -> torch.Tensor:
        """The bi-encoder's score of each pair (B,): cosine of the two mean-pooled segments, mixed with
        the cosine of their lexical sketches as the bi-encoder's hybrid embedding mixes them."""
        dense = F.cosine_similarity(mean_pool(hidden, query), mean_pool(hidden, passage), dim=1)
        if self.sketch is None:
            return dense
        lexical = (self.sketch(input_ids, query) * self.sketch(input_ids, passage)).sum(dim=1)
        return (dense + self.sketch_weight * lexical) / (1 + self.sketch_weight)

    def read_apart(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stage 1: the encoder's layers over each text on its own -> (residual stream (B, T, C), query
        mask, passage mask). The query's tokens come out as the bi-encoder's would for the query alone."""
        query, passage = pair_segments(input_ids, attention_mask)
        encoder = self.encoder
        positions = encoder.pos_emb.at(segment_positions(query, passage))
        x = encoder.emb_dropout(encoder.tok_emb(input_ids) + positions)
        separate = segment_attention(query, passage)
        for block in encoder.blocks:
            x = block(x, separate)
        return x, query, passage

    def first_stage_scores(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (the bi-encoder's similarity (B,), MaxSim (B,), stage 1's residual stream (B, T, C)): the
        two features the untrained reranker scores by, and what stage 2 reads."""
        x, query, passage = self.read_apart(input_ids, attention_mask)
        hidden = self.encoder.norm_out(x)
        similarity = self.separate_similarity(input_ids, hidden, query, passage)
        return similarity.float(), late_interaction(input_ids, hidden, query, passage), x

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        similarity, maxsim, x = self.first_stage_scores(input_ids, attention_mask)
        # Stage 2: one block over the pair together.
        together = attention_mask.bool()
        together = (together | ~together.any(dim=1, keepdim=True))[:, None, None, :]
        pooled = mean_pool(self.encoder.norm_out(self.cross(x, together)), attention_mask).float()
        logits = (
            self.scale * (similarity - self.offset) + self.maxsim_weight * maxsim + self.head(pooled)[:, 0]
        )
        return pooled, logits[:, None]


def cross_encoder_from_state(encoder: Encoder, state: dict[str, torch.Tensor]) -> CrossEncoder:
    """Rebuild a saved CrossEncoder: `state` is its state_dict without the "encoder." entries."""
    sketch = None
    sketch_dim = int(state["sketch_dim"])
    if sketch_dim:
        sketch_state = {
            key.removeprefix("sketch."): value for key, value in state.items() if key.startswith("sketch.")
        }
        sketch = LexicalSketch.from_state(sketch_state, sketch_dim)
        # In the layout of today's channel, whatever layout the run was saved in.
        state = {key: value for key, value in state.items() if not key.startswith("sketch.")}
        state.update({f"sketch.{key}": value for key, value in sketch.state_dict().items()})
    module = CrossEncoder(encoder, sketch, float(state["sketch_weight"]))
    module.load_state_dict({**state, **{f"encoder.{k}": v for k, v in encoder.state_dict().items()}})
    return module
