"""Unit tests of model/: the encoder, masking, schedule, metrics, RUN save/load and WordNet parsing."""

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from model.config import EncoderConfig, preset_config
from model.data import mask_tokens
from model.encoder import Encoder, InferenceModule, MaskedLMModel, mean_pool, optimizer_groups
from model.errors import ModelError
from model.metrics import classification_metrics, multilabel_metrics, retrieval_metrics
from model.run import load_run, save_run
from model.tokenizer import MASK_ID, SPECIAL_TOKENS, load_tokenizer, train_tokenizer
from model.training import Schedule
from model.wordnet import LEXNAMES, parse_data_line

TINY = dict(vocab_size=300, n_layer=2, n_head=2, n_embd=32, max_seq_len=16)


def test_presets_and_glu_width() -> None:
    mini = preset_config("mini", vocab_size=8192)
    assert (mini.n_embd, mini.n_layer, mini.max_seq_len) == (256, 4, 128)
    assert mini.ffn_hidden == 704  # 8/3 * 256 rounded up to a multiple of 64
    assert EncoderConfig.from_dict({**mini.to_dict(), "architecture": "x"}) == mini
    with pytest.raises(ValueError):
        preset_config("huge", vocab_size=10)


@pytest.mark.parametrize("position", ["learned", "sinusoidal"])
def test_fully_padded_row_is_finite_and_padding_does_not_leak(position: str) -> None:
    torch.manual_seed(0)
    module = InferenceModule(Encoder(EncoderConfig(**TINY, position=position)), torch.nn.Linear(32, 3)).eval()
    ids = torch.tensor([[2, 7, 8, 3, 0, 0], [0, 0, 0, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]])
    embedding, logits = module(ids, mask)
    assert embedding.shape == (2, 32) and logits.shape == (2, 3)
    assert torch.isfinite(embedding).all() and torch.isfinite(logits).all()
    assert torch.equal(embedding[1], torch.zeros(32))
    # The same text without padding gives the same embedding: padded keys are masked out.
    unpadded = module(ids[:1, :4], mask[:1, :4])[0]
    torch.testing.assert_close(unpadded[0], embedding[0], atol=1e-5, rtol=1e-5)


def test_mean_pool_ignores_padding() -> None:
    hidden = torch.tensor([[[1.0], [3.0], [100.0]]])
    assert mean_pool(hidden, torch.tensor([[1, 1, 0]])).item() == 2.0


def test_mlm_loss_only_on_masked_positions_and_tied_decoder() -> None:
    torch.manual_seed(0)
    model = MaskedLMModel(EncoderConfig(**TINY))
    ids = torch.randint(5, 300, (2, 8))
    labels = torch.full_like(ids, -100)
    labels[0, 3] = ids[0, 3]
    loss = model(ids, torch.ones_like(ids), labels)
    assert abs(loss.item() - math.log(300)) < 1.0  # one position, near-uniform prediction at init
    loss.backward()
    assert model.encoder.tok_emb.weight.grad is not None
    names = [name for name, _ in model.named_parameters()]
    assert [name for name in names if "bias" in name] == ["mlm_bias"]  # the decoder's, nothing else
    model.init_bias_from_frequencies(torch.tensor([7, 7, 7, 9]))
    assert model.mlm_bias.argmax().item() == 7
    assert torch.exp(model.mlm_bias).sum().item() == pytest.approx(1.0)
    decay, no_decay = optimizer_groups(model, 0.01)
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])


def test_masking_statistics() -> None:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(len(SPECIAL_TOKENS), 1000, (256, 128))
    ids[:, 0], ids[:, -1], ids[:4, 100:] = 2, 3, 0  # [CLS], [SEP], [PAD] must never be chosen
    inputs, labels = mask_tokens(ids, 1000, 0.3, generator)
    chosen = labels != -100
    special = ids < len(SPECIAL_TOKENS)
    assert not chosen[special].any()
    assert torch.equal(labels[chosen], ids[chosen])
    assert abs(chosen.sum().item() / (~special).sum().item() - 0.3) < 0.01
    as_mask = (inputs[chosen] == MASK_ID).float().mean().item()
    unchanged = (inputs[chosen] == ids[chosen]).float().mean().item()
    assert abs(as_mask - 0.8) < 0.02
    assert abs(unchanged - 0.1) < 0.02  # random replacements rarely hit the original token
    assert torch.equal(inputs[~chosen], ids[~chosen])
    assert (inputs[chosen] >= len(SPECIAL_TOKENS)).logical_or(inputs[chosen] == MASK_ID).all()


def test_schedule_by_steps_and_by_time() -> None:
    by_steps = Schedule(peak_lr=1.0, max_steps=100, budget_seconds=None)
    rates = [by_steps.lr(step, 0.0) for step in range(100)]
    assert rates[0] < rates[5] == pytest.approx(1.0) and rates[-1] < 0.02
    assert by_steps.done(100, 0.0) and not by_steps.done(99, 0.0)
    by_time = Schedule(peak_lr=1.0, max_steps=None, budget_seconds=60.0)
    assert by_time.lr(0, 0.06) == pytest.approx(1.0) and by_time.lr(0, 0.99) < 0.02
    assert by_time.done(10**9, 1.0) and not by_time.done(10**9, 0.5)
    with pytest.raises(ModelError):
        Schedule(peak_lr=1.0, max_steps=None, budget_seconds=None)


def test_metrics() -> None:
    scores = classification_metrics(["a", "a", "b", "c"], ["a", "b", "b", "c"])
    assert scores["accuracy"] == 0.75
    assert scores["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    assert multilabel_metrics([{"a"}, {"a", "b"}], [{"a"}, {"a"}])["accuracy"] == 0.5
    ranked = [["d1", "d2"], ["d3", "d1"], ["d9"]]
    result = retrieval_metrics(ranked, [{"d1"}, {"d1"}, {"d1"}])
    assert result == pytest.approx({"recall@1": 1 / 3, "recall@10": 2 / 3, "mrr@10": (1 + 0.5) / 3})


def test_tokenizer_special_tokens_and_truncation(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the cat number {i} sat on the mat" for i in range(50)))
    train_tokenizer([corpus], 120, tmp_path / "tok.json", max_seq_len=8, show_progress=False)
    tokenizer = load_tokenizer(tmp_path / "tok.json")
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    encoding = tokenizer.encode("the cat sat on the mat the cat sat on the mat")
    assert len(encoding.ids) == 8 and encoding.ids[0] == 2 and encoding.ids[-1] == 3
    # Ids are canonical (special tokens, then the learned tokens sorted), so a retrained tokenizer
    # numbers its tokens the same way, and the learned tokens still tokenise whole words.
    vocabulary = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    learned = [token for token, _ in vocabulary[len(SPECIAL_TOKENS) :]]
    assert learned == sorted(learned) and "cat" in learned
    assert tokenizer.encode("the cat").tokens == ["[CLS]", "the", "cat", "[SEP]"]
    train_tokenizer([corpus], 120, tmp_path / "again.json", max_seq_len=8, show_progress=False)
    assert (tmp_path / "again.json").read_bytes() == (tmp_path / "tok.json").read_bytes()


def test_run_round_trip_and_corrupt_weights(tiny_runs: Any, tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = EncoderConfig(**TINY)
    encoder, classifier = Encoder(config), torch.nn.Linear(32, 2)
    weights = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    weights.update({f"classifier.{k}": v for k, v in classifier.state_dict().items()})
    run_dir = save_run(
        tmp_path / "run",
        kind="classify",
        config=config,
        weights=weights,
        tokenizer_path=tiny_runs.tokenizer,
        labels=["no", "yes"],
        normalize=True,
        matryoshka_dims=[16],
    )
    run = load_run(run_dir)
    assert (run.kind, run.labels, run.normalize, run.matryoshka_dims) == (
        "classify",
        ["no", "yes"],
        True,
        [16],
    )
    assert run.parameter_count == sum(p.numel() for p in encoder.parameters()) + 66
    ids, mask = torch.tensor([[2, 9, 3]]), torch.ones(1, 3, dtype=torch.int64)
    expected = InferenceModule(encoder, classifier).eval()(ids, mask)
    for got, want in zip(run.inference_module()(ids, mask), expected, strict=True):
        torch.testing.assert_close(got, want)
    (run_dir / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ModelError, match="corrupt checkpoint"):
        load_run(run_dir)
    with pytest.raises(ModelError, match="not found"):
        load_run(tmp_path / "missing")


def test_parse_wordnet_line() -> None:
    line = (
        "00001740 00 a 01 able 0 005 = 05200169 n 0000 | (usually followed by `to') having the necessary "
        'means; "able to swim"; "she was able to program her computer"  \n'
    )
    synset = parse_data_line(line, "adj")
    assert synset is not None
    assert synset.lexname == "adj.all" and synset.lemmas == ("able",)
    assert synset.definition == "(usually followed by `to') having the necessary means"
    assert synset.examples == ("able to swim", "she was able to program her computer")
    assert parse_data_line("  1 This software and database is being provided\n", "noun") is None
    assert len(LEXNAMES) == 45 and LEXNAMES[5] == "noun.animal"


def test_parse_debian_descriptions_and_sections() -> None:
    from model.debian_packages import parse_sections, parse_translation

    translation = (
        "Package: foo\nDescription-md5: 0\nDescription-en: a tool for foo\n"
        " Foo does things\n with bars.\n .\n Second paragraph.\n\n"
        "Package: empty\nDescription-en: only a synopsis\n"
    )
    assert parse_translation(translation) == {
        "foo": ("a tool for foo", "Foo does things with bars. Second paragraph.")
    }
    dumpavail = "Package: foo\nVersion: 1\nSection: contrib/science\n\nPackage: bar\nSection: games\n"
    assert parse_sections(dumpavail) == {"foo": "science", "bar": "games"}


def test_default_training_threads_follow_the_cpus_the_process_may_use() -> None:
    # A child pinned to one CPU (as taskset or a container's cpuset would) trains on one thread, even
    # on a host with more.
    script = "from model.training import set_threads; print(set_threads(None))"
    pinned = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        preexec_fn=lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}),
    )
    assert pinned.stdout.strip() == "1"
    free = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert free.stdout.strip() == str(min(4, len(os.sched_getaffinity(0))))


def test_the_heads_fit_has_a_bounded_amount_of_work() -> None:
    from model.finetune import HEAD_MAX_ITERATIONS, head_iterations

    assert head_iterations(4000) == HEAD_MAX_ITERATIONS  # a few thousand rows: run to convergence
    assert head_iterations(105_952) == HEAD_MAX_ITERATIONS  # WordNet's 106k rows: the full iteration cap
    assert head_iterations(320_000) == 100  # larger sets: the row-iteration budget bounds the fit
    assert head_iterations(10**9) == 20


@pytest.mark.parametrize(
    ("option", "message"),
    [("lexical_dim", "lexical_dim must be"), ("lexical_epochs", "lexical_epochs must be")],
)
def test_finetune_embed_refuses_negative_lexical_options(
    tiny_runs: Any, tmp_path: Path, option: str, message: str
) -> None:
    from model.finetune import EmbedOptions, finetune_embed

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"query": "a cat", "positive": "a small feline"}\n')
    options = EmbedOptions(init=tiny_runs.embed_run, train=pairs, out=tmp_path / "out", progress=False)
    setattr(options, option, -1)
    with pytest.raises(ModelError, match=message):
        finetune_embed(options)
    assert not (tmp_path / "out").exists()
