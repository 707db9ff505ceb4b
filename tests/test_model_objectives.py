"""The training objectives on tiny tensors: ELECTRA's replaced-token labels and loss masking, the
contrastive loss in both directions, BM25 and first-stage negative mining, seeded batches and the
shared loop."""

import math

import pytest
import torch
import torch.nn.functional as F

from model.config import EncoderConfig
from model.data import TokenizedTexts
from model.electra import (
    ReplacedTokenDetectionModel,
    choose_positions,
    replaced_token_labels,
    replaced_token_loss,
)
from model.finetune import class_weights, contrastive_loss
from model.lexical import LexicalSketch, sparse_shares
from model.metrics import retrieval_metrics
from model.negatives import first_stage_negatives, mine_bm25_negatives
from model.tokenizer import MASK_ID, SPECIAL_TOKENS
from model.training import LoopState, Schedule, StepResult, TrainLoop, batch_rows

TINY = dict(vocab_size=300, n_layer=2, n_head=2, n_embd=32, max_seq_len=16)


def test_replaced_labels_mark_only_changed_tokens() -> None:
    original = torch.tensor([[2, 10, 11, 12, 3, 0]])
    # position 1 replaced by another token, position 2 "replaced" by the same token (a correct guess).
    corrupted = torch.tensor([[2, 99, 11, 12, 3, 0]])
    assert replaced_token_labels(original, corrupted).tolist() == [[0.0, 1.0, 0.0, 0.0, 0.0, 0.0]]


def test_detection_loss_ignores_padding() -> None:
    labels = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    logits = torch.tensor([[-2.0, 3.0, -1.0, 0.0]])
    expected = F.binary_cross_entropy_with_logits(logits[:, :3], labels[:, :3])
    assert replaced_token_loss(logits, labels, mask).item() == pytest.approx(expected.item())
    # Whatever the model says at a padded position, the loss does not move.
    logits[0, 3] = 50.0
    assert replaced_token_loss(logits, labels, mask).item() == pytest.approx(expected.item())


def test_choose_positions_never_picks_special_tokens() -> None:
    ids = torch.randint(len(SPECIAL_TOKENS), 300, (64, 32))
    ids[:, 0], ids[:, -1], ids[:8, 20:] = 2, 3, 0
    chosen = choose_positions(ids, 0.15, torch.Generator().manual_seed(0))
    assert not chosen[ids < len(SPECIAL_TOKENS)].any()
    share = chosen.sum().item() / (ids >= len(SPECIAL_TOKENS)).sum().item()
    assert abs(share - 0.15) < 0.02


def test_electra_corrupts_only_chosen_positions_and_masks_the_generator_input() -> None:
    torch.manual_seed(0)
    model = ReplacedTokenDetectionModel(EncoderConfig(**TINY))
    ids = torch.randint(len(SPECIAL_TOKENS), 300, (4, 12))
    ids[:, 0], ids[:, 11] = 2, 3
    mask = torch.ones_like(ids)
    mask[0, 8:], ids[0, 8:] = 0, 0
    chosen = choose_positions(ids, 0.4, torch.Generator().manual_seed(1))
    seen: dict[str, torch.Tensor] = {}
    model.encoder.register_forward_pre_hook(lambda _, args: seen.update(discriminator=args[0].clone()))
    original_embed = model.encoder.embed

    def record_embed(input_ids: torch.Tensor) -> torch.Tensor:
        seen.setdefault("generator", input_ids.clone())
        return original_embed(input_ids)

    model.encoder.embed = record_embed  # type: ignore[method-assign]
    loss, logs = model(ids, mask, chosen, torch.Generator().manual_seed(2))
    generator_input, corrupted = seen["generator"], seen["discriminator"]
    assert torch.equal(generator_input[chosen], torch.full_like(ids[chosen], MASK_ID))
    assert torch.equal(generator_input[~chosen], ids[~chosen])
    assert torch.equal(corrupted[~chosen], ids[~chosen])  # nothing outside the chosen positions moves
    changed = (corrupted != ids).float()
    assert logs["replaced_share"] == pytest.approx(changed[mask.bool()].mean().item())
    assert changed.sum() > 0  # an untrained generator almost never guesses the original token
    assert math.isfinite(loss.item())
    loss.backward()
    assert model.rtd_head.weight.grad is not None and model.encoder.tok_emb.weight.grad is not None


def test_contrastive_loss_directions() -> None:
    torch.manual_seed(0)
    queries, documents = torch.randn(4, 8), torch.randn(6, 8)  # 4 positives, then 2 hard negatives
    q, d = F.normalize(queries, dim=1), F.normalize(documents, dim=1)
    scores = q @ d.T / 0.1
    targets = torch.arange(4)
    forward = F.cross_entropy(scores, targets)
    backward = F.cross_entropy(scores[:, :4].T, targets)
    assert contrastive_loss(queries, documents, 0.1, []).item() == pytest.approx(forward.item(), rel=1e-5)
    symmetric = contrastive_loss(queries, documents, 0.1, [], symmetric=True)
    assert symmetric.item() == pytest.approx((forward + backward).item() / 2, rel=1e-5)
    aligned = contrastive_loss(documents[:4], documents, 0.1, [], symmetric=True)
    assert aligned < symmetric


def test_bm25_negatives_share_words_and_never_repeat_the_positive() -> None:
    positives = [
        "a large cat of the savanna",
        "a small domestic cat",
        "a tool for cutting wood",
        "a tool for driving nails",
        "a sweet baked food",
        "a bread baked in an oven",
    ]
    queries = ["lion cat", "kitten cat", "saw wood tool", "hammer nails tool", "cake baked", "zebra"]
    given: list[str | None] = [None, None, None, "given negative", None, None]
    negatives, mined = mine_bm25_negatives(queries, positives, given, seed=0, skip=0, depth=6)
    assert mined == 4 and negatives[3] == "given negative"
    assert negatives[5] is None  # no other document shares a word with "zebra"
    # The only other document sharing a query word: the other cat, the other tool, the other baked food.
    assert negatives[:3] == ["a small domestic cat", "a large cat of the savanna", "a tool for driving nails"]
    assert negatives[4] == "a bread baked in an oven"
    only_first, mined = mine_bm25_negatives(queries, positives, given, seed=0, skip=0, depth=6, rows={0})
    assert mined == 1 and only_first[0] == "a small domestic cat" and only_first[1:] == given[1:]


def test_first_stage_negatives_come_from_its_top_and_only_where_it_finds_the_positive() -> None:
    # A made-up first stage: texts are points on a line; a query's nearest passages are its neighbours.
    points = {f"p{i}": float(i) for i in range(10)} | {f"x{i}": i + 0.1 for i in range(10)}
    points |= {"q0": 0.1, "q0 again": 0.2, "q9": 9.1}

    def embed(texts: list[str], desc: str) -> torch.Tensor:
        return torch.tensor([[math.cos(points[t] / 5), math.sin(points[t] / 5)] for t in texts])

    # The passages are the positives: p0-p5 and p9. q9's positive p2 is far from q9, and p9 from "q0 again".
    queries = ["q0", "q0", "q9", "q0 again", "x3", "x4", "x5"]
    positives = ["p0", "p1", "p2", "p9", "p3", "p4", "p5"]
    kept, negatives = first_stage_negatives(embed, queries, positives, seed=0, depth=3, count=2)
    assert kept == [0, 1, 4, 5, 6]
    # q0's top 3 are p0, p1 and p2; p0 and p1 are both its positives, so only p2 is a negative.
    assert negatives[:2] == [["p2"], ["p2"]]
    assert sorted(negatives[2]) == ["p2", "p4"] and sorted(negatives[3]) == ["p3", "p5"]


def test_batch_rows_are_distinct_within_a_batch_and_seeded() -> None:
    rows = [batch_rows(10, 4, seed=3, step=step) for step in range(4)]
    assert all(len(set(batch)) == 4 for batch in rows)
    assert set(rows[0]) | set(rows[1]) <= set(range(10)) and not set(rows[0]) & set(rows[1])
    assert rows == [batch_rows(10, 4, seed=3, step=step) for step in range(4)]
    assert rows != [batch_rows(10, 4, seed=4, step=step) for step in range(4)]


def test_train_loop_follows_schedule_clips_and_stops() -> None:
    weight = torch.nn.Parameter(torch.tensor([10.0]))
    optimizer = torch.optim.SGD([weight], lr=0.0)
    seen_lrs: list[float] = []

    def step_loss(step: int) -> StepResult:
        seen_lrs.append(optimizer.param_groups[0]["lr"])
        return StepResult((weight**2).sum() * 100, tokens=3, logs={"part": 1.0})

    loop = TrainLoop("t", [weight], optimizer, Schedule(0.1, 10, None), None, grad_clip=1.0, progress=False)
    state = loop.run(step_loss, stop_at=4)
    assert state.step == 4 and not loop.finished()
    # Clipped to norm 1 each step, so the weight moves by exactly lr per step.
    assert weight.item() == pytest.approx(10.0 - sum(seen_lrs), rel=1e-5)
    resumed = TrainLoop(
        "t",
        [weight],
        optimizer,
        Schedule(0.1, 10, None),
        None,
        progress=False,
        state=LoopState.from_dict(state.to_dict()),
    )
    assert resumed.run(step_loss).step == 10 and resumed.finished()
    assert seen_lrs == [Schedule(0.1, 10, None).lr(step, 0.0) for step in range(10)]
    assert seen_lrs[0] > 0 and seen_lrs[-1] < seen_lrs[5]
    assert resumed.summary()["tokens"] == 30


def test_length_chunked_embeddings_equal_one_padded_batch() -> None:
    from model.data import TokenizedTexts
    from model.encoder import Encoder, mean_pool
    from model.finetune import pooled_embeddings

    torch.manual_seed(0)
    encoder = Encoder(EncoderConfig(**TINY)).eval()
    lengths = [3, 12, 5, 16, 4, 9, 7, 2, 14, 6, 11, 3, 8, 10, 5, 13, 4, 15, 6, 9]
    tokens = TokenizedTexts([[2, *torch.randint(5, 300, (n - 2,)).tolist(), 3] for n in lengths])
    rows = [19, 0, 7, 3, 12, 5, 8, 1, 17, 2, 10, 4, 15, 6, 14, 9, 11, 13, 16, 18]
    chunked, real = pooled_embeddings(encoder, tokens, rows, torch.device("cpu"))
    input_ids, attention_mask = tokens.batch(rows)
    whole = mean_pool(encoder(input_ids, attention_mask), attention_mask)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)
    assert real == sum(lengths)


def test_lexical_head_is_a_linear_model_on_the_sublinear_tfidf_of_tokens_and_bigrams() -> None:
    from model.data import TokenizedTexts
    from model.lexical import LexicalHead, inverse_document_frequencies

    vocab, buckets = 50, 64
    texts = TokenizedTexts([[2, 7, 9, 7, 3], [2, 7, 9, 3], [2, 9, 11, 3], [2, 12, 3]])
    idf = inverse_document_frequencies(texts, vocab, [0, 1, 2, 3, 4], buckets, min_document_frequency=2)
    bigram = {pair: vocab + (pair[0] * 1_000_003 + pair[1]) % buckets for pair in ((7, 9), (9, 7), (2, 7))}
    # Seen in two of the four texts: log(5 / 3) + 1. In one text only (11, 12, (9, 7)): no evidence.
    for feature in (7, bigram[(7, 9)], bigram[(2, 7)]):
        assert idf[feature].item() == pytest.approx(math.log(5 / 3) + 1)
    assert idf[9].item() == pytest.approx(math.log(5 / 4) + 1)  # in three texts
    assert idf[11] == idf[12] == idf[bigram[(9, 7)]] == idf[2] == 0.0

    torch.manual_seed(0)
    head = LexicalHead(idf, vocab, n_labels=3)
    torch.nn.init.normal_(head.weight)
    # Text 0 by hand: token 7 occurs twice (1 + log 2), 9 once, bigrams (2,7) and (7,9) once each.
    values = {7: idf[7] * (1 + math.log(2)), 9: idf[9], bigram[(2, 7)]: idf[bigram[(2, 7)]]}
    values[bigram[(7, 9)]] = idf[bigram[(7, 9)]]
    norm = math.sqrt(sum(value.item() ** 2 for value in values.values()))
    expected = sum(value / norm * head.weight[feature] for feature, value in values.items())
    ids, mask = torch.tensor([[2, 7, 9, 7, 3, 0, 0]]), torch.tensor([[1, 1, 1, 1, 1, 0, 0]])
    torch.testing.assert_close(head(ids, mask)[0], expected)
    # Served batches pad: padding, whatever its ids, changes nothing.
    torch.testing.assert_close(head(torch.tensor([[2, 7, 9, 7, 3, 44, 45]]), mask), head(ids, mask))
    # The sparse matrix the fit uses holds the same vectors.
    matrix = head.tfidf_matrix(texts, [0, 1, 2, 3])
    torch.testing.assert_close(torch.sparse.mm(matrix, head.weight), head(*texts.batch([0, 1, 2, 3])))
    torch.testing.assert_close(matrix.to_dense()[0].norm(), torch.tensor(1.0))
    assert matrix.to_dense()[3].abs().sum() == 0  # nothing in text 3 was seen twice


def test_lexical_sketch_is_the_sublinear_tfidf_vector_projected_and_ignores_padding() -> None:
    idf = torch.rand(50) + 0.5
    idf[:5] = 0.0  # special tokens
    sketch = LexicalSketch(idf, dim=16, seed=3)
    # Untrained, the table is a count sketch: one +-1 per token row.
    assert torch.equal((sketch.table != 0).sum(dim=1), torch.ones(50, dtype=torch.long))
    assert set(sketch.table.abs().sum(dim=1).tolist()) == {1.0}
    ids, mask = torch.tensor([[2, 7, 9, 7, 3, 0, 0]]), torch.tensor([[1, 1, 1, 1, 1, 0, 0]])
    expected = torch.zeros(16)
    for token, tf in ((7, 2), (9, 1)):  # [CLS] and [SEP] carry nothing; 7 occurs twice
        expected += sketch.table[token] * idf[token] * (1 + math.log(tf))
    torch.testing.assert_close(sketch(ids, mask)[0], expected / expected.norm())
    torch.testing.assert_close(sketch(torch.tensor([[2, 7, 9, 7, 3, 44, 45]]), mask), sketch(ids, mask))
    rebuilt = LexicalSketch.from_state(sketch.state_dict(), 16)
    torch.testing.assert_close(rebuilt(ids, mask), sketch(ids, mask))
    # The sparse TF-IDF rows the table trains on, times the table, are what the graph sums.
    texts = TokenizedTexts([[2, 7, 9, 7, 3], [2, 11, 3]])
    matrix = sparse_shares(texts, [0, 1], sketch.shares, 50)
    torch.testing.assert_close(
        F.normalize(torch.sparse.mm(matrix, sketch.table), dim=1), sketch(*texts.batch([0, 1]))
    )
    # Runs saved before the table was learned hold the sketch's columns and signs.
    column, sign = sketch.table.abs().argmax(dim=1), sketch.table.sum(dim=1)
    old = LexicalSketch.from_state({"idf": idf, "column": column, "sign": sign}, 16)
    torch.testing.assert_close(old(ids, mask), sketch(ids, mask))


def _synonym_pairs(count: int, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """Queries of 3 tokens from 10-39 and positives of their synonyms (token + 30) in another order, with
    [CLS]=2 and [SEP]=3 around: no token is shared, so TF-IDF cannot match a query to its positive."""
    generator = torch.Generator().manual_seed(seed)
    queries, positives = [], []
    for _ in range(count):
        words = (torch.randperm(30, generator=generator)[:3] + 10).tolist()
        queries.append([2, *words, 3])
        positives.append([2, *[word + 30 for word in reversed(words)], 3])
    return queries, positives


def _held_out_mrr(sketch: LexicalSketch, queries: list[list[int]], positives: list[list[int]]) -> float:
    with torch.no_grad():
        query = sketch(*TokenizedTexts(queries).batch(list(range(len(queries)))))
        positive = sketch(*TokenizedTexts(positives).batch(list(range(len(positives)))))
    top = (query @ positive.T).topk(10, dim=1).indices.tolist()
    return retrieval_metrics(top, [{row} for row in range(len(queries))])["mrr@10"]


def test_lexical_table_learns_from_pairs_what_goes_together_and_nothing_from_shuffled_pairs() -> None:
    idf = torch.ones(80)
    idf[:5] = 0.0
    queries, positives = _synonym_pairs(600, seed=0)
    test_queries, test_positives = _synonym_pairs(100, seed=1)  # new combinations of the same words
    untrained = _held_out_mrr(LexicalSketch(idf, dim=32), test_queries, test_positives)
    trained = LexicalSketch(idf, dim=32)
    losses = trained.train_table(TokenizedTexts(queries), TokenizedTexts(positives), steps=150, seed=0)
    assert losses["last_loss"] < losses["first_loss"] / 2, losses
    shuffled = LexicalSketch(idf, dim=32)
    order = torch.randperm(600, generator=torch.Generator().manual_seed(2)).tolist()
    shuffled.train_table(
        TokenizedTexts(queries), TokenizedTexts([positives[row] for row in order]), steps=150, seed=0
    )
    figures = {
        "untrained": untrained,
        "trained": _held_out_mrr(trained, test_queries, test_positives),
        "shuffled": _held_out_mrr(shuffled, test_queries, test_positives),
    }
    assert figures["trained"] > 0.8 and figures["untrained"] < 0.3 and figures["shuffled"] < 0.3, figures


def test_hybrid_embedding_cosine_is_the_weighted_mean_of_both_cosines() -> None:
    from model.lexical import hybrid_embedding

    torch.manual_seed(0)
    dense, lexical = torch.randn(2, 8), F.normalize(torch.randn(2, 12), dim=1)
    hybrid = hybrid_embedding(dense, lexical, weight=2.0)
    torch.testing.assert_close(hybrid.norm(dim=1), torch.ones(2))
    dense_cos = F.cosine_similarity(dense[0], dense[1], dim=0)
    lexical_cos = lexical[0] @ lexical[1]
    torch.testing.assert_close(hybrid[0] @ hybrid[1], (dense_cos + 2.0 * lexical_cos) / 3.0)


def test_class_weights_follow_inverse_frequency_to_the_given_power() -> None:
    # 6 rows: class 0 has 4, class 1 has 2, class 2 none.
    targets = F.one_hot(torch.tensor([0, 0, 0, 0, 1, 1]), num_classes=3).float()
    balanced = class_weights(targets, 1.0)
    assert torch.allclose(balanced, torch.tensor([6 / (3 * 4), 6 / (3 * 2), 0.0]))
    assert torch.allclose(class_weights(targets, 0.5), torch.tensor([0.5**0.5, 1.0, 0.0]))
    assert torch.allclose(class_weights(targets, 0.0), torch.tensor([1.0, 1.0, 0.0]))
    # Fully balanced weights make both classes contribute equally to the loss's numerator.
    per_class = balanced[:2] * targets[:, :2].sum(dim=0)
    assert torch.allclose(per_class[0], per_class[1])
