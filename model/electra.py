"""Replaced-token detection (ELECTRA, Clark et al. 2020): the pretraining objective for small budgets.

A small generator (one Transformer block on the encoder's own embeddings) fills the masked positions
with plausible tokens sampled from its MLM distribution; the encoder (the discriminator, the model we
keep) then predicts for *every* real token whether it was replaced. MLM learns from the ~15-30% of
positions it masks; replaced-token detection gets a training signal from all of them, which is why it
reaches a given quality with several times less compute, the regime a CPU budget lives in.

Shapes: B batch, T sequence length, C = n_embd, V vocabulary, N masked positions in the batch.
"""

import torch
import torch.nn.functional as F
from torch import nn

from model.config import EncoderConfig
from model.encoder import Block, Encoder, key_padding_mask, log_unigram_frequencies
from model.tokenizer import MASK_ID, SPECIAL_TOKENS


def choose_positions(input_ids: torch.Tensor, mask_prob: float, generator: torch.Generator) -> torch.Tensor:
    """(B, T) bool: a random `mask_prob` of the non-special tokens (never [CLS], [SEP] or padding)."""
    special = input_ids < len(SPECIAL_TOKENS)
    return (torch.rand(input_ids.shape, generator=generator) < mask_prob) & ~special


def replaced_token_labels(original: torch.Tensor, corrupted: torch.Tensor) -> torch.Tensor:
    """(B, T) float: 1 where the generator put a different token, 0 elsewhere. A position the
    generator sampled correctly is *not* replaced: the discriminator cannot and should not tell."""
    return (corrupted != original).float()


def replaced_token_loss(
    logits: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Binary cross-entropy over the real tokens only: padding carries no signal and must not dilute
    the mean (batches differ in how much padding they have)."""
    real = attention_mask.bool()
    return F.binary_cross_entropy_with_logits(logits[real], labels[real])


class ReplacedTokenDetectionModel(nn.Module):
    """Encoder (discriminator) + a one-block generator that shares its token and position embeddings.

    The generator is deliberately weak (ELECTRA finds a generator 1/4-1/2 the discriminator's size
    best: a perfect generator would leave nothing to detect). Its MLM head is tied to the shared token
    embedding and, like MaskedLMModel's, keeps a decoder bias started at the unigram log-frequencies.
    """

    def __init__(
        self, config: EncoderConfig, generator_layers: int = 1, discriminator_weight: float = 50.0
    ) -> None:
        super().__init__()
        self.encoder = Encoder(config)
        self.discriminator_weight = discriminator_weight  # ELECTRA's lambda: the BCE is ~50x smaller
        self.generator_blocks = nn.ModuleList(Block(config) for _ in range(generator_layers))
        self.generator_norm = nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=False)
        self.mlm_transform = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.mlm_norm = nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=False)
        self.mlm_bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.rtd_transform = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.rtd_head = nn.Linear(config.n_embd, 1)
        for module in (self.mlm_transform, self.rtd_transform, *self.generator_blocks.modules()):
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @torch.no_grad()
    def init_bias_from_frequencies(self, token_ids: torch.Tensor) -> None:
        self.mlm_bias.copy_(log_unigram_frequencies(token_ids, self.mlm_bias.numel()))

    def generator_logits(
        self, masked_ids: torch.Tensor, attention_mask: torch.Tensor, chosen: torch.Tensor
    ) -> torch.Tensor:
        """MLM logits (N, V) at the chosen positions of the [MASK]-ed input."""
        x = self.encoder.embed(masked_ids)
        attn_mask = key_padding_mask(attention_mask)
        for block in self.generator_blocks:
            x = block(x, attn_mask)
        hidden = self.mlm_norm(F.gelu(self.mlm_transform(self.generator_norm(x)[chosen])))
        return F.linear(hidden, self.encoder.tok_emb.weight, self.mlm_bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        chosen: torch.Tensor,
        sampling: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """input_ids: the original (B, T) tokens; chosen: (B, T) bool positions to corrupt.
        -> (generator MLM loss + weight * detection loss, the two parts for logging)."""
        masked_ids = input_ids.masked_fill(chosen, MASK_ID)
        logits = self.generator_logits(masked_ids, attention_mask, chosen)  # (N, V)
        generator_loss = F.cross_entropy(logits.float(), input_ids[chosen])
        with torch.no_grad():  # sampling is not differentiable: the discriminator's loss stops here
            # Gumbel-max sampling from the generator's distribution, seeded like every other choice.
            uniform = torch.rand(logits.shape, generator=sampling, device="cpu").to(logits.device)
            sampled = (logits.float() - torch.log(-torch.log(uniform.clamp_min(1e-9)))).argmax(dim=-1)
            corrupted = input_ids.clone()
            corrupted[chosen] = sampled
            labels = replaced_token_labels(input_ids, corrupted)
        hidden = self.encoder(corrupted, attention_mask)  # (B, T, C)
        detection_logits = self.rtd_head(F.gelu(self.rtd_transform(hidden))).squeeze(-1)  # (B, T)
        detection_loss = replaced_token_loss(detection_logits.float(), labels, attention_mask)
        loss = generator_loss + self.discriminator_weight * detection_loss
        real = attention_mask.bool()
        logs = {
            "generator_loss": generator_loss.item(),
            "detection_loss": detection_loss.item(),
            "replaced_share": float(labels[real].mean()),
        }
        return loss, logs
