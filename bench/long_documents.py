"""Does exact-word evidence beyond the first max_seq_len tokens help retrieval of long documents?

    python bench/long_documents.py --out runs/manpages          # builds the data set, then measures

The embedding's lexical channel and the classifier's lexical head see what the encoder sees: the first
max_seq_len (128) tokens. BM25 reads the whole document. This measures what that costs on a
short-query-to-long-document task built from the manual pages installed on the machine (Debian's
`manpages`, `manpages-dev` and `man-db`): each query is a page's one-line summary from its NAME section
("open and possibly create a file"), its one relevant document the page's DESCRIPTION section.

Both scorers are measured on each document cut to its first N tokens and on the whole document:
- subword TF-IDF cosine (the lexical channel before sketching: sublinear tf, idf over the documents);
- BM25 (k1 1.2, b 0.75, bench/baselines.py) over the document's first N / r words, r being the
  corpus's tokens per word (about as many words as N tokens cover).

The tokenizer is trained on the documents as `make model` trains one (8,192 WordPiece tokens).
Prints a Markdown table and, as its last line, the result as one JSON object.
"""

import argparse
import json
import os
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from baselines import bm25_rankings, document_frequencies, read_jsonl, subword_tfidf, top_ten
from tokenizers import Tokenizer

from model.metrics import retrieval_metrics
from model.tokenizer import train_tokenizer

SECTIONS = ("man2", "man3", "man5", "man7", "man8")
CUTS = (128, 256, 512, None)
HEADING = re.compile(r"^[A-Z][A-Z ]+$")


def render(page: Path) -> str:
    result = subprocess.run(
        ["man", "-l", str(page)], capture_output=True, text=True, env={**os.environ, "MANWIDTH": "2000"}
    )
    plain = subprocess.run(["col", "-b"], input=result.stdout, capture_output=True, text=True)
    return plain.stdout


def summary_and_description(text: str) -> tuple[str, str] | None:
    """(the NAME line's summary, the DESCRIPTION section as one paragraph), when the page has both."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if HEADING.match(line) and not line.startswith(" "):
            current = line.strip()
            continue
        if current is not None:
            sections.setdefault(current, []).append(line.strip())
    name = " ".join(sections.get("NAME", []))
    description = re.sub(r"\s+", " ", " ".join(sections.get("DESCRIPTION", []))).strip()
    if " - " not in name or len(description.split()) < 20:
        return None
    summary = name.split(" - ", 1)[1].strip()
    return (summary, description) if len(summary.split()) >= 3 else None


def build(out: Path, man_root: Path) -> None:
    pages = sorted(path for section in SECTIONS for path in (man_root / section).glob("*") if path.is_file())
    with ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(render, pages))
    out.mkdir(parents=True, exist_ok=True)
    with (
        (out / "retrieval_queries.jsonl").open("w") as queries,
        (out / "retrieval_corpus.jsonl").open("w") as corpus,
        (out / "pretrain.txt").open("w") as pretrain,
    ):
        for page, text in zip(pages, texts, strict=True):
            found = summary_and_description(text)
            if found is None:
                continue
            summary, description = found
            queries.write(
                json.dumps({"id": f"q-{page.name}", "text": summary, "relevant": [page.name]}) + "\n"
            )
            corpus.write(json.dumps({"id": page.name, "text": description}) + "\n")
            pretrain.write(description + "\n")
    train_tokenizer([out / "pretrain.txt"], 8192, out / "tokenizer.json", show_progress=False)


def measure(data: Path) -> dict[str, object]:
    tokenizer = Tokenizer.from_file(str(data / "tokenizer.json"))
    tokenizer.no_truncation()
    queries, corpus = (
        read_jsonl(data / "retrieval_queries.jsonl"),
        read_jsonl(data / "retrieval_corpus.jsonl"),
    )
    doc_ids, documents = [row["id"] for row in corpus], [row["text"] for row in corpus]
    relevant = [set(row["relevant"]) for row in queries]
    vocab = tokenizer.get_vocab_size()
    doc_tokens = [encoding.ids[1:-1] for encoding in tokenizer.encode_batch(documents)]
    query_tokens = [
        encoding.ids[1:-1] for encoding in tokenizer.encode_batch([row["text"] for row in queries])
    ]
    lengths = np.array([len(ids) for ids in doc_tokens])
    tokens_per_word = lengths.sum() / sum(len(text.split()) for text in documents)
    result: dict[str, object] = {
        "documents": len(documents),
        "queries": len(queries),
        "document_tokens": {"p50": int(np.median(lengths)), "mean": round(float(lengths.mean()), 1)},
        "longer_than_128": round(float((lengths > 126).mean()), 3),
        "cuts": {},
    }
    for cut in CUTS:
        kept = [ids[: cut - 2] if cut else ids for ids in doc_tokens]  # [CLS] and [SEP] take two of them
        idf = np.log((len(kept) + 1) / (document_frequencies(kept, vocab) + 1)) + 1
        scores = subword_tfidf(query_tokens, idf) @ subword_tfidf(kept, idf).T
        tfidf = retrieval_metrics(top_ten(scores, doc_ids), relevant)
        words = [" ".join(text.split()[: int(cut / tokens_per_word)]) if cut else text for text in documents]
        bm25 = retrieval_metrics(bm25_rankings([row["text"] for row in queries], words, doc_ids), relevant)
        result["cuts"][str(cut or "whole")] = {"subword_tfidf": tfidf, "bm25": bm25}  # type: ignore[index]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where the data set is (or is built)")
    parser.add_argument("--man-root", type=Path, default=Path("/usr/share/man"))
    args = parser.parse_args()
    if not (args.out / "tokenizer.json").exists():
        build(args.out, args.man_root)
    result = measure(args.out)
    print(f"{result['documents']} documents, tokens per document p50 {result['document_tokens']['p50']}")  # type: ignore[index]
    print("\n| documents cut to | TF-IDF R@1 | R@10 | MRR@10 | BM25 R@1 | R@10 | MRR@10 |")
    print("|---|---|---|---|---|---|---|")
    for cut, scores in result["cuts"].items():  # type: ignore[attr-defined]
        tfidf, bm25 = scores["subword_tfidf"], scores["bm25"]
        print(
            f"| {cut} | {tfidf['recall@1']:.3f} | {tfidf['recall@10']:.3f} | {tfidf['mrr@10']:.3f} "
            f"| {bm25['recall@1']:.3f} | {bm25['recall@10']:.3f} | {bm25['mrr@10']:.3f} |"
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
