"""Gradient caching: contrastive batches larger than memory allows.

Gao et al. (2021), "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup". The loss depends on
the parameters only through the embeddings, so dL/dtheta = sum_i (dL/de_i) . (de_i/dtheta):

1. embed every chunk of ``chunk`` rows without a graph (remembering each chunk's random state); rows are taken
   longest first and each chunk is cut to its longest row, so short rows carry little padding;
2. take the loss on the full batch of embeddings and its gradient with respect to them (cheap);
3. re-embed chunk by chunk with the graph, replaying the random state so dropout draws the same masks, and
   back-propagate (e_chunk . g_chunk).sum(), which accumulates exactly the chunk's share of dL/dtheta.

Peak memory is one chunk's activations, whatever the batch size (MoCo's keys, which need no graph, are also
computed chunk by chunk).
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch

from retrieval_lab.models import representation


def split_inputs(inputs: dict, chunk: int) -> list[tuple[torch.Tensor, dict]]:
    """Chunks of up to ``chunk`` rows of a tokenised batch (a dict of equally long tensors), as (row indices, the
    inputs of those rows). With an attention mask, rows are taken longest first and each chunk is cut to its
    longest row, so that short rows are not padded to the batch's longest: the columns cut are padding that the
    mask hides, so the embeddings are unchanged (cropping batches of MiniLM at 128 tokens: 65% of the padded
    tokens are real, 86% in chunks of a quarter of the batch)."""
    first = next(iter(inputs.values()))
    mask = inputs.get("attention_mask")
    if mask is None or mask.dim() != 2 or first.size(0) <= chunk:  # one chunk: the batch as it is
        rows = torch.arange(first.size(0), device=first.device)
        return [(rows[i:i + chunk], {k: v[i:i + chunk] for k, v in inputs.items()}) for i in range(0, len(rows), chunk)]
    width = mask.size(1)
    ends = torch.where(mask.any(1), width - mask.flip(1).argmax(1), 0)  # one past each row's last real token
    order = torch.argsort(ends, descending=True, stable=True)
    longest = ends[order[::chunk]].tolist()  # each chunk's first row is its longest (one synchronisation)
    pieces = []
    for start, end in zip(range(0, len(order), chunk), longest):
        rows = order[start:start + chunk]
        pieces.append((rows, {k: v[rows][:, :max(1, end)] if v.dim() == 2 and v.size(1) == width else v[rows]
                              for k, v in inputs.items()}))
    return pieces


def in_batch_order(parts: list, pieces: list[tuple[torch.Tensor, dict]]):
    """The outputs of :func:`split_inputs`' chunks (``parts``: representations), put back in the batch's row order."""
    rows = torch.cat([rows for rows, _ in pieces])
    return representation.concat(parts)[torch.argsort(rows)]


def embed_in_chunks(embed: Callable, inputs: dict, chunk: int | None) -> torch.Tensor:
    """``embed(inputs)`` computed ``chunk`` rows at a time (all at once for None), for work without a graph whose
    batch would not fit in memory at once, such as MoCo's keys under gradient caching."""
    if not chunk:
        return embed(inputs)
    pieces = split_inputs(inputs, chunk)
    return in_batch_order([embed(piece) for _, piece in pieces], pieces)


class RandomState:
    """The CPU and CUDA random states at one moment; ``replay()`` runs a block from them again."""

    def __init__(self):
        self.cpu = torch.get_rng_state()
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        self.cuda = torch.cuda.get_rng_state_all() if cuda else None

    @contextmanager
    def replay(self):
        devices = list(range(len(self.cuda))) if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state_all(self.cuda)
            yield


def grad_cached_backward(towers: list[tuple[Callable, dict]], loss_fn: Callable[[list], torch.Tensor],
                         chunk: int, backward: Callable[[torch.Tensor], None] = torch.Tensor.backward) -> torch.Tensor:
    """Accumulate the parameter gradients of ``loss_fn(embeddings)`` where ``embeddings[t] = embed_t(inputs_t)``
    for each tower ``(embed_t, inputs_t)``, holding one chunk's graph at a time; an embedding is any
    representation (:mod:`~retrieval_lab.models.representation`: multi-vector chunks of different lengths are
    padded and masked). Returns the (detached) loss."""
    cached, states = [], []
    with torch.no_grad():
        for embed, inputs in towers:
            parts, tower_states = [], []
            pieces = split_inputs(inputs, chunk)
            for _, piece in pieces:
                tower_states.append(RandomState())
                parts.append(embed(piece))
            # float32 leaves: the loss's gradient is kept in float32 (in fp16 its small entries would flush to zero
            # before the loss scaler, which scales the re-encoded chunks' backward below, could lift them)
            cached.append(representation.leaf(in_batch_order(parts, pieces)))
            states.append((pieces, tower_states))
    loss = loss_fn(cached)
    grads = torch.autograd.grad(loss, [representation.values(c) for c in cached], allow_unused=True)
    for (embed, _), (pieces, tower_states), grad in zip(towers, states, grads):
        if grad is None:  # this tower does not reach the loss
            continue
        for (rows, piece), state in zip(pieces, tower_states):
            with state.replay():
                emb = embed(piece)
            backward(representation.dot(emb, grad[rows]))
    return loss.detach()
