"""Training data: reading corpora and JSON-lines files, packing, MLM masking, padded batches.

Every reader raises DataError with a one-line message naming the file (and line) at fault.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from bundle.contract import pad_to_longest
from model.errors import ModelError
from model.tokenizer import CLS_ID, MASK_ID, PAD_ID, SEP_ID, SPECIAL_TOKENS


class DataError(ModelError):
    """A corpus or data file that is missing, empty or malformed."""


def read_text_lines(paths: list[Path]) -> list[str]:
    """Non-empty lines of plain-text corpora."""
    lines: list[str] = []
    for path in paths:
        if not path.is_file():
            raise DataError(f"{path}: corpus file not found")
        with open(path, encoding="utf-8", errors="replace") as handle:
            lines.extend(stripped for line in handle if (stripped := line.strip()))
    if not lines:
        raise DataError(f"{', '.join(str(p) for p in paths)}: corpus is empty (no non-blank lines)")
    return lines


def read_jsonl(path: Path, required: tuple[str, ...]) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file; each must be an object holding the `required` keys."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    rows = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: expected a JSON object")
            missing = [key for key in required if key not in row]
            if missing:
                raise DataError(f"{path}:{number}: missing key {missing[0]!r}")
            rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def pack_corpus(tokenizer: Tokenizer, lines: list[str], seq_len: int) -> torch.Tensor:
    """Concatenate the lines ([SEP] after each) and cut into [CLS] + (seq_len - 1) token rows.

    Packing wastes no compute on padding, and short lines (WordNet glosses are ~15 tokens) still
    teach the model long-range positions. The incomplete tail is dropped. -> (N, seq_len) int64
    """
    stream: list[int] = []
    for encoding in tokenizer.encode_batch(lines, add_special_tokens=False):
        stream.extend(encoding.ids)
        stream.append(SEP_ID)
    body = seq_len - 1
    rows = len(stream) // body
    if rows == 0:
        raise DataError(f"corpus too small: {len(stream)} tokens, need at least {body} for one sequence")
    packed = torch.tensor(stream[: rows * body], dtype=torch.int64).view(rows, body)
    return torch.cat([torch.full((rows, 1), CLS_ID, dtype=torch.int64), packed], dim=1)


def mask_tokens(
    input_ids: torch.Tensor, vocab_size: int, mask_prob: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: choose mask_prob of the non-special tokens; of those 80% -> [MASK], 10% -> a random
    token, 10% unchanged. Returns (inputs, labels) with labels = -100 where nothing is predicted."""
    special = input_ids < len(SPECIAL_TOKENS)
    chosen = (torch.rand(input_ids.shape, generator=generator) < mask_prob) & ~special
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    action = torch.rand(input_ids.shape, generator=generator)
    random_tokens = torch.randint(len(SPECIAL_TOKENS), vocab_size, input_ids.shape, generator=generator)
    inputs = torch.where(chosen & (action < 0.8), torch.full_like(input_ids, MASK_ID), input_ids)
    inputs = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_tokens, inputs)
    return inputs, labels


@dataclass
class TokenizedTexts:
    """Token ids of many texts; batches are padded only to their own longest row."""

    ids: list[list[int]]

    @classmethod
    def encode(cls, tokenizer: Tokenizer, texts: list[str]) -> "TokenizedTexts":
        return cls([encoding.ids for encoding in tokenizer.encode_batch(texts)])

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> input_ids (B, T), attention_mask (B, T), right-padded with [PAD]."""
        input_ids, attention_mask = pad_to_longest([self.ids[index] for index in indices], PAD_ID)
        return torch.from_numpy(input_ids), torch.from_numpy(attention_mask)

    def length_sorted_batches(self, batch_size: int) -> list[list[int]]:
        """Index batches of similar length, for inference (less padding)."""
        order = sorted(range(len(self.ids)), key=lambda i: len(self.ids[i]))
        return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
