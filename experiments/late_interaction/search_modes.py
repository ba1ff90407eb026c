"""A trained ColBERT searched every way (retrieval_lab.retrieval.late), the corpus and queries encoded once:
nDCG@10 and Recall@100 against exact MaxSim's, index bytes per document against the documents' fp16 token
vectors, build seconds and milliseconds per query, all measured in this run. Run files go to --out.

    python experiments/late_interaction/search_modes.py runs/late_interaction/distillation/colbertv2/model
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from retrieval_lab.data.beir import BeirDataset
from retrieval_lab.models.colbert import ColBERT
from retrieval_lab.retrieval.dense import DenseRetriever
from retrieval_lab.retrieval.metrics import evaluate_run
from retrieval_lab.retrieval.runfile import write_trec_run

MODES = {"exact": ("exact", {}), "ann": ("ann", {}), "plaid-2bit": ("plaid", {"nbits": 2}),
         "plaid-1bit": ("plaid", {"nbits": 1})}
METRICS = ["ndcg@10", "recall@100", "mrr@10"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a folder saved by a model=colbert run")
    parser.add_argument("--data", default="data/scifact")
    parser.add_argument("--split", default="test")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=None, help="folder for the run files and results.json (default: none)")
    args = parser.parse_args()
    split = BeirDataset(args.data).split(args.split)
    model = ColBERT(args.model).eval()
    retriever = DenseRetriever(model, batch_size=64, device=args.device, progress=True)
    device = retriever.device or "cpu"
    doc_ids, qids = list(split.corpus), list(split.queries)
    docs = retriever.encode([split.corpus[d].full_text for d in doc_ids], "doc", "encode corpus")
    queries = retriever.encode([split.queries[q] for q in qids], "query", "encode queries")
    fp16 = int(docs.mask.sum()) * docs.vectors.shape[2] * 2 / len(doc_ids)
    print(f"{len(doc_ids)} documents, {int(docs.mask.sum())} token vectors ({fp16:.0f} bytes per document in fp16), "
          f"{len(qids)} queries, device {device}")
    rows, exact = [], None
    for mode in args.modes:
        kind, settings = MODES[mode]
        start = time.perf_counter()
        index = model.build_index(docs, kind, device, **settings)
        built = time.perf_counter() - start
        start = time.perf_counter()
        scores, ids = index.search(queries, args.k)
        ms = (time.perf_counter() - start) * 1000 / len(qids)
        run = {q: {doc_ids[j]: float(s) for j, s in zip(ids[r], scores[r]) if j >= 0 and doc_ids[j] != q}
               for r, q in enumerate(qids)}
        metrics = evaluate_run(split.qrels, run, METRICS)
        exact = metrics if mode == "exact" else exact
        rows.append({"mode": mode, **metrics, "bytes_per_doc": index.nbytes / len(doc_ids),
                     "vs_fp16": index.nbytes / len(doc_ids) / fp16, "build_seconds": built, "ms_per_query": ms})
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            write_trec_run(run, Path(args.out) / f"{mode}.trec", tag=mode)
        print(f"{mode}: nDCG@10 {metrics['ndcg@10']:.4f}, build {built:.1f} s, {ms:.1f} ms/query", flush=True)
        del index
    print("\n| search | nDCG@10 | vs exact | Recall@100 | MRR@10 | bytes/doc | vs fp16 vectors | build s | ms/query |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        delta = f"{r['ndcg@10'] - exact['ndcg@10']:+.4f}" if exact else "-"
        print(f"| {r['mode']} | {r['ndcg@10']:.4f} | {delta} | {r['recall@100']:.4f} | {r['mrr@10']:.4f} "
              f"| {r['bytes_per_doc']:.0f} | {r['vs_fp16']:.3f} | {r['build_seconds']:.1f} | {r['ms_per_query']:.1f} |")
    if args.out:
        (Path(args.out) / "results.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    np.set_printoptions(precision=4)
    main()
