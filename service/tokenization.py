"""Tokenisation with the bundle's Hugging Face `tokenizers` file (Rust, batch API, releases the GIL).

Five views of the one file: cut on the right, cut on the left (TEI's `truncation_direction`; a pair
loses tokens from its longer text first), a reranker's (query, passage) pairs cut from the passage
only, on either side, and uncut (`/tokenize` shows every token, as TEI's does). Truncation is a
setting of a `Tokenizer` object, shared by the worker threads, so each view is its own object instead
of one that requests would reconfigure under each other.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from tokenizers import Encoding, Tokenizer

PAD_TOKENS = ("[PAD]", "<pad>")
# Special tokens a tokenizer adds around a text ([CLS] ... [SEP], <s> ... </s>): at most two.
SPECIAL_TOKENS_BOUND = 2

# From how many inputs the token bound is summed in numpy (below, numpy's own overhead costs more).
NUMPY_BOUND_FROM = 32

TruncationSide = Literal["left", "right"]
# How a pair is cut to max_seq_len: the longer text first (/predict, as TEI), or only the second (a
# reranker's passage: the query is never cut; service/pipeline.py refuses a query with no room left).
PairCut = Literal["longest_first", "only_second"]
# One model input: a text, or a pair of texts (/predict), encoded with the tokenizer's template.
TextInput = str | tuple[str, str]


@dataclass(frozen=True)
class TokenizedInputs:
    token_ids: list[list[int]]  # one list per input, special tokens included, cut to max_seq_len
    truncated: list[bool]  # whether the input had more than max_seq_len tokens


@dataclass(frozen=True)
class Token:
    """One token as TEI's /tokenize shows it: offsets are UTF-8 byte offsets into the input."""

    id: int
    text: str
    special: bool
    start: int | None
    stop: int | None


class TextTokenizer:
    def __init__(self, tokenizer_file: Path, max_seq_len: int) -> None:
        def load(side: TruncationSide | None, pair_cut: PairCut = "longest_first") -> Tokenizer:
            tokenizer = Tokenizer.from_file(str(tokenizer_file))
            # The batcher pads each batch itself (to its own longest item), so the file's padding is
            # switched off; truncation is fixed to the model's max_seq_len whatever the file says.
            tokenizer.no_padding()
            if side is None:
                tokenizer.no_truncation()
            else:
                tokenizer.enable_truncation(max_seq_len, strategy=pair_cut, direction=side)
            return tokenizer

        self._cut: dict[tuple[TruncationSide, PairCut], Tokenizer] = {
            (side, pair_cut): load(side, pair_cut)
            for side in ("right", "left")
            for pair_cut in ("longest_first", "only_second")
        }
        self._uncut = load(None)
        self.max_seq_len = max_seq_len
        self.vocab_size = self._uncut.get_vocab_size(with_added_tokens=True)
        self.pad_id = next(
            (token_id for token in PAD_TOKENS if (token_id := self._uncut.token_to_id(token)) is not None),
            0,
        )
        # Only the first max_seq_len tokens are used, yet the tokenizer's time grows with the whole text
        # (about 2 us a character, overflow included: 0.2 s for 100k characters, BENCHMARKS.md). A token
        # covers at most its longest vocabulary entry plus a separating space, so twice that per token
        # keeps every used token; only runs of whitespace or words the vocabulary cannot cover at all
        # ([UNK]) could reach past the cut. 4096 characters for the default bundle (2 x (15 + 1) per token).
        longest_entry = max(len(token) for token in self._uncut.get_vocab())
        self.max_chars = max_seq_len * 2 * (longest_entry + 1)

    def token_bound(self, inputs: list[TextInput | list[int]]) -> int:
        """At most how many tokens `inputs` become, before tokenising them: no more than max_seq_len each,
        and no more than one per character plus the special tokens (WordPiece and Unigram; a byte-level
        BPE may exceed it for non-Latin text, which only makes admission a little generous); token IDs
        are as many as they are."""
        limit = self.max_seq_len
        if len(inputs) > NUMPY_BOUND_FROM and set(map(type, inputs)) == {str}:
            # Many texts in numpy, 10x faster than per text in Python: a 1,000-text request is refused
            # (429) or admitted on this bound, so it is on a flood's path.
            lengths = np.fromiter(map(len, inputs), dtype=np.int64, count=len(inputs))
            return int(np.minimum(lengths + SPECIAL_TOKENS_BOUND, limit).sum())
        return sum(min(limit, _length_bound(item)) for item in inputs)

    def _cut_chars(self, item: TextInput, side: TruncationSide) -> TextInput:
        # The characters that can hold the tokens kept: the start, or the end when cutting on the left.
        def cut(text: str) -> str:
            return text[-self.max_chars :] if side == "left" else text[: self.max_chars]

        return cut(item) if isinstance(item, str) else (cut(item[0]), cut(item[1]))

    def pair_room(self, query: str) -> int:
        """The tokens left for a passage once `query` and the pair template's special tokens are in."""
        if len(query) > self.max_chars:  # more than max_seq_len tokens anyway: not worth tokenising
            return 0
        return self.max_seq_len - len(self._uncut.encode(query, "").ids)

    def encode(
        self, inputs: list[TextInput], side: TruncationSide = "right", pair_cut: PairCut = "longest_first"
    ) -> TokenizedInputs:
        """Token ids of texts and pairs, cut to max_seq_len on `side`; `pair_cut="only_second"` cuts only
        the second text of a pair (its first must leave room: `pair_room`)."""
        cut = [any(len(text) > self.max_chars for text in _texts(item)) for item in inputs]
        cut_inputs = [self._cut_chars(item, side) for item in inputs] if any(cut) else inputs
        # The batch API even for one input: 55 us against `encode`'s 72 us for a 30-word text, and it
        # lets go of the GIL while it works.
        encodings = self._cut[side, pair_cut].encode_batch(cut_inputs)
        # With truncation on, the cut-off tokens land in `overflowing`: non-empty means truncated. A text
        # longer than max_chars has more than max_seq_len tokens anyway.
        return TokenizedInputs(
            token_ids=[encoding.ids for encoding in encodings],
            truncated=[
                bool(encoding.overflowing) or was_cut
                for encoding, was_cut in zip(encodings, cut, strict=True)
            ],
        )

    def tokens(self, texts: list[str], add_special_tokens: bool) -> list[list[Token]]:
        """Every token of each text, uncut, with TEI's fields (/tokenize)."""
        encodings = self._uncut.encode_batch(texts, add_special_tokens=add_special_tokens)
        return [_tokens(text, encoding) for text, encoding in zip(texts, encodings, strict=True)]

    def decode(self, token_ids: list[list[int]], skip_special_tokens: bool) -> list[str]:
        return self._uncut.decode_batch(token_ids, skip_special_tokens=skip_special_tokens)


def _texts(item: TextInput) -> tuple[str, ...]:
    return (item,) if isinstance(item, str) else item


def _length_bound(item: TextInput | list[int]) -> int:
    if isinstance(item, list):
        return len(item)
    # A pair has one more special token: the separator between its texts.
    return sum(len(text) for text in _texts(item)) + SPECIAL_TOKENS_BOUND + (len(_texts(item)) - 1)


def _tokens(text: str, encoding: Encoding) -> list[Token]:
    # The Python binding gives character offsets; TEI (Rust) gives byte offsets, so convert.
    byte_offset = [0]
    for character in text:
        byte_offset.append(byte_offset[-1] + len(character.encode()))
    tokens = []
    for token_id, (start, stop), special, token in zip(
        encoding.ids, encoding.offsets, encoding.special_tokens_mask, encoding.tokens, strict=True
    ):
        if special:
            tokens.append(Token(token_id, token, True, None, None))
        else:
            tokens.append(Token(token_id, text[start:stop], False, byte_offset[start], byte_offset[stop]))
    return tokens
