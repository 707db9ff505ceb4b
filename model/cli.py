"""`encoder data|tokenizer|pretrain|finetune|distill|eval`: argparse only at import; torch loads in handlers.

Each handler returns the command's result; a problem the user can fix is a ModelError, which the
`encoder` CLI prints as one line.
"""

import argparse
from pathlib import Path
from typing import Any

from model.errors import ModelError


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _dims(text: str) -> list[int]:
    try:
        dims = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not dims or dims[0] <= 0:
        raise argparse.ArgumentTypeError(f"expected positive dimensions, got {text!r}")
    return dims


def _add_common_training(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument(
        "--threads", type=int, help="intra-op CPU threads (default: min(4, the CPUs this process may use))"
    )
    parser.add_argument(
        "--budget-minutes", type=_positive_float, help="wall-clock budget; schedule sized to it"
    )
    parser.add_argument("--max-steps", type=_positive_int, help="stop after N optimizer steps")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=_positive_float, help="peak learning rate")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_limit(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--limit", type=_positive_int, help="use only the first N training rows")


def register(subparsers: Any) -> None:
    data = subparsers.add_parser("data", help="build demo data sets")
    data_kinds = data.add_subparsers(dest="data_kind", required=True, metavar="SOURCE")
    wordnet = data_kinds.add_parser(
        "wordnet", help="demo data from Debian's wordnet-base (pretraining text, classification, pairs)"
    )
    wordnet.add_argument("--out", required=True, type=Path, help="output directory")
    wordnet.add_argument("--wordnet-dir", type=Path, default=Path("/usr/share/wordnet"))
    wordnet.set_defaults(handler=run_data_wordnet)
    debian = data_kinds.add_parser(
        "debian",
        help="a second domain: Debian's package descriptions (needs apt-get -o Acquire::Languages=en update)",
    )
    debian.add_argument("--out", required=True, type=Path, help="output directory")
    debian.add_argument("--train-rows", type=int, default=4000, help="classification training rows")
    debian.set_defaults(handler=run_data_debian)

    tokenizer = subparsers.add_parser("tokenizer", help="train a tokenizer")
    tokenizer_kinds = tokenizer.add_subparsers(dest="tokenizer_action", required=True, metavar="ACTION")
    train = tokenizer_kinds.add_parser("train", help="train a WordPiece tokenizer on text files")
    train.add_argument("--corpus", required=True, nargs="+", type=Path, help="plain-text files")
    train.add_argument("--vocab-size", type=int, default=8192)
    train.add_argument("--max-seq-len", type=int, default=128, help="truncation length stored in the file")
    train.add_argument("--out", required=True, type=Path, help="tokenizer.json to write")
    train.set_defaults(handler=run_tokenizer_train)

    pretrain = subparsers.add_parser("pretrain", help="masked-language-model pretraining from scratch")
    pretrain.add_argument("--tokenizer", required=True, type=Path)
    pretrain.add_argument("--corpus", required=True, nargs="+", type=Path, help="plain-text files")
    pretrain.add_argument("--preset", choices=["tiny", "mini", "small", "base"], default="mini")
    pretrain.add_argument("--out", required=True, type=Path, help="RUN directory")
    _add_common_training(pretrain)
    pretrain.add_argument(
        "--objective",
        choices=["mlm", "electra"],
        default="mlm",
        help="masked-language modelling (default) or replaced-token detection (ELECTRA, for long budgets)",
    )
    pretrain.add_argument(
        "--mask-prob", type=float, help="share of tokens masked (default 0.15 electra, 0.3 mlm)"
    )
    pretrain.add_argument("--position", choices=["learned", "sinusoidal"], default="learned")
    pretrain.add_argument(
        "--seq-len", type=int, default=64, help="packed length of the short phase (default 64)"
    )
    pretrain.add_argument(
        "--long-fraction",
        type=float,
        default=0.1,
        help="share of the steps at the full max_seq_len, same tokens per step (default 0.1)",
    )
    pretrain.add_argument(
        "--checkpoint-every", type=int, default=200, help="steps between resume checkpoints"
    )
    pretrain.add_argument("--resume", action="store_true", help="continue from RUN/checkpoint if present")
    pretrain.add_argument(
        "--stop-after-steps", type=_positive_int, help="train this many steps, leave a resumable checkpoint"
    )
    pretrain.add_argument("--compile", action="store_true", help="torch.compile the model (GPU)")
    pretrain.set_defaults(handler=run_pretrain)

    finetune = subparsers.add_parser(
        "finetune", help="fine-tune a RUN for classification, embeddings or reranking"
    )
    finetune_kinds = finetune.add_subparsers(dest="finetune_kind", required=True, metavar="TASK")
    classify = finetune_kinds.add_parser("classify", help="classification head (single- or multi-label)")
    classify.add_argument("--init", required=True, type=Path, help="RUN to start from")
    classify.add_argument("--train", required=True, type=Path, help='JSON lines {"text", "label"|"labels"}')
    classify.add_argument("--eval", type=Path, help="JSON lines evaluated at the end (into run.json)")
    classify.add_argument("--out", required=True, type=Path, help="RUN directory")
    classify.add_argument(
        "--epochs", type=_positive_float, help="of the fine-tune (default 3); not used with --freeze-encoder"
    )
    classify.add_argument("--multi-label", action="store_true", help='rows carry "labels": [str]')
    classify.add_argument(
        "--freeze-encoder", action="store_true", help="fit the heads only; the encoder (/embed) is unchanged"
    )
    classify.add_argument(
        "--no-refit-heads",
        dest="refit_heads",
        action="store_false",
        help="after the fine-tune, keep its linear head instead of fitting the heads (linear and lexical) "
        "again on the frozen encoder's features of every training row, by L-BFGS",
    )
    classify.add_argument(
        "--head-c",
        type=_positive_float,
        default=16.0,
        help="inverse L2 strength of the heads' fit: loss = C * (sum of row losses) + |W|^2 / 2",
    )
    classify.add_argument(
        "--lexical-buckets",
        type=int,
        help="hashed-bigram buckets of the lexical head (default: sized to the data; 0: no lexical head)",
    )
    classify.add_argument(
        "--class-balance",
        type=float,
        default=0.5,
        help="single-label loss weights (1 / class frequency) ** this: 0 plain, 1 fully balanced",
    )
    classify.add_argument(
        "--pairs",
        type=Path,
        help='multi-task: also train the embedding on these JSON lines {"query", "positive"}, so one '
        "encoder serves /embed and /classify well",
    )
    _add_common_training(classify)
    _add_limit(classify)
    classify.set_defaults(handler=run_finetune_classify)

    embed = finetune_kinds.add_parser("embed", help="contrastive sentence embeddings (or SimCSE on raw text)")
    embed.add_argument("--init", required=True, type=Path, help="RUN to start from")
    embed.add_argument(
        "--train",
        required=True,
        type=Path,
        help='JSON lines {"query", "positive"[, "negative"]}; a .txt file (or {"text"} rows) means SimCSE',
    )
    embed.add_argument("--out", required=True, type=Path, help="RUN directory")
    embed.add_argument("--epochs", type=_positive_float, default=1.0)
    embed.add_argument(
        "--matryoshka", type=_dims, help="also train truncations to these dims, e.g. 32,64,128"
    )
    embed.add_argument("--temperature", type=_positive_float, default=0.05)
    embed.add_argument("--dropout", type=float, help="training dropout (default 0, 0.1 for SimCSE)")
    embed.add_argument(
        "--one-way", action="store_true", help="score queries against documents only (default: both ways)"
    )
    embed.add_argument(
        "--mine-negatives", action="store_true", help="give every pair without a negative a BM25-mined one"
    )
    embed.add_argument(
        "--lexical-dim",
        type=int,
        default=768,
        help="dims of the embedding's lexical channel, the text's TF-IDF vector projected by a table "
        "trained on the pairs (0: none)",
    )
    embed.add_argument(
        "--lexical-epochs",
        type=float,
        default=3.0,
        help="passes over the pairs that train the lexical channel's table, at least 300 steps "
        "(0: keep its random count sketch)",
    )
    embed.add_argument(
        "--lexical-weight",
        type=float,
        help="weight of the lexical channel's cosine against the encoder's (default: the best of a grid "
        "on held-out training pairs)",
    )
    embed.add_argument(
        "--teacher",
        type=Path,
        help="distil from this bundle (any, e.g. from `encoder import-hf`): its query x document "
        "similarities in each batch become soft targets next to the pairs' own labels",
    )
    embed.add_argument(
        "--teacher-weight",
        type=float,
        default=0.8,
        help="share of the teacher's soft targets in the loss (default 0.8; the rest is InfoNCE)",
    )
    embed.add_argument(
        "--teacher-temperature",
        type=_positive_float,
        default=0.05,
        help="sharpness of the teacher's similarity distribution (default 0.05)",
    )
    embed.add_argument(
        "--cache-dir", type=Path, help="teacher output cache (default $XDG_CACHE_HOME/encoder/teacher)"
    )
    _add_common_training(embed)
    _add_limit(embed)
    embed.set_defaults(handler=run_finetune_embed)

    rerank = finetune_kinds.add_parser(
        "rerank",
        help="a cross-encoder: relevance of [CLS] query [SEP] passage [SEP] from one logit",
        description="Train a cross-encoder on the init RUN's encoder: its layers read each text on "
        "its own (so it starts as the init's bi-encoder), one more block reads the pair together. Each "
        "query is scored against its positive, its negative (the row's own, else a mined one) and "
        "other rows' positives in the batch.",
    )
    rerank.add_argument("--init", required=True, type=Path, help="RUN to start from (pretrain or embed)")
    rerank.add_argument(
        "--train", required=True, type=Path, help='JSON lines {"query", "positive"[, "negative"]}'
    )
    rerank.add_argument("--out", required=True, type=Path, help="RUN directory")
    rerank.add_argument("--epochs", type=_positive_float, default=1.0)
    rerank.add_argument(
        "--in-batch-negatives",
        type=_positive_int,
        default=3,
        help="other rows' positives scored against each query (default 3)",
    )
    rerank.add_argument(
        "--negatives",
        choices=["first-stage", "bm25", "none"],
        help="where hard negatives come from: first-stage (the default from an embed run) draws 3 from the "
        "init's top 50 passages by its own embedding, the first stage the reranker will rerank, and "
        "trains only on rows whose positive is there; bm25 (the default from a pretrain run) mines one "
        "for each row without a negative; none uses rows' own and in-batch ones only",
    )
    rerank.add_argument(
        "--train-encoder",
        action=argparse.BooleanOptionalAction,
        help="fine-tune the encoder's layers too (default: only from a pretrain run; from an embed run "
        "they stay frozen and keep the bi-encoder's similarity)",
    )
    _add_common_training(rerank)
    _add_limit(rerank)
    rerank.set_defaults(handler=run_finetune_rerank)

    distill = subparsers.add_parser(
        "distill",
        help="train a student RUN to reproduce a teacher bundle's outputs on a corpus",
        description="Knowledge distillation: the teacher bundle (any, e.g. from `encoder import-hf`) runs "
        "once over the corpus through ONNX Runtime, its outputs cached on disk (resumable); the student "
        "then learns to match them. Runs under torchrun like pretrain.",
    )
    distill.add_argument("--teacher", required=True, type=Path, help="teacher bundle directory")
    distill.add_argument(
        "--corpus",
        required=True,
        type=Path,
        help='plain text (one text per line) or JSON lines {"text"[, "label"]} (labels: hard targets)',
    )
    distill.add_argument("--out", required=True, type=Path, help="RUN directory")
    distill.add_argument("--init", type=Path, help="RUN to start the student from (default: random init)")
    distill.add_argument(
        "--preset", choices=["tiny", "mini", "small", "base"], default="mini", help="random-init student size"
    )
    distill.add_argument("--tokenizer", type=Path, help="tokenizer.json of a random-init student")
    distill.add_argument(
        "--match-teacher-space",
        action="store_true",
        help="export the student's embedding in the teacher's space (a learned projection in the graph), "
        "so an index built with the teacher keeps working",
    )
    distill.add_argument(
        "--loss",
        choices=["cosine", "mse", "none"],
        help="direct embedding loss to the teacher's vectors (default: cosine with --match-teacher-space, "
        "else none, the relational term alone)",
    )
    distill.add_argument(
        "--relational-weight",
        type=float,
        default=1.0,
        help="weight of the in-batch similarity-structure term (default 1; 0: off)",
    )
    distill.add_argument("--relational-temperature", type=_positive_float, default=0.05)
    distill.add_argument(
        "--temperature", type=_positive_float, default=2.0, help="softens the teacher's logits (default 2)"
    )
    distill.add_argument(
        "--hard-weight",
        type=float,
        default=0.5,
        help="share of the cross-entropy on the corpus's own labels, where rows have one (default 0.5)",
    )
    distill.add_argument("--epochs", type=_positive_float, default=1.0)
    distill.add_argument(
        "--holdout", type=_positive_int, default=1000, help="rows held out for the agreement figures"
    )
    distill.add_argument(
        "--cache-dir", type=Path, help="teacher output cache (default $XDG_CACHE_HOME/encoder/teacher)"
    )
    distill.add_argument("--teacher-variant", choices=["fp32", "fp16", "int8"], default="fp32")
    distill.add_argument(
        "--teacher-provider", choices=["auto", "cpu", "cuda"], default="auto", help="ONNX Runtime provider"
    )
    _add_common_training(distill)
    _add_limit(distill)
    distill.set_defaults(handler=run_distill)

    evaluate = subparsers.add_parser("eval", help="evaluate a RUN")
    eval_kinds = evaluate.add_subparsers(dest="eval_kind", required=True, metavar="TASK")
    eval_classify = eval_kinds.add_parser("classify", help="accuracy and macro-F1")
    eval_classify.add_argument("--model", required=True, type=Path, help="classify RUN")
    eval_classify.add_argument(
        "--data", required=True, type=Path, help='JSON lines {"text", "label"|"labels"}'
    )
    _add_teacher_comparison(eval_classify)
    eval_classify.add_argument(
        "--probe-train",
        type=Path,
        help="with --teacher: score a linear probe on each model's frozen embeddings, fitted on these "
        "JSON lines (for a teacher without a classifier)",
    )
    eval_classify.add_argument(
        "--probe-limit", type=_positive_int, help="use only the first N rows of --probe-train"
    )
    eval_classify.set_defaults(handler=run_eval_classify)
    retrieval = eval_kinds.add_parser("retrieval", help="Recall@1/10 and MRR@10 of embedding search")
    retrieval.add_argument("--model", required=True, type=Path, help="RUN (any kind)")
    retrieval.add_argument(
        "--queries", required=True, type=Path, help='JSON lines {"id", "text", "relevant"}'
    )
    retrieval.add_argument("--corpus", required=True, type=Path, help='JSON lines {"id", "text"}')
    _add_teacher_comparison(retrieval)
    retrieval.add_argument(
        "--record",
        action="store_true",
        help="also store the figures in the run's summary (an export's manifest then carries them)",
    )
    retrieval.set_defaults(handler=run_eval_retrieval)
    eval_rerank = eval_kinds.add_parser(
        "rerank",
        help="MRR@10 and nDCG@10 of a first stage's top candidates reranked, against the first stage alone",
    )
    eval_rerank.add_argument("--model", required=True, type=Path, help="rerank RUN")
    eval_rerank.add_argument(
        "--queries", required=True, type=Path, help='JSON lines {"id", "text", "relevant"}'
    )
    eval_rerank.add_argument("--corpus", required=True, type=Path, help='JSON lines {"id", "text"}')
    eval_rerank.add_argument(
        "--first-stage",
        default="bm25",
        help="bm25 (default), or an embed RUN directory whose cosine ranks the corpus",
    )
    eval_rerank.add_argument(
        "--depth", type=_positive_int, default=50, help="first-stage candidates reranked (default 50)"
    )
    eval_rerank.add_argument("--limit", type=_positive_int, help="evaluate only the first N queries")
    eval_rerank.set_defaults(handler=run_eval_rerank)


def _add_teacher_comparison(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--teacher", type=Path, help="also score this teacher bundle (ONNX Runtime) and compare the two"
    )
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads for the teacher")
    parser.add_argument(
        "--cache-dir", type=Path, help="with --teacher: cache its outputs here (as distill does) for reuse"
    )


def run_data_wordnet(args: argparse.Namespace) -> dict[str, Any]:
    from model.wordnet import build_wordnet_data

    return build_wordnet_data(args.out, args.wordnet_dir)


def run_data_debian(args: argparse.Namespace) -> dict[str, Any]:
    from model.debian_packages import build_debian_data

    return build_debian_data(args.out, train_rows=args.train_rows)


def run_tokenizer_train(args: argparse.Namespace) -> dict[str, Any]:
    from model.data import read_text_lines
    from model.tokenizer import SPECIAL_TOKENS, train_tokenizer

    read_text_lines(args.corpus)  # a missing or empty corpus is a one-line error, not a trainer panic
    if args.vocab_size <= len(SPECIAL_TOKENS):
        raise ModelError(f"--vocab-size must exceed the {len(SPECIAL_TOKENS)} special tokens")
    tokenizer = train_tokenizer(args.corpus, args.vocab_size, args.out, args.max_seq_len)
    return {"tokenizer": str(args.out), "vocab_size": tokenizer.get_vocab_size()}


def run_pretrain(args: argparse.Namespace) -> dict[str, Any]:
    from model.pretrain import PretrainOptions, pretrain

    # Pretraining has no epoch count to plan from; checked before any data is read, naming the flags.
    if args.max_steps is None and args.budget_minutes is None:
        raise ModelError("give --max-steps or --budget-minutes to size the training schedule")
    options = PretrainOptions(
        tokenizer=args.tokenizer,
        corpus=args.corpus,
        preset=args.preset,
        out=args.out,
        budget_minutes=args.budget_minutes,
        max_steps=args.max_steps,
        seed=args.seed,
        device=args.device,
        objective=args.objective,
        mask_prob=args.mask_prob,
        position=args.position,
        seq_len=args.seq_len,
        long_fraction=args.long_fraction,
        checkpoint_every=args.checkpoint_every,
        stop_after_steps=args.stop_after_steps,
        resume=args.resume,
        compile=args.compile,
        threads=args.threads,
        progress=not args.no_progress,
    )
    if args.batch_size:
        options.batch_size = args.batch_size
    if args.lr:
        options.lr = args.lr
    return pretrain(options)


def _fine_tune_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options every fine-tune takes from the common training flags (_add_common_training, _add_limit)."""
    return {
        "seed": args.seed,
        "device": args.device,
        "threads": args.threads,
        "budget_minutes": args.budget_minutes,
        "max_steps": args.max_steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "limit": args.limit,
        "progress": not args.no_progress,
    }


def run_finetune_classify(args: argparse.Namespace) -> dict[str, Any]:
    from model.finetune import ClassifyOptions, finetune_classify

    options = ClassifyOptions(
        init=args.init,
        train=args.train,
        eval=args.eval,
        out=args.out,
        epochs=args.epochs,
        multi_label=args.multi_label,
        freeze_encoder=args.freeze_encoder,
        pairs=args.pairs,
        refit_heads=args.refit_heads,
        head_c=args.head_c,
        lexical_buckets=args.lexical_buckets,
        class_balance=args.class_balance,
        **_fine_tune_options(args),
    )
    return finetune_classify(options)


def run_finetune_embed(args: argparse.Namespace) -> dict[str, Any]:
    from model.finetune import EmbedOptions, finetune_embed

    options = EmbedOptions(
        init=args.init,
        train=args.train,
        out=args.out,
        epochs=args.epochs,
        matryoshka=args.matryoshka or [],
        temperature=args.temperature,
        dropout=args.dropout,
        symmetric=not args.one_way,
        mine_negatives=args.mine_negatives,
        lexical_dim=args.lexical_dim,
        lexical_weight=args.lexical_weight,
        lexical_epochs=args.lexical_epochs,
        teacher=args.teacher,
        teacher_weight=args.teacher_weight,
        teacher_temperature=args.teacher_temperature,
        teacher_cache_dir=args.cache_dir,
        **_fine_tune_options(args),
    )
    return finetune_embed(options)


def run_finetune_rerank(args: argparse.Namespace) -> dict[str, Any]:
    from model.finetune import RerankOptions, finetune_rerank

    options = RerankOptions(
        init=args.init,
        train=args.train,
        out=args.out,
        epochs=args.epochs,
        in_batch_negatives=args.in_batch_negatives,
        negatives=args.negatives,
        train_encoder=args.train_encoder,
        **_fine_tune_options(args),
    )
    return finetune_rerank(options)


def run_distill(args: argparse.Namespace) -> dict[str, Any]:
    from model.distill import DistillOptions, distill

    if args.init is None and args.tokenizer is None:
        raise ModelError("a random-init student needs --tokenizer (or give --init RUN)")
    options = DistillOptions(
        teacher=args.teacher,
        corpus=args.corpus,
        out=args.out,
        init=args.init,
        preset=args.preset,
        tokenizer=args.tokenizer,
        match_teacher_space=args.match_teacher_space,
        direct_loss=args.loss,
        relational_weight=args.relational_weight,
        relational_temperature=args.relational_temperature,
        temperature=args.temperature,
        hard_weight=args.hard_weight,
        epochs=args.epochs,
        holdout=args.holdout,
        cache_dir=args.cache_dir,
        teacher_variant=args.teacher_variant,
        teacher_provider=args.teacher_provider,
        seed=args.seed,
        device=args.device,
        threads=args.threads,
        budget_minutes=args.budget_minutes,
        max_steps=args.max_steps,
        limit=args.limit,
        progress=not args.no_progress,
    )
    if args.batch_size:
        options.batch_size = args.batch_size
    if args.lr:
        options.lr = args.lr
    return distill(options)


def run_eval_classify(args: argparse.Namespace) -> dict[str, Any]:
    from model.compare import compare_classify
    from model.evaluate import evaluate_classifier

    if args.teacher is None:
        if args.probe_train is not None:
            raise ModelError("--probe-train compares with a teacher: give --teacher BUNDLE too")
        return evaluate_classifier(args.model, args.data)
    return compare_classify(
        args.model, args.teacher, args.data, args.probe_train, args.probe_limit, args.threads
    )


def run_eval_retrieval(args: argparse.Namespace) -> dict[str, Any]:
    from model.compare import compare_retrieval
    from model.evaluate import evaluate_retrieval
    from model.run import record_evaluation

    if args.teacher is not None:
        return compare_retrieval(
            args.model, args.teacher, args.queries, args.corpus, args.threads, args.cache_dir
        )
    figures = evaluate_retrieval(args.model, args.queries, args.corpus)
    if args.record:
        record_evaluation(args.model, "retrieval_eval", figures)
    return figures


def run_eval_rerank(args: argparse.Namespace) -> dict[str, Any]:
    from model.rerank import evaluate_rerank

    if args.depth == 0:
        raise ModelError("--depth must be at least 1")
    return evaluate_rerank(args.model, args.queries, args.corpus, args.first_stage, args.depth, args.limit)
