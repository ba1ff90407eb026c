"""MaxSim scoring throughput, query-document pairs per second: ``retrieval_lab.models.colbert.maxsim`` (all pairs of
a batch at once) against a plain loop of one einsum per (query, document) pair, both on the same random
L2-normalised token vectors in the same run; their scores are checked equal and the ratio printed.

    python experiments/late_interaction/bench_maxsim.py [--queries 32 --docs 512 --doc-length 128 --dim 128]
                                                      [--loop-pairs 2048] [--device cuda]
"""
from __future__ import annotations

import argparse
import time

import torch

from retrieval_lab.models.colbert import maxsim
from retrieval_lab.models.representation import MultiVector


def texts(count: int, length: int, dim: int, device, generator) -> MultiVector:
    """``count`` texts of ``length`` normalised random vectors, the last quarter of every other text masked."""
    vectors = torch.nn.functional.normalize(torch.randn(count, length, dim, generator=generator), dim=-1)
    mask = torch.ones(count, length, dtype=torch.bool)
    mask[::2, length - length // 4:] = False
    return MultiVector(vectors.to(device), mask.to(device))


def timed(fn, device) -> tuple[float, object]:
    """Seconds ``fn`` takes (after one warm-up call; the GPU synchronised) and what it returned."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def loop(q: MultiVector, d: MultiVector, pairs: list[tuple[int, int]]) -> torch.Tensor:
    """MaxSim of each (query, document) pair, one einsum each."""
    out = []
    for a, b in pairs:
        each = torch.einsum("id,jd->ij", q.vectors[a][q.mask[a]], d.vectors[b][d.mask[b]])
        out.append(each.amax(1).sum())
    return torch.stack(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--query-length", type=int, default=32)
    parser.add_argument("--docs", type=int, default=512)
    parser.add_argument("--doc-length", type=int, default=128)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--batch", type=int, default=128, help="documents per maxsim call")
    parser.add_argument("--loop-pairs", type=int, default=2048, help="pairs the plain loop scores")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    q = texts(args.queries, args.query_length, args.dim, device, generator)
    d = texts(args.docs, args.doc_length, args.dim, device, generator)
    with torch.inference_mode():
        batched_s, scores = timed(lambda: torch.cat([maxsim(q, d[s:s + args.batch])
                                                     for s in range(0, len(d), args.batch)], 1), device)
        pairs = [(a, b) for a in range(len(q)) for b in range(len(d))][:args.loop_pairs]
        loop_s, looped = timed(lambda: loop(q, d, pairs), device)
    rows, cols = zip(*pairs)
    diff = (scores[list(rows), list(cols)] - looped).abs().max().item()
    batched, plain = len(q) * len(d) / batched_s, len(pairs) / loop_s
    print(f"{args.queries} queries x {args.docs} documents ({args.query_length} x {args.doc_length} tokens, "
          f"dim {args.dim}, {device}, {torch.get_num_threads()} threads); largest score difference {diff:.2e}")
    print("| scorer | pairs | seconds | pairs/s |")
    print("| --- | --- | --- | --- |")
    print(f"| colbert.maxsim, {args.batch} documents per call | {len(q) * len(d)} | {batched_s:.3f} | {batched:,.0f} |")
    print(f"| python loop, one einsum per pair | {len(pairs)} | {loop_s:.3f} | {plain:,.0f} |")
    print(f"\nmaxsim / loop: {batched / plain:.1f}x")


if __name__ == "__main__":
    main()
