"""Tokenisation throughput, the part of corpus encoding that runs on the CPU: the tokenizer's own call (what the
plain loop does) against retrieval_lab's tokenisation, measured in the same run.

    python experiments/bench_tokenize.py [--data data/scifact] [--model packaged:minilm] [--max-length 256]
                                         [--repeat 5] [--processes 0 2 4]

Times, on the whole corpus (title + text), each path --repeat times interleaved and prints the medians:
- the tokenizer's own call, ``tokenizer(texts, truncation=True, max_length=...)``;
- ours with every text through the Rust normaliser (prefix tokenisation only);
- ours (prefix tokenisation, and ASCII texts normalised in Python), in one call;
- ours as corpus encoding runs it, streamed in chunks of up to 1,024 texts (the first ones smaller), for each
  --processes count: 0 in a background thread, N in N worker processes (warmed up first), which share all
  cores but one (``tokenization.worker_plan``).
All paths give the same ids (checked here). In this process, Rust's thread count follows RAYON_NUM_THREADS
(default: every core).
"""
from __future__ import annotations

import argparse
import gc
import time

import numpy as np

from retrieval_lab.data.beir import BeirDataset
from retrieval_lab.models.encoder import load_tokenizer
from retrieval_lab.tokenization import RustTokenizer, TokenCache, tokenize_ids, worker_plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/scifact")
    parser.add_argument("--model", default="packaged:minilm")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--processes", type=int, nargs="*", default=[0, 2, 4],
                        help="streamed paths to time: 0 in a thread, N in N worker processes")
    args = parser.parse_args()
    texts = [doc.full_text for doc in BeirDataset(args.data).corpus.values()]
    tokenizer = load_tokenizer(args.model)
    ours = RustTokenizer(tokenizer.backend_tokenizer, args.max_length, "right")
    rust_normaliser = RustTokenizer(tokenizer.backend_tokenizer, args.max_length, "right")
    rust_normaliser.bare = None  # every text through the Rust normaliser
    paths = {
        "tokenizer's own call": lambda: tokenizer(texts, truncation=True, max_length=args.max_length)["input_ids"],
        "ours, Rust normaliser": lambda: tokenize_ids(rust_normaliser, texts, args.max_length),
        "ours": lambda: tokenize_ids(ours, texts, args.max_length),
    }

    def streamed(processes: int) -> list[list[int]]:
        ids = [None] * len(texts)
        for idx, chunk in TokenCache().stream(tokenizer, texts, args.max_length, processes=processes):
            for i, x in zip(idx, chunk):
                ids[i] = x
        return ids

    for processes in args.processes:
        streamed(processes)  # starts the worker processes
        name = "streamed, thread" if processes == 0 else (
            f"streamed, {processes} proc x {worker_plan(processes, True)[1]} thr")
        paths[name] = lambda processes=processes: streamed(processes)
    seconds = {name: [] for name in paths}
    results = {}
    for _ in range(args.repeat):
        for name, path in paths.items():
            results.pop(name, None)
            gc.collect()
            start = time.perf_counter()
            results[name] = path()
            seconds[name].append(time.perf_counter() - start)
    if any(ids != results["tokenizer's own call"] for ids in results.values()):
        raise SystemExit("error: the paths gave different token ids.")
    ascii_share = np.mean([text.isascii() for text in texts])
    base = float(np.median(seconds["tokenizer's own call"]))
    print(f"{len(texts)} texts ({ascii_share:.0%} ASCII), max length {args.max_length}, medians of {args.repeat}")
    for name, times in seconds.items():
        median = float(np.median(times))
        print(f"{name:28s} {median:6.3f} s  {len(texts) / median:9.1f} texts/s   ratio {base / median:5.2f}x")


if __name__ == "__main__":
    main()
