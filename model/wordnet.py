"""Demo data built deterministically from Debian's `wordnet-base` (Princeton WordNet 3.0).

Every synset goes to the train or the test split by a hash of its id, so the split never changes
between builds. Test synsets are kept out of the pretraining text too: neither pretraining nor
fine-tuning ever sees a test gloss.
"""

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.errors import ModelError

WORDNET_DIR = Path("/usr/share/wordnet")
PARTS_OF_SPEECH = ("noun", "verb", "adj", "adv")
TEST_PERCENT = 10
MAX_QUERIES_PER_KIND = 3000  # keeps `encoder eval retrieval` on the demo data to seconds on a CPU

# lexnames(5WN): lex_filenum -> lexicographer file name, in file-number order.
LEXNAMES = [
    "adj.all",
    "adj.pert",
    "adv.all",
    "noun.Tops",
    "noun.act",
    "noun.animal",
    "noun.artifact",
    "noun.attribute",
    "noun.body",
    "noun.cognition",
    "noun.communication",
    "noun.event",
    "noun.feeling",
    "noun.food",
    "noun.group",
    "noun.location",
    "noun.motive",
    "noun.object",
    "noun.person",
    "noun.phenomenon",
    "noun.plant",
    "noun.possession",
    "noun.process",
    "noun.quantity",
    "noun.relation",
    "noun.shape",
    "noun.state",
    "noun.substance",
    "noun.time",
    "verb.body",
    "verb.change",
    "verb.cognition",
    "verb.communication",
    "verb.competition",
    "verb.consumption",
    "verb.contact",
    "verb.creation",
    "verb.emotion",
    "verb.motion",
    "verb.perception",
    "verb.possession",
    "verb.social",
    "verb.stative",
    "verb.weather",
    "adj.ppl",
]

_EXAMPLE = re.compile(r'"([^"]+)"')
_EXAMPLE_WITH_SEPARATOR = re.compile(r';?\s*"[^"]*"')
_ADJECTIVE_MARKER = re.compile(r"\((a|p|ip)\)$")


class WordNetMissing(ModelError):
    """The WordNet database files are not installed."""


@dataclass(frozen=True)
class Synset:
    synset_id: str  # e.g. "n02084071"
    lexname: str
    lemmas: tuple[str, ...]
    definition: str
    examples: tuple[str, ...]

    @property
    def is_test(self) -> bool:
        digest = hashlib.sha256(self.synset_id.encode()).digest()
        return int.from_bytes(digest[:4], "big") % 100 < TEST_PERCENT

    @property
    def order_key(self) -> str:
        return hashlib.sha256(("order" + self.synset_id).encode()).hexdigest()


def parse_data_line(line: str, pos: str) -> Synset | None:
    """One line of data.{noun,verb,adj,adv} (wndb(5WN)); None for licence header lines and empty glosses."""
    if line.startswith("  ") or " | " not in line:
        return None
    fields_part, gloss = line.split(" | ", 1)
    fields = fields_part.split()
    offset, lex_filenum, word_count = fields[0], int(fields[1]), int(fields[3], 16)
    lemmas = []
    for index in range(word_count):
        word = _ADJECTIVE_MARKER.sub("", fields[4 + 2 * index]).replace("_", " ")
        if word not in lemmas:
            lemmas.append(word)
    gloss = gloss.strip()
    definition = _EXAMPLE_WITH_SEPARATOR.sub("", gloss).strip(" ;")
    if not definition:
        return None
    examples = tuple(example.strip() for example in _EXAMPLE.findall(gloss) if example.strip())
    return Synset(f"{pos[0]}{offset}", LEXNAMES[lex_filenum], tuple(lemmas), definition, examples)


def read_synsets(wordnet_dir: Path = WORDNET_DIR) -> list[Synset]:
    synsets = []
    for pos in PARTS_OF_SPEECH:
        path = wordnet_dir / f"data.{pos}"
        if not path.is_file():
            raise WordNetMissing(
                f"{path} not found: install Debian's wordnet-base package (apt-get install wordnet-base)"
            )
        with open(path, encoding="utf-8", errors="replace") as handle:
            synsets.extend(s for line in handle if (s := parse_data_line(line, pos)) is not None)
    return synsets


def licence_text(wordnet_dir: Path = WORDNET_DIR) -> str:
    """The licence as WordNet ships it: the numbered header lines of data.noun, numbers removed."""
    lines = []
    with open(wordnet_dir / "data.noun", encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if not line.startswith("  "):
                break
            lines.append(re.sub(r"^\s+\d+ ?", "", line.rstrip()))
    return "\n".join(lines).strip() + "\n"


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def build_wordnet_data(out: Path, wordnet_dir: Path = WORDNET_DIR) -> dict[str, Any]:
    """Write the demo data set to `out`; returns the paths written and their sizes."""
    synsets = sorted(read_synsets(wordnet_dir), key=lambda s: s.order_key)
    train = [s for s in synsets if not s.is_test]
    test = [s for s in synsets if s.is_test]
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "pretrain": out / "pretrain.txt",
        "classify_train": out / "classify_train.jsonl",
        "classify_test": out / "classify_test.jsonl",
        "pairs_train": out / "pairs_train.jsonl",
        "retrieval_queries": out / "retrieval_queries.jsonl",
        "retrieval_corpus": out / "retrieval_corpus.jsonl",
        "licence": out / "LICENSE-WordNet.txt",
    }
    with open(files["pretrain"], "w", encoding="utf-8") as handle:
        for synset in train:
            handle.write(f"{', '.join(synset.lemmas)}: {synset.definition}\n")
            for example in synset.examples:
                handle.write(example + "\n")
    _write_jsonl(files["classify_train"], [{"text": s.definition, "label": s.lexname} for s in train])
    _write_jsonl(files["classify_test"], [{"text": s.definition, "label": s.lexname} for s in test])
    pairs = []
    for synset in train:
        pairs.append({"query": ", ".join(synset.lemmas), "positive": synset.definition})
        pairs.extend({"query": example, "positive": synset.definition} for example in synset.examples)
    _write_jsonl(files["pairs_train"], pairs)
    _write_jsonl(files["retrieval_corpus"], [{"id": s.synset_id, "text": s.definition} for s in test])
    lemma_queries = [
        {"id": f"lemmas-{s.synset_id}", "text": ", ".join(s.lemmas), "relevant": [s.synset_id]} for s in test
    ][:MAX_QUERIES_PER_KIND]
    example_queries = [
        {"id": f"example-{s.synset_id}", "text": s.examples[0], "relevant": [s.synset_id]}
        for s in test
        if s.examples
    ][:MAX_QUERIES_PER_KIND]
    _write_jsonl(files["retrieval_queries"], lemma_queries + example_queries)
    files["licence"].write_text(licence_text(wordnet_dir))
    return {
        "out": str(out),
        "files": {name: str(path) for name, path in files.items()},
        "synsets": {"train": len(train), "test": len(test)},
        "labels": len(Counter(s.lexname for s in synsets)),
        "pairs_train": len(pairs),
        "retrieval": {"queries": len(lemma_queries) + len(example_queries), "corpus": len(test)},
    }
