"""What a model family turns a text into, and the operations on a batch of them that training needs whatever
the family: concatenating chunks (gradient caching), taking rows, gathering from every process (DDP).

A representation is either a tensor with one row per text (N x D: one vector per text) or :class:`MultiVector`
(N x L x D vectors with an N x L mask: several vectors per text, padded). Batches of multi-vector texts of
different lengths are padded to the longest and masked, so every operation below works on both kinds.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class MultiVector:
    """Several vectors per text: ``vectors`` (N x L x D) and ``mask`` (N x L, True where a vector is real, False
    where it pads a text shorter than L). Torch tensors in training, numpy arrays once encoded for an index."""

    vectors: torch.Tensor
    mask: torch.Tensor

    def __len__(self) -> int:
        return len(self.vectors)

    def __getitem__(self, rows) -> "MultiVector":
        return MultiVector(self.vectors[rows], self.mask[rows])

    @property
    def device(self) -> torch.device:
        return self.vectors.device

    def float(self) -> "MultiVector":
        return MultiVector(self.vectors.float(), self.mask)

    def to(self, device) -> "MultiVector":
        return MultiVector(self.vectors.to(device), self.mask.to(device))

    def __setitem__(self, rows, part: "MultiVector") -> None:
        """Write ``part`` (as many texts as ``rows``, L at most this one's) into ``rows``; its padding stays."""
        width = part.vectors.shape[1]
        self.vectors[rows, :width] = part.vectors
        self.mask[rows, :width] = part.mask
        self.mask[rows, width:] = False

    def padded(self, length: int) -> "MultiVector":
        """The same texts with L raised to ``length`` by masked zero vectors."""
        extra = length - self.vectors.shape[1]
        if extra <= 0:
            return self
        if isinstance(self.vectors, np.ndarray):
            return MultiVector(np.pad(self.vectors, ((0, 0), (0, extra), (0, 0))),
                               np.pad(self.mask, ((0, 0), (0, extra))))
        return MultiVector(F.pad(self.vectors, (0, 0, 0, extra)), F.pad(self.mask, (0, extra), value=False))


Representation = "torch.Tensor | MultiVector"


def concat(parts: list) -> "torch.Tensor | MultiVector":
    """The rows of ``parts`` one after another (multi-vector parts padded to the longest)."""
    if not isinstance(parts[0], MultiVector):
        return torch.cat(parts) if isinstance(parts[0], torch.Tensor) else np.concatenate(parts)
    length = max(p.vectors.shape[1] for p in parts)
    parts = [p.padded(length) for p in parts]
    if isinstance(parts[0].vectors, np.ndarray):
        return MultiVector(np.concatenate([p.vectors for p in parts]), np.concatenate([p.mask for p in parts]))
    return MultiVector(torch.cat([p.vectors for p in parts]), torch.cat([p.mask for p in parts]))


def leaf(rep) -> "torch.Tensor | MultiVector":
    """A float32 copy without history that collects a gradient (gradient caching's stand-in for a tower's output)."""
    if isinstance(rep, MultiVector):
        return MultiVector(rep.vectors.detach().float().requires_grad_(), rep.mask)
    return rep.detach().float().requires_grad_()


def values(rep) -> torch.Tensor:
    """The tensor of ``rep`` that carries gradient."""
    return rep.vectors if isinstance(rep, MultiVector) else rep


def dot(rep, grad: torch.Tensor) -> torch.Tensor:
    """sum(rep * grad): back-propagating it gives ``rep``'s parameters their share of a loss whose gradient with
    respect to ``rep`` is ``grad`` (``grad`` may be padded beyond ``rep``'s vectors: padding has no gradient)."""
    if isinstance(rep, MultiVector):
        return (rep.vectors.float() * grad[:, :rep.vectors.shape[1]]).sum()
    return (rep.float() * grad).sum()


def gather(module, rep) -> "torch.Tensor | MultiVector":
    """Every process's ``rep``, in rank order, gradients flowing back to their owners (``module``: a
    LightningModule, whose ``all_gather`` is used). Multi-vector rows are padded to the longest of any process."""
    if not isinstance(rep, MultiVector):
        return _gathered(module, rep)
    length = int(module.all_gather(torch.tensor(rep.vectors.shape[1], device=rep.device)).max())
    rep = rep.padded(length)
    return MultiVector(_gathered(module, rep.vectors), module.all_gather(rep.mask).flatten(0, 1))


def _gathered(module, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` of every process, stacked by rank and flattened; its gradient is made contiguous before the
    gather's backward sends each process its share (gloo's scatter sends a non-contiguous gradient, such as
    einsum's, in the wrong order)."""
    out = module.all_gather(tensor, sync_grads=True)
    if out.requires_grad:
        out.register_hook(torch.Tensor.contiguous)
    return out.flatten(0, 1)


def rows_on(rep, rows: list[int], device) -> "torch.Tensor | MultiVector":
    """Rows ``rows`` of an encoded (numpy) representation as torch tensors on ``device``."""
    if isinstance(rep, MultiVector):
        return MultiVector(torch.from_numpy(rep.vectors[rows]).to(device), torch.from_numpy(rep.mask[rows]).to(device))
    return torch.from_numpy(rep[rows]).to(device)


def pooled(rep):
    """One vector per text: ``rep`` itself, or each multi-vector text's mean real vector (numpy or torch)."""
    if not isinstance(rep, MultiVector):
        return rep
    if isinstance(rep.mask, np.ndarray):
        weights = rep.mask[..., None].astype(np.float32)
        return (rep.vectors * weights).sum(1) / np.maximum(weights.sum(1), 1)
    weights = rep.mask[..., None].to(rep.vectors.dtype)
    return (rep.vectors * weights).sum(1) / weights.sum(1).clamp(min=1)


def to_numpy(rep):
    """``rep`` on the CPU as float32 numpy arrays (the form an index is built from)."""
    if isinstance(rep, MultiVector):
        return MultiVector(rep.vectors.float().cpu().numpy(), rep.mask.cpu().numpy())
    return rep.float().cpu().numpy()


def flat_rows(rep) -> np.ndarray:
    """One float32 row per text (numpy; a multi-vector text's vectors, then its mask as 0/1), for moving encoded
    texts between processes; :func:`from_flat_rows` undoes it."""
    if isinstance(rep, MultiVector):
        return np.concatenate([rep.vectors.reshape(len(rep), -1), rep.mask.astype(np.float32)], axis=1)
    return rep


def from_flat_rows(rows: np.ndarray, like):
    """The representation of :func:`flat_rows`' ``rows``, of the kind and width of ``like``."""
    if isinstance(like, MultiVector):
        length, dim = like.vectors.shape[1:]
        return MultiVector(rows[:, :length * dim].reshape(len(rows), length, dim), rows[:, length * dim:] > 0.5)
    return rows
