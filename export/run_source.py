"""A trained RUN directory (model/run.py's contract) as an export source."""

from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from bundle.manifest import Architecture, ClassifierSpec, EmbeddingSpec, RerankerSpec, TeacherSpec
from export.bundle_writer import ExportSource


def source_from_run(run_dir: Path, name: str | None = None) -> ExportSource:
    from model.run import load_run

    run = load_run(run_dir)
    config = run.config
    tokenizer = Tokenizer.from_file(str(run.tokenizer_path))
    # The service reads truncation from tokenizer.json and pads batches itself; model/ already saves
    # it so, this only repairs a tokenizer that was swapped in by hand.
    if tokenizer.truncation is None or tokenizer.truncation["max_length"] != config.max_seq_len:
        tokenizer.enable_truncation(config.max_seq_len)
    if tokenizer.padding is not None:
        tokenizer.no_padding()
    classifier = ClassifierSpec(labels=run.labels, multi_label=run.multi_label) if run.labels else None
    # A distilled student's run.json summary names its teacher (`encoder distill`, or `finetune embed
    # --teacher` in this RUN or in one it was fine-tuned from: a classifier on a taught encoder).
    teacher = taught_by(run.summary)
    return ExportSource(
        module=run.inference_module(),
        tokenizer=tokenizer,
        name=name or Path(run_dir).resolve().name,
        max_seq_len=config.max_seq_len,
        architecture=Architecture(
            num_layers=config.n_layer,
            hidden_size=config.n_embd,
            num_heads=config.n_head,
            vocab_size=config.vocab_size,
            parameter_count=run.parameter_count,
        ),
        embedding=EmbeddingSpec(
            dim=run.embedding_dim,
            pooling=run.pooling,
            normalize=run.normalize,
            matryoshka_dims=list(run.matryoshka_dims),
        ),
        classifier=classifier,
        reranker=RerankerSpec() if run.kind == "rerank" else None,
        source="encoder",
        training={"kind": run.kind, **run.summary},
        teacher=TeacherSpec.model_validate(teacher) if teacher else None,
    )


def taught_by(summary: dict[str, Any]) -> dict[str, Any] | None:
    """The teacher recorded in a RUN's summary or, failing that, in its init's, and so on up."""
    while summary:
        teacher = summary.get("teacher")
        if isinstance(teacher, dict):
            return teacher
        parent = summary.get("init")
        summary = parent if isinstance(parent, dict) else {}
    return None
