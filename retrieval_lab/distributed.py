"""Helpers for work spread over the processes of torch.distributed (DDP training, sharded encoding, ANCE mining):
who this process is, gathering rows, failing together, averaging gradients. The bottom floor: it imports nothing
of retrieval_lab."""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch


def gather_shards(rows: np.ndarray, total: int, device: str | torch.device | None = None, group=None) -> np.ndarray:
    """All-gather the rows of every process of ``group`` (process r holds items r, r + world, r + 2 world, ... of
    ``total``), in process order: process 0's rows, then process 1's, ... A gloo group gathers on the CPU."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    device = "cpu" if dist.get_backend(group) == "gloo" else device
    local = torch.zeros(-(-total // world), rows.shape[1], device=device)  # equal sizes for all_gather: padded
    local[:len(rows)] = torch.from_numpy(rows).to(local.device)
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local, group=group)
    return np.concatenate([part[:len(range(r, total, world))].cpu().numpy() for r, part in enumerate(parts)])


def distributed_rank_world(group=None) -> tuple[int, int]:
    """This process's rank and the number of processes (in ``group``; 0, 1 outside torch.distributed)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


@contextmanager
def fail_together(group=None, distributed: bool = True):
    """For a block that every process of ``group`` runs before a collective: an error in it, on any process, is
    raised on every process as the block ends, instead of leaving the others waiting in that collective until its
    timeout (30 minutes by default). The failed process raises its own error; the others raise a RuntimeError that
    names the process and its error. Costs one small all-gather; ``distributed=False``: the block alone. Blocks
    must not nest (an outer block's all-gather would meet an inner one's on a process that failed in between)."""
    error = None
    try:
        yield
    except Exception as err:  # noqa: BLE001 - raised below, on every process
        error = err
    if distributed:
        import torch.distributed as dist

        reports = [None] * dist.get_world_size(group)
        dist.all_gather_object(reports, None if error is None else f"{type(error).__name__}: {error}", group=group)
        failed = [(rank, report) for rank, report in enumerate(reports) if report is not None]
        if error is None and failed:
            rank, report = failed[0]
            raise RuntimeError(f"process {rank} of {len(reports)} failed: {report}")
    if error is not None:
        raise error


def average_gradients(params: list[torch.Tensor], bucket: int = 1 << 24) -> None:
    """Average the gradients of ``params`` over the processes of torch.distributed (as DDP does), ``bucket``
    elements per all-reduce. Parameters without gradient (unused, as a pooler that mean pooling skips) keep none,
    as under DDP; every process runs the same towers, so all have gradients for the same parameters."""
    import torch.distributed as dist

    world = dist.get_world_size()
    params = [p for p in params if p.grad is not None]
    start = 0
    while start < len(params):
        end, size = start, 0
        while end < len(params) and (end == start or size + params[end].numel() <= bucket):
            size += params[end].numel()
            end += 1
        grads = [p.grad for p in params[start:end]]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= world
        for g, synced in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(synced.view_as(g))
        start = end
