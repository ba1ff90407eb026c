"""Does a copy of the weights in another dtype keep the ranking? nDCG@10 on a data set's test queries and the lowest
cosine to the float32 embedding of any document, for each --dtypes, whole corpus, on this machine's device.

    python experiments/dtype_ranking.py [--data data/scifact] [--model packaged:minilm] [--max-length 256]
                                        [--token-budget 32768] [--dtypes float32 auto bfloat16 float16] [--docs 0]

``float32`` is the reference; ``auto`` is the default encoding path (the weights as they are, under bf16 autocast
on a GPU; on a CPU the same as float32); the others run a copy of the weights in that dtype. CPU float16 is slow
(about 1,000 s for SciFact on 2 cores) and its arithmetic differs from a GPU's, so there it is only a proxy.
"""
from __future__ import annotations

import argparse
import time

import torch
from bench_encode import ndcg_at_10  # experiments/ is this script's folder

from retrieval_lab.data.beir import BeirDataset
from retrieval_lab.models.encoder import Encoder
from retrieval_lab.retrieval.encoding import encode_texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/scifact")
    parser.add_argument("--model", default="packaged:minilm")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--token-budget", type=int, default=32768)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "auto", "bfloat16", "float16"])
    parser.add_argument("--docs", type=int, default=0, help="only the first this many documents (a dry run; 0: all)")
    args = parser.parse_args()
    data = BeirDataset(args.data)
    split = data.split("test")
    doc_ids = list(data.corpus)[:args.docs] if args.docs else list(data.corpus)
    texts, queries = [data.corpus[d].full_text for d in doc_ids], list(split.queries.values())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    encoder = Encoder(args.model, doc_max_length=args.max_length).to(device)
    print(f"device {device}, {len(texts)} documents, {len(queries)} test queries, max length {args.max_length}")
    reference = None
    for dtype in ["float32"] + [d for d in args.dtypes if d != "float32"]:
        start = time.perf_counter()
        docs = encode_texts(encoder, texts, "doc", device=device, progress=False, dtype=dtype,
                            token_budget=args.token_budget)
        query_embeddings = encode_texts(encoder, queries, "query", device=device, progress=False, dtype=dtype)
        ndcg = ndcg_at_10(split, doc_ids, docs, query_embeddings)
        reference = docs if reference is None else reference
        cosine = (docs * reference).sum(1).min()
        print(f"{dtype:9s} nDCG@10 {ndcg:.4f}   min cosine to float32 {cosine:.5f}   "
              f"({time.perf_counter() - start:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
