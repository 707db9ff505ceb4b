"""Shared fixtures: a tiny model built with the project's own code and exported to real bundles.

`tiny_runs` is the suite's one tiny RUN (corpus, tokenizer, an embed RUN, a classify RUN and a rerank
RUN); every test that needs a RUN uses it. `tiny_bundle` (classifier with 3 labels, fp32 + int8) and
`tiny_bundle_no_classifier` are what the service and deployment tests serve (`tiny_rerank_bundle`, a
cross-encoder, what the rerank tests serve); they go through the same
export path as `encoder export`.
"""

import random
from dataclasses import dataclass
from pathlib import Path

import pytest

TINY_LABELS = ["animal", "plant", "tool"]
TINY_MAX_SEQ_LEN = 32
_SUBJECTS = ["the dog", "a cat", "an old oak", "the hammer", "a small fern", "the saw", "a horse", "the rose"]
_VERBS = ["sees", "needs", "grows near", "breaks", "likes", "holds", "follows", "covers"]
_OBJECTS = [
    "the garden",
    "a wooden box",
    "the river bank",
    "some water",
    "a green leaf",
    "the barn",
    "a nail",
]


@dataclass(frozen=True)
class TinyRuns:
    corpus: Path  # plain text the tokenizer was trained on
    tokenizer: Path
    embed_run: Path
    classify_run: Path
    rerank_run: Path


def _tiny_corpus(path: Path, sentences: int = 400) -> Path:
    rng = random.Random(0)
    lines = [
        f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}." for _ in range(sentences)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory: pytest.TempPathFactory) -> TinyRuns:
    """An embed RUN, a classify RUN (frozen encoder, 3-label linear and lexical heads) and a rerank RUN
    (a cross-encoder with a random head) with random weights, via model/."""
    import torch

    from model.config import EncoderConfig
    from model.cross_encoder import CrossEncoder
    from model.data import TokenizedTexts
    from model.encoder import Encoder
    from model.lexical import LexicalHead, inverse_document_frequencies
    from model.run import save_run
    from model.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("tiny_runs")
    tokenizer_path = root / "tokenizer.json"
    corpus = _tiny_corpus(root / "corpus.txt")
    tokenizer = train_tokenizer(
        [corpus],
        vocab_size=200,
        out=tokenizer_path,
        max_seq_len=TINY_MAX_SEQ_LEN,
        show_progress=False,
    )
    config = EncoderConfig(
        vocab_size=tokenizer.get_vocab_size(), max_seq_len=TINY_MAX_SEQ_LEN, n_layer=2, n_head=2, n_embd=32
    )
    torch.manual_seed(0)
    encoder_weights = {f"encoder.{key}": value for key, value in Encoder(config).state_dict().items()}
    classifier = torch.nn.Linear(config.n_embd, len(TINY_LABELS))
    classifier_weights = {f"classifier.{key}": value for key, value in classifier.state_dict().items()}
    # The lexical (TF-IDF) head that `finetune classify` fits, so that every classify bundle in the suite
    # exports and serves it; its random class weights count about as much as the linear head's.
    idf = inverse_document_frequencies(
        TokenizedTexts.encode(tokenizer, corpus.read_text().splitlines()),
        config.vocab_size,
        special_ids=[0, 1, 2, 3, 4],
        buckets=1024,
        min_document_frequency=2,
    )
    lexical = LexicalHead(idf, config.vocab_size, len(TINY_LABELS))
    torch.nn.init.normal_(lexical.weight, std=0.1)
    classifier_weights |= {f"lexical.{key}": value for key, value in lexical.state_dict().items()}
    embed_run = save_run(
        root / "embed",
        kind="embed",
        config=config,
        weights=encoder_weights,
        tokenizer_path=tokenizer_path,
        normalize=True,
        summary={"note": "random weights, test fixture"},
    )
    classify_run = save_run(
        root / "classify",
        kind="classify",
        config=config,
        weights=encoder_weights | classifier_weights,
        tokenizer_path=tokenizer_path,
        labels=TINY_LABELS,
        normalize=True,
        parent=embed_run,
        summary={"note": "random weights, test fixture"},
    )
    reranker = CrossEncoder(Encoder(config))
    reranker.encoder.load_state_dict(
        {key.removeprefix("encoder."): value for key, value in encoder_weights.items()}
    )
    # The head starts at zero in training; a random one here makes the pair block count in the scores.
    # A bias far from 0 would squash every sigmoid score to the same end.
    torch.nn.init.normal_(reranker.head.weight, std=1.0)
    reranker_weights = {
        (key if key.startswith("encoder.") else f"reranker.{key}"): value
        for key, value in reranker.state_dict().items()
    }
    rerank_run = save_run(
        root / "rerank",
        kind="rerank",
        config=config,
        weights=reranker_weights,
        tokenizer_path=tokenizer_path,
        parent=embed_run,
        summary={"note": "random weights, test fixture"},
    )
    return TinyRuns(
        corpus=corpus,
        tokenizer=tokenizer_path,
        embed_run=embed_run,
        classify_run=classify_run,
        rerank_run=rerank_run,
    )


def _export(run: Path, out: Path) -> Path:
    from export.bundle_writer import ExportOptions, write_bundle
    from export.run_source import source_from_run

    write_bundle(
        source_from_run(run, name="tiny"), out, ExportOptions(variants=["fp32", "int8"]), lambda _: None
    )
    return out


@pytest.fixture(scope="session")
def tiny_bundle(tiny_runs: TinyRuns, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle with a 3-label classifier (animal, plant, tool), fp32 + int8, max_seq_len 32, dim 32."""
    return _export(tiny_runs.classify_run, tmp_path_factory.mktemp("bundles") / "tiny")


@pytest.fixture(scope="session")
def tiny_bundle_no_classifier(tiny_runs: TinyRuns, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same encoder without a classifier head (serves /embed only), fp32 + int8."""
    return _export(tiny_runs.embed_run, tmp_path_factory.mktemp("bundles") / "tiny_embed")


@pytest.fixture(scope="session")
def tiny_rerank_bundle(tiny_runs: TinyRuns, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A reranker (cross-encoder) bundle: pair-encoded inputs, one relevance logit, fp32 + int8."""
    return _export(tiny_runs.rerank_run, tmp_path_factory.mktemp("bundles") / "tiny_rerank")


TINY_PROMPTS = {"query": "query: ", "passage": "passage: "}
TINY_DEFAULT_PROMPT = "query"


def _with_prompts(bundle: Path, out: Path) -> Path:
    """A copy of `bundle` whose manifest carries TINY_PROMPTS, "query" the default (the manifest is not
    checksummed; `encoder export --prompt` writes the same fields, tested in test_export_bundle.py)."""
    import shutil

    from bundle.manifest import EmbeddingSpec, load_manifest

    shutil.copytree(bundle, out)
    manifest = load_manifest(out)
    embedding = EmbeddingSpec(
        **manifest.embedding.model_dump()
        | {"prompts": TINY_PROMPTS, "default_prompt_name": TINY_DEFAULT_PROMPT}
    )
    manifest.model_copy(update={"embedding": embedding}).write(out)
    return out


@pytest.fixture(scope="session")
def tiny_bundle_with_prompts(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_bundle (3-label classifier) with TINY_PROMPTS, "query" the default."""
    return _with_prompts(tiny_bundle, tmp_path_factory.mktemp("bundles") / "tiny_prompts")


@pytest.fixture(scope="session")
def tiny_embedder_with_prompts(
    tiny_bundle_no_classifier: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """tiny_bundle_no_classifier (an embedding model to TEI) with TINY_PROMPTS, "query" the default."""
    return _with_prompts(tiny_bundle_no_classifier, tmp_path_factory.mktemp("bundles") / "tiny_embed_prompts")
