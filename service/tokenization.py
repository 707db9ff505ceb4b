"""Tokenisation with the bundle's Hugging Face `tokenizers` file (Rust, batch API, releases the GIL)."""

from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

PAD_TOKENS = ("[PAD]", "<pad>")


@dataclass(frozen=True)
class TokenizedInputs:
    token_ids: list[list[int]]  # one list per input, special tokens included, cut to max_seq_len
    truncated: list[bool]  # whether the input had more than max_seq_len tokens


class TextTokenizer:
    def __init__(self, tokenizer_file: Path, max_seq_len: int) -> None:
        self._tokenizer = Tokenizer.from_file(str(tokenizer_file))
        # The batcher pads each batch itself (to its own longest item), so the file's padding is
        # switched off; truncation is fixed to the model's max_seq_len whatever the file says.
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_seq_len)
        self.max_seq_len = max_seq_len
        self.pad_id = next(
            (
                token_id
                for token in PAD_TOKENS
                if (token_id := self._tokenizer.token_to_id(token)) is not None
            ),
            0,
        )

    def encode(self, texts: list[str]) -> TokenizedInputs:
        encodings = self._tokenizer.encode_batch(texts)
        # With truncation on, the cut-off tokens land in `overflowing`: non-empty means truncated.
        return TokenizedInputs(
            token_ids=[encoding.ids for encoding in encodings],
            truncated=[bool(encoding.overflowing) for encoding in encodings],
        )
