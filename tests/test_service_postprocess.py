"""The routes' post-processing (service/postprocess.py) on plain arrays: no model, no server."""

import base64

import numpy as np

from service.postprocess import base64_rows, embedding_matrix, label_scores, similarities, top_labels

EMBEDDINGS = np.array([[3.0, 4.0, 12.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]], dtype=np.float32)


def test_matryoshka_truncates_before_normalising() -> None:
    matrix = embedding_matrix(EMBEDDINGS, dimensions=2, normalize=True)
    np.testing.assert_allclose(matrix, [[0.6, 0.8], [0.0, 0.0], [1.0, 0.0]], rtol=1e-6)
    assert matrix.dtype == np.float32 and matrix.flags.c_contiguous  # what orjson can serialise


def test_embeddings_unnormalised_and_full_width() -> None:
    matrix = embedding_matrix(EMBEDDINGS.astype(np.float64), dimensions=None, normalize=False)
    np.testing.assert_array_equal(matrix, EMBEDDINGS)
    assert matrix.dtype == np.float32
    normalised = embedding_matrix(EMBEDDINGS, dimensions=None, normalize=True)
    np.testing.assert_allclose(np.linalg.norm(normalised, axis=1), [1.0, 0.0, 1.0], rtol=1e-6)


def test_base64_rows_are_little_endian_float32() -> None:
    rows = base64_rows(EMBEDDINGS)
    decoded = np.stack([np.frombuffer(base64.b64decode(row), dtype="<f4") for row in rows])
    np.testing.assert_array_equal(decoded, EMBEDDINGS)


def test_softmax_sigmoid_and_raw_scores() -> None:
    logits = np.array([[1.0, 2.0, 3.0], [1000.0, 0.0, -1000.0]], dtype=np.float32)
    softmax = label_scores(logits, multi_label=False, raw_scores=False)
    expected = np.exp(logits[0] - 3) / np.exp(logits[0] - 3).sum()
    np.testing.assert_allclose(softmax[0], expected, rtol=1e-6)
    np.testing.assert_allclose(softmax[1], [1.0, 0.0, 0.0])  # large logits stay finite
    np.testing.assert_allclose(softmax.sum(axis=1), [1.0, 1.0], rtol=1e-6)
    sigmoid = label_scores(np.array([[0.0, np.log(3.0)]]), multi_label=True, raw_scores=False)
    np.testing.assert_allclose(sigmoid, [[0.5, 0.75]], rtol=1e-6)
    assert label_scores(logits, multi_label=False, raw_scores=True) is logits


def test_top_labels_best_first_ties_in_label_order() -> None:
    scores = np.array([[0.2, 0.5, 0.3], [0.4, 0.2, 0.4]])
    labels = ["animal", "plant", "tool"]
    assert top_labels(scores, labels, top_k=2) == [
        [{"label": "plant", "score": 0.5}, {"label": "tool", "score": 0.3}],
        [{"label": "animal", "score": 0.4}, {"label": "tool", "score": 0.4}],
    ]
    assert [len(row) for row in top_labels(scores, labels, top_k=None)] == [3, 3]


def test_similarities_are_cosines_with_the_first_row() -> None:
    # 3-4-12 has norm 13: its cosine with the x axis is 3/13; with itself 1; an all-zero row gives 0.
    rows = np.vstack([EMBEDDINGS[0], EMBEDDINGS[0] * 2, EMBEDDINGS[1], EMBEDDINGS[2]])
    np.testing.assert_allclose(similarities(rows), [1.0, 0.0, 3 / 13], rtol=1e-6)
