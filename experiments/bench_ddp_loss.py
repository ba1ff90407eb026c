"""What one DDP process spends on the loss of a gathered batch: every query's terms (the whole global loss, as
before stop 22) against its own queries' terms only (``rows``, what training does), measured in the same run.

    python experiments/bench_ddp_loss.py [--batch 512] [--world 8] [--dim 384] [--group 1] [--repeat 5]
                                         [--device auto]

For each loss (InfoNCE, bidirectional InfoNCE, SamToNe on both sides), the forward and backward time of one
process (medians of --repeat) on a global batch of --batch x --world queries, and the ratio. Both give the same
gradient once DDP averages it (tests/test_infonce.py, tests/test_ddp.py). No process group is started: one process
stands in for each of them.

Then the false-negative mask of the global batch (1% of the queries share their positive with another query),
as a dense B x B*G tensor (before stop 23) and as its pairs (``FalseNegatives``, now): its size, and the time one
process takes from the mask to the blocks the losses use (moved to the device; its own rows against every column,
and SamToNe's queries that share a positive).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from retrieval_lab.models.family import loss_on_vectors
from retrieval_lab.data.datamodule import false_negatives
from retrieval_lab.losses.infonce import InfoNCELoss
from retrieval_lab.losses.samtone import SamToNeLoss, share_a_positive


def timed(loss, q, d, group, rows, repeat: int) -> tuple[float, float]:
    """Median seconds of forward + backward, and the peak GPU memory in GiB (nan on a CPU)."""
    times, cuda = [], q.device.type == "cuda"
    for _ in range(repeat + 1):  # the first call warms up
        qq, dd = q.detach().requires_grad_(), d.detach().requires_grad_()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        loss_on_vectors(loss, qq, dd, group_size=group, rows=rows).backward()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return statistics.median(times[1:]), peak


def median_seconds(step, device: torch.device, repeat: int) -> float:
    times = []
    for _ in range(repeat + 1):  # the first call warms up
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def mask_cost(total: int, group: int, rows: torch.Tensor, device: torch.device, repeat: int) -> None:
    """Dense mask against pairs: bytes, and seconds from the mask on the CPU to the losses' blocks on the device."""
    doc_ids = [f"d{i}" if g == 0 else f"n{i}.{g}" for i in range(total) for g in range(group)]
    positives = [[f"d{i - 1 if i % 100 == 1 else i}"] for i in range(total)]  # every 100th pair shares a positive
    for i in range(1, total, 100):
        doc_ids[i * group] = f"d{i - 1}"
    pairs = false_negatives(doc_ids, positives, group)
    every = torch.arange(total, device=device)
    targets = every * group

    def dense():  # the mask and the query side's product as before: every one of the B*G columns
        mask = torch.zeros(pairs.shape, dtype=torch.bool)
        mask[pairs.query, pairs.column] = True
        mask = mask.to(device)
        judged = mask.clone()
        judged[every, targets] = True
        return mask[rows], judged[rows].float() @ judged.float().T > 0

    def sparse():
        moved = pairs.to(device)
        return moved.block(rows), share_a_positive(moved, rows, targets)

    (a, b), (c, e) = dense(), sparse()
    same = torch.equal(a, c) and torch.equal(b & (rows[:, None] != every), e & (rows[:, None] != every))
    before, now = median_seconds(dense, device, repeat), median_seconds(sparse, device, repeat)
    print(f"false-negative mask ({len(pairs)} pairs, same blocks: {same})   dense {total * total * group / 2**20:9.1f} "
          f"MiB {before * 1000:8.1f} ms   pairs {16 * len(pairs) / 2**20:7.3f} MiB {now * 1000:8.1f} ms   "
          f"ratio {before / now:6.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=512, help="queries per process")
    parser.add_argument("--world", type=int, default=8, help="processes")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--group", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    torch.manual_seed(0)
    total = args.batch * args.world
    q = torch.nn.functional.normalize(torch.randn(total, args.dim, device=device), dim=-1)
    d = torch.nn.functional.normalize(torch.randn(total * args.group, args.dim, device=device), dim=-1)
    rows = torch.arange(args.batch, device=device)  # process 0's queries
    print(f"device {device}, {args.world} processes x {args.batch} queries (global batch {total}), group "
          f"{args.group}, dim {args.dim}; one process's loss forward + backward, median of {args.repeat}")
    for name, loss in (("infonce", InfoNCELoss(0.05)), ("infonce, bidirectional", InfoNCELoss(0.05, True)),
                       ("samtone, both sides", SamToNeLoss(0.05, "both"))):
        every, every_peak = timed(loss, q, d, args.group, None, args.repeat)
        own, own_peak = timed(loss, q, d, args.group, rows, args.repeat)
        print(f"{name:24s} every query {every * 1000:8.1f} ms ({every_peak:.2f} GiB)   own queries "
              f"{own * 1000:8.1f} ms ({own_peak:.2f} GiB)   ratio {every / own:6.2f}x")
    mask_cost(total, args.group, rows, device, args.repeat)


if __name__ == "__main__":
    main()
