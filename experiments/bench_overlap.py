"""Where end-to-end corpus encoding spends its time: whether tokenisation (a background thread) overlaps with the
model (the GPU), measured in the same run.

    python experiments/bench_overlap.py [--data data/scifact] [--model packaged:minilm] [--max-length 256]
                                        [--token-budget 262144] [--repeat 5] [--docs 0] [--processes 0 1 2 4]

Times, medians of --repeat, on the corpus (or its first --docs documents):
- tokenisation alone, the whole corpus in one call in this process;
- encoding of the already tokenised corpus;
- tokenising everything first (in a thread), then encoding (no overlap);
- for each --processes count (0: a background thread of this process; N: N worker processes, which hold neither
  this process's GIL nor its core): tokenisation alone in the chunks that encoding streams, and end to end as
  ``encode_texts`` runs it (chunks tokenised in the background while the model encodes).
With perfect overlap, end to end takes about the longer of tokenisation and encoding; with none, their sum. The
last lines count the calls that wait for the GPU during one end-to-end encoding (torch.profiler).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from retrieval_lab.data.beir import BeirDataset
from retrieval_lab.models.encoder import Encoder
from retrieval_lab.retrieval.encoding import encode_texts
from retrieval_lab.tokenization import TokenCache, rust_tokenizer, tokenize_ids, worker_plan

WAITS = ("aten::item", "aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize",
         "cudaEventSynchronize", "cudaHostAlloc", "aten::pin_memory")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/scifact")
    parser.add_argument("--model", default="packaged:minilm")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--token-budget", type=int, default=262144)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--docs", type=int, default=0, help="the first this many documents (0: the whole corpus)")
    parser.add_argument("--processes", type=int, nargs="+", default=[0, 1, 2, 4],
                        help="tokenizer worker processes to compare (0: a thread of this process)")
    args = parser.parse_args()
    texts = [doc.full_text for doc in BeirDataset(args.data).corpus.values()]
    texts = texts[:args.docs] if args.docs else texts
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encoder = Encoder(args.model, doc_max_length=args.max_length).to(device).eval()
    tokenizer, length = encoder.tokenizer, args.max_length

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def median(fn) -> float:
        times = []
        for _ in range(args.repeat):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def encode(cache: TokenCache, processes: int | str = 0) -> None:
        encode_texts(encoder, texts, "doc", token_budget=args.token_budget, cache=cache, progress=False,
                     tokenize_processes=processes)

    def serial() -> None:
        cache = TokenCache()
        list(cache.stream(tokenizer, texts, length))
        encode(cache)

    for processes in args.processes:  # warm-ups, which also start the worker processes
        encode_texts(encoder, texts[:512], "doc", token_budget=args.token_budget, cache=TokenCache(), progress=False,
                     tokenize_processes=processes)
    cached = TokenCache()
    list(cached.stream(tokenizer, texts, length))
    rows = {
        "tokenise, one call": median(lambda: tokenize_ids(rust_tokenizer(tokenizer, length), texts, length)),
        "encode, tokenised corpus": median(lambda: encode(cached)),
        "tokenise, then encode": median(serial),
    }
    for processes in args.processes:
        rows[f"tokenise, streamed, {processes} proc"] = median(
            lambda: list(TokenCache().stream(tokenizer, texts, length, processes=processes)))
        rows[f"end to end, {processes} proc"] = median(lambda: encode(TokenCache(), processes))
    print(f"device {device}, {len(texts)} documents, max length {length}, token budget {args.token_budget}, "
          f"medians of {args.repeat}; worker processes: N proc (0: a thread of this process), Rust threads each "
          f"{[worker_plan(p, True)[1] if p else 'all' for p in args.processes]}; auto on this machine: "
          f"{worker_plan('auto', device.type == 'cuda')[0]}")
    for name, seconds in rows.items():
        print(f"{name:30s} {seconds:7.3f} s")
    encoding = rows["encode, tokenised corpus"]
    for processes in args.processes:
        tokenising, end_to_end = rows[f"tokenise, streamed, {processes} proc"], rows[f"end to end, {processes} proc"]
        print(f"{processes} proc: end to end against no overlap {rows['tokenise, then encode'] / end_to_end:.2f}x "
              f"(perfect overlap: {(tokenising + encoding) / max(tokenising, encoding):.2f}x)")
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        encode(TokenCache(), "auto")
        sync()
    for row in prof.key_averages():
        if row.key in WAITS:
            print(f"{row.key:28s} {row.count:5d} calls  {row.cpu_time_total / 1e3:8.2f} ms on the CPU")


if __name__ == "__main__":
    main()
