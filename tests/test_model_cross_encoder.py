"""The two-stage cross-encoder (model/cross_encoder.py): it finds the two texts of a pair by the first
[SEP], its first stage reads each text exactly as the bi-encoder reads it alone, MaxSim counts the
query's words matched in the passage, and before training it scores a pair by the bi-encoder's
similarity of the two texts."""

from typing import Any

import torch
import torch.nn.functional as F

from model.cross_encoder import (
    CrossEncoder,
    late_interaction,
    pair_segments,
    segment_attention,
    segment_positions,
)
from model.encoder import mean_pool
from model.rerank import encode_pair, text_ids
from model.run import load_run
from model.tokenizer import CLS_ID, PAD_ID, SEP_ID, load_tokenizer


def test_segments_positions_and_attention_of_a_padded_pair() -> None:
    ids = torch.tensor([[CLS_ID, 10, 11, SEP_ID, 12, 13, 14, SEP_ID, PAD_ID]])
    mask = (ids != PAD_ID).long()
    query, passage = pair_segments(ids, mask)
    assert query.long().tolist() == [[1, 1, 1, 1, 0, 0, 0, 0, 0]]
    assert passage.long().tolist() == [[0, 0, 0, 0, 1, 1, 1, 1, 0]]
    assert segment_positions(query, passage).tolist() == [[0, 1, 2, 3, 1, 2, 3, 4, 0]]
    allowed = segment_attention(query, passage)[0, 0]
    assert allowed[1].long().tolist() == [1, 1, 1, 1, 0, 0, 0, 0, 0]  # a query token sees the query
    assert allowed[5].long().tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 0]  # a passage token the passage
    assert allowed[8].any()  # padding attends to something, to stay finite; pooling ignores it


def test_maxsim_averages_each_query_words_best_match_in_the_passage() -> None:
    ids = torch.tensor([[CLS_ID, 10, 11, SEP_ID, 12, 10, SEP_ID, PAD_ID]])
    hidden = F.one_hot(ids, num_classes=16).float()  # a token's vector: its id, so cosine 1 iff same word
    query, passage = pair_segments(ids, (ids != PAD_ID).long())
    # Word 10 is in the passage (cosine 1), word 11 is not (0); [CLS] and [SEP] do not count.
    assert late_interaction(ids, hidden, query, passage).tolist() == [0.5]


def test_the_first_stage_reads_the_query_as_the_bi_encoder_does(tiny_runs: Any) -> None:
    run = load_run(tiny_runs.embed_run)
    tokenizer = load_tokenizer(run.tokenizer_path)
    module = CrossEncoder(run.build_encoder()).eval()
    query, *passages = text_ids(tokenizer, ["the dog", "a dog sat on a mat", "an oak by the river"])
    alone_ids = torch.tensor([[CLS_ID, *query, SEP_ID]])
    with torch.no_grad():
        alone = mean_pool(module.encoder(alone_ids, torch.ones_like(alone_ids)), torch.ones_like(alone_ids))
        for passage in passages:
            pair = torch.tensor([encode_pair(query, passage, 32)])
            x, query_mask, _ = module.read_apart(pair, torch.ones_like(pair))
            in_pair = mean_pool(module.encoder.norm_out(x), query_mask)
            # Whatever passage follows, the query's vector is the one the bi-encoder gives it alone.
            assert torch.allclose(in_pair, alone, atol=1e-5)


def test_before_training_the_score_is_the_bi_encoders_similarity(tiny_runs: Any) -> None:
    run = load_run(tiny_runs.embed_run)
    tokenizer = load_tokenizer(run.tokenizer_path)
    module = CrossEncoder(run.build_encoder()).eval()
    query, passage = text_ids(tokenizer, ["the dog", "a dog sat on a mat"])
    pair = torch.tensor([encode_pair(query, passage, 32)])
    with torch.no_grad():
        _, logits = module(pair, torch.ones_like(pair))
        x, query_mask, passage_mask = module.read_apart(pair, torch.ones_like(pair))
        hidden = module.encoder.norm_out(x)
        cosine = F.cosine_similarity(mean_pool(hidden, query_mask), mean_pool(hidden, passage_mask))
    assert torch.allclose(logits[:, 0], module.scale * cosine, atol=1e-5)
