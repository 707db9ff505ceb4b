"""A second demo data set, from another domain than WordNet: Debian's package descriptions.

Its shape is the one users bring most often: topic classification of paragraphs (a package's long
description -> its archive section: games, science, libdevel, ...), retrieval of long documents
from short queries (the one-line synopsis -> the long description), and raw in-domain text to
pretrain on (the training packages' descriptions). It installs offline from Debian's own mirror:

    apt-get -o Acquire::Languages=en update     # adds the Translation-en files to /var/lib/apt/lists

Sections come from `apt-cache dumpavail`. Packages built from one source often share a description;
a description is kept once (the first package that has it), and each goes to the train or the test
split by a hash of its text, so near-copies never straddle the split and the split never changes.
"""

import hashlib
import json
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.errors import ModelError

APT_LISTS = Path("/var/lib/apt/lists")
TEST_PERCENT = 10
MIN_SECTION_PACKAGES = 40  # smaller sections are too rare to learn or score
MAX_QUERIES = 3000


class DebianListsMissing(ModelError):
    pass


@dataclass(frozen=True)
class PackageDescription:
    package: str
    section: str
    synopsis: str
    description: str  # the long description as plain paragraphs

    @property
    def is_test(self) -> bool:
        digest = hashlib.sha256(self.description.encode()).digest()
        return int.from_bytes(digest[:4], "big") % 100 < TEST_PERCENT


def parse_translation(text: str) -> dict[str, tuple[str, str]]:
    """Translation-en records -> {package: (synopsis, long description)}. Continuation lines start
    with a space; a line holding only " ." separates paragraphs (joined here into one text)."""
    descriptions: dict[str, tuple[str, str]] = {}
    for record in text.split("\n\n"):
        package, synopsis, body = None, None, []
        for line in record.splitlines():
            if line.startswith("Package: "):
                package = line.removeprefix("Package: ").strip()
            elif line.startswith("Description-en: "):
                synopsis = line.removeprefix("Description-en: ").strip()
            elif line.startswith(" ") and synopsis is not None and line.strip() != ".":
                body.extend(line.split())
        if package and synopsis and body:
            descriptions[package] = (synopsis, " ".join(body))
    return descriptions


def parse_sections(text: str) -> dict[str, str]:
    """`apt-cache dumpavail` records -> {package: section without its archive area (contrib/...)}."""
    sections: dict[str, str] = {}
    package = None
    for line in text.splitlines():
        if line.startswith("Package: "):
            package = line.removeprefix("Package: ").strip()
        elif line.startswith("Section: ") and package:
            sections[package] = line.removeprefix("Section: ").strip().split("/")[-1]
    return sections


def _translation_text(lists_dir: Path) -> str:
    files = sorted(lists_dir.glob("*_i18n_Translation-en*"))
    if not files:
        raise DebianListsMissing(
            f"no Translation-en files in {lists_dir}: run `apt-get -o Acquire::Languages=en update`"
        )
    texts = []
    for path in files:
        completed = subprocess.run(
            ["/usr/lib/apt/apt-helper", "cat-file", str(path)], capture_output=True, text=True, check=False
        )
        if completed.returncode != 0:
            raise DebianListsMissing(f"{path}: cannot read ({completed.stderr.strip()})")
        texts.append(completed.stdout)
    return "\n\n".join(texts)


def read_package_descriptions(lists_dir: Path = APT_LISTS) -> list[PackageDescription]:
    descriptions = parse_translation(_translation_text(lists_dir))
    dumpavail = subprocess.run(["apt-cache", "dumpavail"], capture_output=True, text=True, check=False)
    sections = parse_sections(dumpavail.stdout)
    seen: set[str] = set()
    packages = []
    for package in sorted(descriptions):
        synopsis, description = descriptions[package]
        if package not in sections or description in seen:
            continue
        seen.add(description)
        packages.append(PackageDescription(package, sections[package], synopsis, description))
    counts = Counter(p.section for p in packages)
    return [p for p in packages if counts[p.section] >= MIN_SECTION_PACKAGES]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def build_debian_data(out: Path, lists_dir: Path = APT_LISTS, train_rows: int = 4000) -> dict[str, Any]:
    """Write the data set to `out`, in the same files as `encoder data wordnet`. Classification uses
    `train_rows` training rows (a few thousand: the size users label by hand); pretraining and the
    training pairs use every training package."""
    packages = read_package_descriptions(lists_dir)
    order = sorted(packages, key=lambda p: hashlib.sha256(("order" + p.package).encode()).hexdigest())
    train = [p for p in order if not p.is_test]
    test = [p for p in order if p.is_test]
    out.mkdir(parents=True, exist_ok=True)
    (out / "pretrain.txt").write_text("".join(f"{p.synopsis}. {p.description}\n" for p in train))
    classify_train = [{"text": p.description, "label": p.section} for p in train][:train_rows]
    _write_jsonl(out / "classify_train.jsonl", classify_train)
    _write_jsonl(out / "classify_test.jsonl", [{"text": p.description, "label": p.section} for p in test])
    pairs = [{"query": p.synopsis, "positive": p.description} for p in train]
    _write_jsonl(out / "pairs_train.jsonl", pairs)
    _write_jsonl(out / "retrieval_corpus.jsonl", [{"id": p.package, "text": p.description} for p in test])
    # One query per distinct synopsis; every test package with that synopsis is relevant to it.
    relevant: dict[str, list[str]] = {}
    for package in test:
        relevant.setdefault(package.synopsis, []).append(package.package)
    queries = [
        {"id": f"q{number}", "text": text, "relevant": ids}
        for number, (text, ids) in enumerate(relevant.items())
    ]
    _write_jsonl(out / "retrieval_queries.jsonl", queries[:MAX_QUERIES])
    return {
        "out": str(out),
        "packages": {"train": len(train), "test": len(test)},
        "labels": len({p.section for p in packages}),
        "classify_train_rows": min(train_rows, len(train)),
        "retrieval": {"queries": min(MAX_QUERIES, len(queries)), "corpus": len(test)},
    }
