"""A small BERT-style encoder: pre-LayerNorm blocks without biases, GLU feed-forward, fused QKV.

Shapes: B batch, T sequence length, C = n_embd, H heads, D = C // H.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.config import EncoderConfig
from model.lexical import LexicalHead, LexicalSketch, hybrid_embedding


def key_padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 0/1 mask -> (B, 1, 1, T) bool mask of the keys each query may attend to.

    A row with no real token would give softmax over only -inf (NaN); such a row attends to every
    position instead. Its output is garbage but finite, and pooling ignores it anyway.
    """
    allowed = attention_mask.bool()
    allowed = allowed | ~allowed.any(dim=1, keepdim=True)
    return allowed[:, None, None, :]


class SelfAttention(nn.Module):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.proj(y)


class GluFeedForward(nn.Module):
    """SwiGLU: silu(x W_gate) * (x W_up), projected back; gate and up share one matmul."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.gate_up = nn.Linear(config.n_embd, 2 * config.ffn_hidden, bias=False)
        self.down = nn.Linear(config.ffn_hidden, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.norm_attn = nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=False)
        self.attn = SelfAttention(config)
        self.norm_ffn = nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=False)
        self.ffn = GluFeedForward(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.norm_attn(x), attn_mask))
        return x + self.dropout(self.ffn(self.norm_ffn(x)))


class ScaledSinusoidalPositions(nn.Module):
    """Fixed sinusoids times one learned scale (Hua et al. 2022), so they cannot drown the tokens."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        position = torch.arange(config.max_seq_len, dtype=torch.float32)[:, None]
        frequency = torch.exp(
            torch.arange(0, config.n_embd, 2, dtype=torch.float32) * (-math.log(10000.0) / config.n_embd)
        )
        table = torch.zeros(config.max_seq_len, config.n_embd)
        table[:, 0::2] = torch.sin(position * frequency)
        table[:, 1::2] = torch.cos(position * frequency)
        self.register_buffer("table", table, persistent=False)
        self.scale = nn.Parameter(torch.tensor(config.n_embd**-0.5))

    def forward(self, T: int) -> torch.Tensor:
        return self.table[:T] * self.scale  # (T, C)

    def at(self, position_ids: torch.Tensor) -> torch.Tensor:
        """The embeddings of given positions: (B, T) -> (B, T, C)."""
        return self.table[position_ids] * self.scale


class LearnedPositions(nn.Module):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(config.max_seq_len, config.n_embd))

    def forward(self, T: int) -> torch.Tensor:
        return self.weight[:T]  # (T, C)

    def at(self, position_ids: torch.Tensor) -> torch.Tensor:
        """The embeddings of given positions: (B, T) -> (B, T, C)."""
        return self.weight[position_ids]


class Encoder(nn.Module):
    """input_ids (B, T), attention_mask (B, T) -> hidden states (B, T, C) after a final LayerNorm."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb: LearnedPositions | ScaledSinusoidalPositions = (
            LearnedPositions(config) if config.position == "learned" else ScaledSinusoidalPositions(config)
        )
        self.emb_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_out = nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=False)
        self.apply(self._init_weights)
        # Residual projections scaled down with depth (GPT-2), so the residual stream starts near unit size.
        for name, param in self.named_parameters():
            if name.endswith(("attn.proj.weight", "ffn.down.weight")):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if isinstance(self.pos_emb, LearnedPositions):
            nn.init.normal_(self.pos_emb.weight, mean=0.0, std=0.02)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token plus position embeddings: (B, T) -> (B, T, C); ELECTRA's generator shares them."""
        T = input_ids.shape[1]
        return self.emb_dropout(self.tok_emb(input_ids) + self.pos_emb(T))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)  # (B, T, C)
        attn_mask = key_padding_mask(attention_mask)
        for block in self.blocks:
            x = block(x, attn_mask)
        return self.norm_out(x)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over real tokens: (B, T, C) -> (B, C); a row without tokens pools to zeros."""
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    total = (hidden * weights).sum(dim=1)
    count = weights.sum(dim=1).clamp(min=1.0)
    return total / count


def log_unigram_frequencies(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The log unigram distribution of `token_ids` (add-one smoothed): where an MLM decoder bias starts."""
    counts = torch.bincount(token_ids.flatten(), minlength=vocab_size).float() + 1.0
    return torch.log(counts / counts.sum())


class MaskedLMModel(nn.Module):
    """Encoder + MLM head whose output projection is tied to the token embedding.

    The loss is computed only on masked positions (labels != -100): the vocabulary projection is
    the largest matmul, and the other ~70% of positions would be thrown away anyway.

    The decoder keeps one bias (as BERT's does), the only bias of the model: without it, the
    bias-free network can only express the token frequencies by pushing one constant direction
    through every hidden state, and on a short budget it gets stuck there (all sentences embed
    alike). Starting it at the corpus's log-frequencies skips that plateau altogether.
    """

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.encoder = Encoder(config)
        self.mlm_transform = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.mlm_norm = nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=False)
        self.mlm_bias = nn.Parameter(torch.zeros(config.vocab_size))
        nn.init.normal_(self.mlm_transform.weight, mean=0.0, std=0.02)

    @torch.no_grad()
    def init_bias_from_frequencies(self, token_ids: torch.Tensor) -> None:
        self.mlm_bias.copy_(log_unigram_frequencies(token_ids, self.mlm_bias.numel()))

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        hidden = self.encoder(input_ids, attention_mask)  # (B, T, C)
        selected = labels != -100
        masked_hidden = hidden[selected]  # (N, C)
        masked_hidden = self.mlm_norm(F.gelu(self.mlm_transform(masked_hidden)))
        logits = F.linear(masked_hidden, self.encoder.tok_emb.weight, self.mlm_bias)  # (N, V)
        return F.cross_entropy(logits.float(), labels[selected])


class InferenceModule(nn.Module):
    """The exported graph: ids and mask in, pooled embedding (and logits) out; pooling happens inside.

    The logits are the linear head on the pooled embedding, plus the lexical head's when there is one.
    With a lexical sketch the embedding is the hybrid of the pooled vector and the sketch (unit norm);
    without one it is the pooled vector, not normalised. A distilled student with a projection
    (`distill --match-teacher-space`) returns the projected vector instead, which lives in the
    teacher's space. The logits always come from the pooled vector."""

    def __init__(
        self,
        encoder: Encoder,
        classifier: nn.Linear | None,
        lexical: LexicalHead | None = None,
        sketch: LexicalSketch | None = None,
        sketch_weight: float = 0.0,
        projection: nn.Linear | None = None,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.classifier = classifier
        self.lexical = lexical
        self.sketch = sketch
        self.sketch_weight = sketch_weight
        self.projection = projection

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor] | tuple[torch.Tensor, torch.Tensor]:
        hidden = self.encoder(input_ids, attention_mask)
        pooled = mean_pool(hidden, attention_mask).float()
        embedding = pooled
        if self.projection is not None:
            embedding = self.projection(pooled)
        elif self.sketch is not None:
            embedding = hybrid_embedding(pooled, self.sketch(input_ids, attention_mask), self.sketch_weight)
        if self.classifier is None:
            return (embedding,)
        logits = self.classifier(pooled)
        if self.lexical is not None:
            logits = logits + self.lexical(input_ids, attention_mask)
        return embedding, logits


def optimizer_groups(module: nn.Module, weight_decay: float) -> list[dict[str, object]]:
    """AdamW groups: decay matrices (linear and embedding weights), never norms, scales or biases."""
    decay = [p for p in module.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in module.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def set_dropout(encoder: Encoder, probability: float) -> None:
    """Change the dropout of a built encoder (SimCSE trains with dropout as its only augmentation)."""
    for module in encoder.modules():
        if isinstance(module, nn.Dropout):
            module.p = probability
        elif isinstance(module, SelfAttention):
            module.dropout = probability
