"""The encoder's one configuration dataclass and its size presets."""

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

PositionKind = Literal["learned", "sinusoidal"]


@dataclass
class EncoderConfig:
    vocab_size: int = 8192  # small WordPiece vocabularies suit small corpora and keep the tied decoder cheap
    max_seq_len: int = 128  # the pretraining pack length and the service's truncation length
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    # GLU hidden width; 0 means 8/3 * n_embd rounded up to a multiple of 64, which keeps the parameter
    # count of a GLU feed-forward equal to a plain 4x MLP (Shazeer 2020).
    ffn_hidden: int = 0
    position: PositionKind = "learned"
    dropout: float = 0.0  # pretraining on a short budget gains nothing from dropout; SimCSE sets it > 0
    norm_eps: float = 1e-5
    pad_token_id: int = 0  # the tokenizer's [PAD] is always id 0

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.position not in ("learned", "sinusoidal"):
            raise ValueError(f"position must be 'learned' or 'sinusoidal', not {self.position!r}")
        if self.ffn_hidden == 0:
            self.ffn_hidden = -(-(8 * self.n_embd // 3) // 64) * 64

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "EncoderConfig":
        """Build from a config.json; keys that are not config fields (run metadata) are ignored."""
        known = {field.name for field in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})


# mini trains meaningfully on 2 CPU cores in minutes; small and base are GPU sizes; tiny is for tests.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=64),
    "mini": dict(n_layer=4, n_head=4, n_embd=256),
    "small": dict(n_layer=8, n_head=8, n_embd=512),
    "base": dict(n_layer=12, n_head=12, n_embd=768),
}


def preset_config(name: str, vocab_size: int, max_seq_len: int = 128, **overrides: Any) -> EncoderConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r} (choose from {', '.join(PRESETS)})")
    return EncoderConfig(vocab_size=vocab_size, max_seq_len=max_seq_len, **{**PRESETS[name], **overrides})
