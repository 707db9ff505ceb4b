"""Tokenisation with the bundle's Hugging Face `tokenizers` file (Rust, batch API, releases the GIL)."""

from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

PAD_TOKENS = ("[PAD]", "<pad>")
# Special tokens a tokenizer adds around a text ([CLS] ... [SEP], <s> ... </s>): at most two.
SPECIAL_TOKENS_BOUND = 2


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
        # Only the first max_seq_len tokens are used, yet the tokenizer's time grows with the whole text
        # (about 2 us a character, overflow included: 0.2 s for 100k characters, BENCHMARKS.md). A token
        # covers at most its longest vocabulary entry plus a separating space, so twice that per token
        # keeps every used token; only runs of whitespace or words the vocabulary cannot cover at all
        # ([UNK]) could reach past the cut. 4096 characters for the default bundle (2 x (15 + 1) per token).
        longest_entry = max(len(token) for token in self._tokenizer.get_vocab())
        self.max_chars = max_seq_len * 2 * (longest_entry + 1)

    def token_bound(self, texts: list[str]) -> int:
        """At most how many tokens `texts` become, before tokenising them: no more than max_seq_len each,
        and no more than one per character plus the special tokens (WordPiece and Unigram; a byte-level
        BPE may exceed it for non-Latin text, which only makes admission a little generous)."""
        return sum(min(self.max_seq_len, len(text) + SPECIAL_TOKENS_BOUND) for text in texts)

    def encode(self, texts: list[str]) -> TokenizedInputs:
        cut = [len(text) > self.max_chars for text in texts]
        cut_texts = [text[: self.max_chars] for text in texts]
        # One text (the usual request) skips the batch API's thread-pool dispatch.
        encodings = (
            [self._tokenizer.encode(cut_texts[0])]
            if len(texts) == 1
            else self._tokenizer.encode_batch(cut_texts)
        )
        # With truncation on, the cut-off tokens land in `overflowing`: non-empty means truncated. A text
        # longer than max_chars has more than max_seq_len tokens anyway.
        return TokenizedInputs(
            token_ids=[encoding.ids for encoding in encodings],
            truncated=[
                bool(encoding.overflowing) or was_cut
                for encoding, was_cut in zip(encodings, cut, strict=True)
            ],
        )
