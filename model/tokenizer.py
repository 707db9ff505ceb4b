"""WordPiece tokenizer training with Hugging Face `tokenizers`.

The special tokens have fixed ids ([PAD]=0 ... [MASK]=4) because the model, the exporter and the
service all rely on them; the saved tokenizer.json truncates at max_seq_len and wraps every text
in [CLS] ... [SEP], so the service gets the model's exact input from `Tokenizer.encode`.
"""

from pathlib import Path

from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece
from tokenizers.trainers import WordPieceTrainer

from model.errors import ModelError

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = range(len(SPECIAL_TOKENS))


class TokenizerError(ModelError):
    """A tokenizer file that is missing, unreadable or lacks the fixed special tokens."""


def train_tokenizer(
    corpus_files: list[Path], vocab_size: int, out: Path, max_seq_len: int = 128, show_progress: bool = True
) -> Tokenizer:
    tokenizer = Tokenizer(WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True, clean_text=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    trainer = WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS, show_progress=show_progress
    )
    tokenizer.train([str(path) for path in corpus_files], trainer)
    # The trainer numbers tokens of equal frequency in hash-map order, which differs from process to
    # process; renumbering the learned vocabulary (special tokens first, then the rest sorted) makes
    # the same corpus give the same ids, so `make model` is reproducible. WordPiece only looks tokens
    # up by their text, so the order changes nothing else.
    learned = sorted(token for token in tokenizer.get_vocab() if token not in SPECIAL_TOKENS)
    vocabulary = {token: index for index, token in enumerate(SPECIAL_TOKENS + learned)}
    tokenizer.model = WordPiece(vocabulary, unk_token="[UNK]", max_input_chars_per_word=100)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", CLS_ID), ("[SEP]", SEP_ID)],
    )
    tokenizer.enable_truncation(max_length=max_seq_len)
    out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out))
    return tokenizer


def load_tokenizer(path: Path) -> Tokenizer:
    """Load tokenizer.json and check the special-token ids the model depends on."""
    if not path.is_file():
        raise TokenizerError(f"{path}: tokenizer file not found")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:
        raise TokenizerError(f"{path}: not a valid tokenizer.json ({str(exc).splitlines()[0]})") from None
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != expected_id:
            raise TokenizerError(f"{path}: special token {token} must have id {expected_id}")
    return tokenizer
