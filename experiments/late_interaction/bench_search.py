"""Token-vector search modes (retrieval_lab.retrieval.late) on synthetic corpora the size of SciFact (5,183
documents) times each of ``--scales``: for exact MaxSim, ann (flat and HNSW) and plaid (1 and 2 bits), the index's
build seconds, bytes per document (and its ratio to the documents' token vectors in float16), query latency and
the share of exact's top 10 (and top 100) each finds, in a markdown table whose ratios are against exact in the
same run.

Token vectors: ``--clusters`` centres drawn once, each token a centre (Zipf-distributed, as words are) plus noise
(cosine about 0.9 with its centre), L2-normalised; documents of ``--doc-tokens`` / 2 to ``--doc-tokens`` tokens;
each query's ``--query-tokens`` vectors are 3/4 tokens of one document plus noise and 1/4 random tokens.

    python experiments/late_interaction/bench_search.py [--scales 1 10] [--dim 32 --doc-tokens 16]

Defaults (dim 32, 16 tokens per document, 100 queries) run 1x and 10x in a few minutes on 2 CPU cores; 100x
(8.3 M token vectors, 1 GB in float32) takes much longer, mostly the plaid builds' k-means and token assignment
and the HNSW build. ``--dim 64 --doc-tokens 24`` at 100x keeps under about 8 GB of memory (12.4 M token vectors,
3.2 GB, held once more while an index is built).
"""
from __future__ import annotations

import argparse
import gc
import time

import numpy as np
import torch

from retrieval_lab.models.representation import MultiVector
from retrieval_lab.retrieval import late

SCIFACT_DOCS = 5183
MODES = {"exact": ("exact", {}), "ann-flat": ("ann", {"ann": "flat"}), "ann-hnsw": ("ann", {"ann": "hnsw"}),
         "plaid-1bit": ("plaid", {"nbits": 1}), "plaid-2bit": ("plaid", {"nbits": 2})}


def normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def corpus(docs: int, length: int, dim: int, clusters: int, queries: int, query_length: int, seed: int):
    """Synthetic documents and queries (see the module docstring), generated 10,000 documents at a time."""
    rng = np.random.default_rng(seed)
    centres = normalise(rng.standard_normal((clusters, dim)))
    frequency = 1 / np.arange(1, clusters + 1)
    frequency /= frequency.sum()
    noise = np.sqrt(0.2 / dim)
    vectors = np.zeros((docs, length, dim), dtype=np.float32)
    mask = np.arange(length)[None] < rng.integers(length // 2, length + 1, docs)[:, None]
    for start in range(0, docs, 10_000):
        part = mask[start:start + 10_000]
        which = rng.choice(clusters, int(part.sum()), p=frequency)
        block = vectors[start:start + 10_000]
        block[part] = normalise(centres[which] + noise * rng.standard_normal((len(which), dim)))
    source = rng.integers(0, docs, queries)
    own = int(query_length * 3 / 4)
    picks = rng.integers(0, mask[source].sum(1)[:, None], (queries, own))
    taken = vectors[source[:, None], picks]
    extra = centres[rng.choice(clusters, (queries, query_length - own), p=frequency)]
    q = normalise(np.concatenate([taken, extra], 1) + noise * rng.standard_normal((queries, query_length, dim)))
    return MultiVector(vectors, mask), MultiVector(q, np.ones((queries, query_length), dtype=bool))


def overlap(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--doc-tokens", type=int, default=16, help="longest document, in token vectors")
    parser.add_argument("--query-tokens", type=int, default=32)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--clusters", type=int, default=4096)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="where the indexes' torch work runs (cuda on a GPU)")
    args = parser.parse_args()
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    print(f"dim {args.dim}, documents of {args.doc_tokens // 2}-{args.doc_tokens} token vectors, "
          f"{args.queries} queries of {args.query_tokens}, {args.clusters} clusters, k={args.k}, "
          f"{torch.get_num_threads()} threads, device {args.device}\n")
    rows = []
    for scale in args.scales:
        docs, queries = corpus(SCIFACT_DOCS * scale, args.doc_tokens, args.dim, args.clusters, args.queries,
                               args.query_tokens, args.seed)
        tokens = int(docs.mask.sum())
        fp16 = tokens * args.dim * 2 / len(docs)
        exact = None
        for mode in args.modes:
            kind, settings = MODES[mode]
            start = time.perf_counter()
            index = late.build(docs, kind, args.device, **settings)
            sync()
            built = time.perf_counter() - start
            start = time.perf_counter()
            _, ids = index.search(queries, args.k)
            sync()
            latency = (time.perf_counter() - start) * 1000 / len(queries)
            if mode == "exact":
                exact = (ids, latency)
            per_doc = index.nbytes / len(docs)
            row = {"scale": f"{scale}x", "docs": len(docs), "tokens": tokens, "mode": mode, "build": built,
                   "bytes": per_doc, "fp16": per_doc / fp16, "ms": latency}
            if exact is not None:
                row.update(vs_exact=latency / exact[1], top10=overlap(ids[:, :10], exact[0][:, :10]),
                           top100=overlap(ids, exact[0]))
            rows.append(row)
            versus = f", top-10 overlap {row['top10']:.3f}" if "top10" in row else ""
            print(f"{scale}x {mode}: build {built:.1f} s, {per_doc:.0f} bytes/doc, {latency:.1f} ms/query{versus}",
                  flush=True)
            del index
            gc.collect()
        del docs, queries
        gc.collect()
    print(f"\n| scale | docs | token vectors | mode | build s | bytes/doc | vs fp16 vectors | ms/query "
          f"| latency vs exact | top-10 overlap | top-{args.k} overlap |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        extra = (f"{r['vs_exact']:.2f} | {r['top10']:.3f} | {r['top100']:.3f}" if "top10" in r else "- | - | -")
        print(f"| {r['scale']} | {r['docs']} | {r['tokens']} | {r['mode']} | {r['build']:.1f} | {r['bytes']:.0f} "
              f"| {r['fp16']:.2f} | {r['ms']:.1f} | {extra} |")


if __name__ == "__main__":
    main()
