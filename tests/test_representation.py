"""Representations of any family through the operations training and retrieval apply to them: concatenating
chunks of different lengths (padded, masked), moving encoded rows between processes, gradient caching's product."""
from __future__ import annotations

import numpy as np
import torch

from retrieval_lab.models import representation
from retrieval_lab.models.grad_cache import in_batch_order
from retrieval_lab.models.representation import MultiVector


def multi(rows: int, length: int, real: list[int], seed: int = 0) -> MultiVector:
    vectors = torch.randn(rows, length, 3, generator=torch.Generator().manual_seed(seed))
    mask = torch.arange(length)[None] < torch.tensor(real)[:, None]
    return MultiVector(vectors * mask[..., None], mask)


def test_chunks_of_different_lengths_concatenate_padded_and_return_to_batch_order():
    a, b = multi(2, 4, [4, 2]), multi(1, 2, [1], seed=1)
    whole = representation.concat([a, b])
    assert whole.vectors.shape == (3, 4, 3) and whole.mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]]
    assert torch.equal(whole.vectors[2, :2], b.vectors[0]) and not whole.vectors[2, 2:].any()
    pieces = [(torch.tensor([2, 0]), None), (torch.tensor([1]), None)]  # chunk 1 held rows 2 and 0, chunk 2 row 1
    ordered = in_batch_order([a, b], pieces)
    assert torch.equal(ordered.vectors[2], a.vectors[0]) and torch.equal(ordered.vectors[0], a.vectors[1])
    assert torch.equal(ordered.vectors[1, :2], b.vectors[0]) and ordered.mask[1].tolist() == [1, 0, 0, 0]
    plain = [torch.randn(2, 3), torch.randn(1, 3)]
    assert torch.equal(in_batch_order(plain, pieces), torch.cat(plain)[[1, 2, 0]])


def test_encoded_rows_survive_the_trip_between_processes():
    encoded = representation.to_numpy(multi(3, 4, [4, 1, 3]))
    back = representation.from_flat_rows(representation.flat_rows(encoded), encoded)
    assert np.array_equal(back.vectors, encoded.vectors) and np.array_equal(back.mask, encoded.mask)
    vectors = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    assert representation.from_flat_rows(representation.flat_rows(vectors), vectors) is vectors


def test_the_cached_gradient_product_ignores_padding():
    """A chunk of 2 vectors against a gradient padded to 4: d(dot)/d(vectors) is the gradient's first 2 columns."""
    chunk = multi(2, 2, [2, 2])
    chunk.vectors.requires_grad_()
    grad = torch.randn(2, 4, 3)
    representation.dot(chunk, grad).backward()
    assert torch.equal(chunk.vectors.grad, grad[:, :2])
    room = MultiVector(np.zeros((3, 4, 3), np.float32), np.ones((3, 4), bool))
    room[np.array([2, 0])] = representation.to_numpy(multi(2, 2, [2, 1]))
    assert room.mask.tolist() == [[1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]]


def test_pooled_is_the_mean_of_each_texts_real_vectors():
    vectors = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
    mask = np.array([[True, False, True], [False, True, False]])
    expected = np.stack([(vectors[0, 0] + vectors[0, 2]) / 2, vectors[1, 1]])
    assert np.allclose(representation.pooled(MultiVector(vectors, mask)), expected)
    assert torch.allclose(representation.pooled(MultiVector(torch.from_numpy(vectors), torch.from_numpy(mask))),
                          torch.from_numpy(expected))
    single = torch.randn(2, 4)
    assert representation.pooled(single) is single
