"""Whether background tokenisation holds up the thread that drives the GPU, measured on a CPU.

    python experiments/bench_gil.py [--data data/scifact] [--model packaged:minilm] [--max-length 256] [--repeat 3]
                                    [--rust-threads 1]

The thread that drives a GPU spends its time launching kernels, one small Python call after another, each holding
the GIL. Here the main thread stands in for it: it launches small torch operations on a tiny CPU tensor and counts
them per second, while the whole corpus is tokenised in the background the way corpus encoding streams it
(``TokenCache.stream``, chunks of up to 1,024 texts):
- alone, with no tokenisation;
- with tokenisation in a background thread of this process (``retriever.tokenize_processes=0``);
- with tokenisation in one worker process (``retriever.tokenize_processes=1``).
The Rust tokenizer runs on --rust-threads threads in both cases (RAYON_NUM_THREADS), so with fewer threads than
cores the two differ only in where tokenisation's Python part (ids into lists and numpy, the ASCII translation)
takes the GIL: this process's or the worker's. With one Rust thread it needs 2 cores: one for the launching
thread, one for the tokenizer. With a Rust thread on every core, it also shows what those threads cost the
launching thread. Prints, per setting, the medians of --repeat: launches per second as a fraction of
launching alone in the same round, and how long tokenisation took.
"""
from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

import torch

from retrieval_lab.data.beir import BeirDataset
from retrieval_lab.models.encoder import load_tokenizer
from retrieval_lab.tokenization import PROCESSES, TokenCache


def launch(stop: threading.Event) -> tuple[int, float]:
    """Small torch operations one after another until ``stop`` is set, at least 100 of them (a tokenisation that
    ends before this thread gets the CPU would otherwise count none): (how many, seconds)."""
    x, count, start = torch.zeros(64), 0, time.perf_counter()
    while count == 0 or not stop.is_set():
        for _ in range(100):
            x.add_(1.0)
        count += 100
    return count, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/scifact")
    parser.add_argument("--model", default="packaged:minilm")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rust-threads", type=int, default=1, help="the Rust tokenizer's threads, in either place")
    args = parser.parse_args()
    os.environ["RAYON_NUM_THREADS"] = str(args.rust_threads)  # read when the Rust thread pool starts, on first use
    torch.set_num_threads(1)
    texts = [doc.full_text for doc in BeirDataset(args.data).corpus.values()]
    tokenizer = load_tokenizer(args.model)
    PROCESSES.start(1, args.rust_threads)  # one worker process

    def background(processes: int | None) -> tuple[float, float]:
        """(launches per second, seconds tokenisation took) with tokenisation in the background: in a thread
        (0), in the worker process (1) or none (None)."""
        stop, took = threading.Event(), [0.0]

        def tokenise() -> None:
            start = time.perf_counter()
            if processes is None:
                time.sleep(runs["thread"][-1][1])  # as long as this round's tokenisation in a thread took
            else:
                for _ in TokenCache().stream(tokenizer, texts, args.max_length, processes=processes):
                    pass
            took[0] = time.perf_counter() - start
            stop.set()

        worker = threading.Thread(target=tokenise)
        worker.start()
        count, seconds = launch(stop)
        worker.join()
        return count / seconds, took[0]

    for processes in (0, 1):  # warm-ups: the worker learns the tokenizer, this process builds its backend copy
        list(TokenCache().stream(tokenizer, texts[:256], args.max_length, processes=processes))
    settings = {"thread": 0, "worker process": 1, "alone": None}
    runs = {name: [] for name in settings}
    for _ in range(args.repeat):  # interleaved, each setting against launching alone in the same round
        for name, processes in settings.items():
            runs[name].append(background(processes))
    alone = [rate for rate, _ in runs["alone"]]
    print(f"{len(texts)} documents, max length {args.max_length}, {args.rust_threads} Rust thread(s), "
          f"medians of {args.repeat}; launching alone: {statistics.median(alone):,.0f} operations/s")
    for name in ("thread", "worker process"):
        ratio = statistics.median(rate / base for (rate, _), base in zip(runs[name], alone))
        seconds = statistics.median(took for _, took in runs[name])
        print(f"tokenising in a {name:15s} launches {ratio:5.2f}x of alone (same round), tokenisation {seconds:6.3f} s")


if __name__ == "__main__":
    main()
