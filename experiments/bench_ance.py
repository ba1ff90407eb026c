"""How long one ANCE refresh of a corpus takes, against the training steps between two refreshes, same run.

    python experiments/bench_ance.py [--data data/scifact] [--steps 5] [--every 20] [--batch-size 32]

Times ``--steps`` DPR-style training steps (batch of queries, each with its positive and one BM25 negative),
then one full refresh (encode corpus and training queries with the current weights, faiss search, mine), and
prints the refresh time over the time of ``--every`` steps: below 1, a background refresh is ready before the
next one is due; training itself never waits for it (the swap happens between steps).
"""
from __future__ import annotations

import argparse
import time

import torch

from retrieval_lab.data.beir import BeirDataset
from retrieval_lab.data.datamodule import GroupCollator
from retrieval_lab.data.negatives import read_negatives
from retrieval_lab.data.pairs import SupervisedPairs
from retrieval_lab.losses.infonce import InfoNCELoss
from retrieval_lab.mining.ance import AnceRefresh
from retrieval_lab.models.encoder import Encoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/scifact")
    parser.add_argument("--negatives", default=None, help="BM25 negatives file (default: <data>/negatives/bm25-train.jsonl)")
    parser.add_argument("--steps", type=int, default=5, help="training steps to time")
    parser.add_argument("--every", type=int, default=20, help="refresh interval in steps (negatives.refresh.every_n_steps)")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = BeirDataset(args.data)
    qrels = data.qrels("train")
    negatives = read_negatives(args.negatives or f"{args.data}/negatives/bm25-train.jsonl", data, qrels)
    train_set = SupervisedPairs(data, qrels, group_size=2, negatives=negatives)
    encoder = Encoder().to(device)
    collate = GroupCollator(encoder.tokenizer, encoder.query_max_length, encoder.doc_max_length)
    loss_fn, optimizer = InfoNCELoss(0.05), torch.optim.AdamW(encoder.parameters(), lr=2e-5)

    def step(i: int) -> None:
        batch = collate([train_set[(i * args.batch_size + j) % len(train_set)] for j in range(args.batch_size)])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = loss_fn(encoder.encode_queries(batch["query"].to(device)), encoder.encode_docs(batch["docs"].to(device)),
                           2, batch["mask"].to(device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step(0)  # warm-up
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for i in range(1, args.steps + 1):
        step(i)
    sync()
    per_step = (time.perf_counter() - start) / args.steps
    start = time.perf_counter()
    AnceRefresh(train_set, batch_size=256 if device.type == "cuda" else 64).build_table(encoder.eval())
    refresh = time.perf_counter() - start
    print(f"device {device}: {len(data.corpus)} documents, {len(train_set)} training queries, batch {args.batch_size}")
    print(f"training step        {per_step:8.2f} s   ({args.every} steps: {per_step * args.every:.1f} s)")
    print(f"one ANCE refresh     {refresh:8.2f} s")
    print(f"refresh / {args.every} steps  {refresh / (per_step * args.every):8.2f}")


if __name__ == "__main__":
    main()
