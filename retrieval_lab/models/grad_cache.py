"""Gradient caching: contrastive batches larger than memory allows.

Gao et al. (2021), "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup". The loss depends on
the parameters only through the embeddings, so dL/dtheta = sum_i (dL/de_i) . (de_i/dtheta):

1. embed every chunk of ``chunk`` rows without a graph (remembering each chunk's random state);
2. take the loss on the full batch of embeddings and its gradient with respect to them (cheap);
3. re-embed chunk by chunk with the graph, replaying the random state so dropout draws the same masks, and
   back-propagate (e_chunk . g_chunk).sum(), which accumulates exactly the chunk's share of dL/dtheta.

Peak memory is one chunk's activations, whatever the batch size.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch


def split_inputs(inputs, chunk: int) -> list[dict]:
    """Row slices of a tokenised batch (a dict of equally long tensors)."""
    rows = next(iter(inputs.values())).size(0)
    return [{k: v[i:i + chunk] for k, v in inputs.items()} for i in range(0, rows, chunk)]


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


def grad_cached_backward(towers: list[tuple[Callable, dict]], loss_fn: Callable[[list[torch.Tensor]], torch.Tensor],
                         chunk: int, backward: Callable[[torch.Tensor], None] = torch.Tensor.backward) -> torch.Tensor:
    """Accumulate the parameter gradients of ``loss_fn(embeddings)`` where ``embeddings[t] = embed_t(inputs_t)``
    for each tower ``(embed_t, inputs_t)``, holding one chunk's graph at a time. Returns the (detached) loss."""
    cached, states = [], []
    with torch.no_grad():
        for embed, inputs in towers:
            parts, tower_states = [], []
            for piece in split_inputs(inputs, chunk):
                tower_states.append(RandomState())
                parts.append(embed(piece))
            cached.append(torch.cat(parts).detach().requires_grad_())
            states.append(tower_states)
    loss = loss_fn(cached)
    grads = torch.autograd.grad(loss, cached, allow_unused=True)
    for (embed, inputs), tower_states, grad in zip(towers, states, grads):
        if grad is None:  # this tower does not reach the loss
            continue
        start = 0
        for piece, state in zip(split_inputs(inputs, chunk), tower_states):
            with state.replay():
                emb = embed(piece)
            backward((emb * grad[start:start + emb.size(0)].to(emb.dtype)).sum())
            start += emb.size(0)
    return loss.detach()
