"""Corpus-encoding throughput: retrieval_lab's encoder path against a plain loop, measured in the same run.

    python experiments/bench_encode.py [--data data/scifact] [--docs 1024] [--batch-size 128] [--max-length 256]
                                       [--token-budget 65536] [--repeat 3] [--dtype auto] [--plain-batch-size 512]
                                       [--compile] [--profile] [--tokenize-processes auto]

The plain loop tokenises each batch of --plain-batch-size texts in corpus order, runs the model and mean-pools
(fp32 on CPU, bf16 autocast on a GPU; DESIGN.md's baseline is batches of 512). Ours runs like the plain loop with
--dtype auto, or on a copy of the weights in --dtype (bfloat16). Prints documents/s for both, their ratio, and
the lowest cosine between the two embeddings of any document. Ours is timed twice: end to end (tokenisation
included) and again on the already tokenised corpus (what re-encoding during training and evaluation costs). Each
path is timed --repeat times, interleaved, and the medians are compared. With the whole
corpus (--docs 0) it also prints nDCG@10 on the test queries for both embeddings (queries encoded by each path).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from retrieval_lab.data.beir import BeirDataset
from retrieval_lab.models.encoder import Encoder, pool
from retrieval_lab.retrieval.dense import TorchIndex
from retrieval_lab.retrieval.encoding import encode_texts
from retrieval_lab.tokenization import TokenCache, worker_plan
from retrieval_lab.retrieval.metrics import evaluate_run


@torch.inference_mode()
def plain_loop(encoder: Encoder, texts: list[str], batch_size: int, device: torch.device,
               max_length: int | None = None) -> np.ndarray:
    out = []
    for start in range(0, len(texts), batch_size):
        inputs = encoder.tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                                   max_length=max_length or encoder.doc_max_length, return_tensors="pt").to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            hidden = encoder.query_model(**inputs).last_hidden_state
        emb = torch.nn.functional.normalize(pool(hidden.float(), inputs["attention_mask"], "mean"), dim=-1)
        out.append(emb.cpu().numpy())
    return np.concatenate(out)


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def ndcg_at_10(split, doc_ids: list[str], docs: np.ndarray, queries: np.ndarray) -> float:
    scores, top = TorchIndex(docs).search(queries, 10)  # exact inner-product search
    run = {qid: {doc_ids[j]: float(s) for j, s in zip(top[row], scores[row])} for row, qid in enumerate(split.queries)}
    return evaluate_run(split.qrels, run, ["ndcg@10"])["ndcg@10"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/scifact")
    parser.add_argument("--model", default="packaged:minilm")
    parser.add_argument("--docs", type=int, default=1024, help="number of documents (0: the whole corpus)")
    parser.add_argument("--batch-size", type=int, default=128, help="our texts per batch, without --token-budget")
    parser.add_argument("--plain-batch-size", type=int, default=512, help="the plain loop's texts per batch")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--token-budget", type=int, default=None, help="tokens per batch (default: --batch-size texts)")
    parser.add_argument("--repeat", type=int, default=3, help="timings of each path; their medians are compared")
    parser.add_argument("--dtype", default="auto", help="our weights: auto | float32 | bfloat16 | float16")
    parser.add_argument("--compile", action="store_true", help="torch.compile our encoder (compiled in the warm-up, "
                        "whose time is printed; with --dtype other than auto every call compiles again)")
    parser.add_argument("--tokenize-processes", default="auto", type=lambda x: x if x == "auto" else int(x),
                        help="tokenizer worker processes of ours (0: a thread; auto: 0 on a CPU, a few on a GPU)")
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler's top operators for one "
                        "encoding of the tokenised corpus (where the time goes)")
    args = parser.parse_args()
    data = BeirDataset(args.data)
    doc_ids = list(data.corpus)[:args.docs] if args.docs else list(data.corpus)
    texts = [data.corpus[d].full_text for d in doc_ids]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encoder = Encoder(args.model, doc_max_length=args.max_length).to(device).eval()
    plain_loop(encoder, texts[:args.plain_batch_size], args.plain_batch_size, device)  # warm-ups
    _, warm_up = timed(lambda: encode_texts(encoder, texts[:args.batch_size * 4], "doc", args.batch_size, device,
                                            progress=False, token_budget=args.token_budget, cache=TokenCache(),
                                            dtype=args.dtype, compile=args.compile,
                                            tokenize_processes=args.tokenize_processes))  # also starts the workers

    def ours(cache: TokenCache) -> np.ndarray:
        return encode_texts(encoder, texts, "doc", args.batch_size, device, progress=False,
                            token_budget=args.token_budget, cache=cache, dtype=args.dtype, compile=args.compile,
                            tokenize_processes=args.tokenize_processes)

    t_plain, t_cold, t_warm = [], [], []
    for _ in range(args.repeat):  # each path timed --repeat times, interleaved; the medians are compared
        plain, seconds = timed(lambda: plain_loop(encoder, texts, args.plain_batch_size, device))
        t_plain.append(seconds)
        cache = TokenCache()
        embeddings, seconds = timed(lambda: ours(cache))  # tokenisation included
        t_cold.append(seconds)
        t_warm.append(timed(lambda: ours(cache))[1])       # already tokenised (re-encoding in training / evaluation)
    t_plain, t_cold, t_warm = (float(np.median(t)) for t in (t_plain, t_cold, t_warm))
    cosine = (plain * embeddings).sum(1)
    print(f"device {device}, {len(texts)} documents, max length {args.max_length}; plain loop: batches of "
          f"{args.plain_batch_size}; ours: batches of {args.batch_size}, token budget {args.token_budget}, "
          f"weights {args.dtype}, tokenizer worker processes {args.tokenize_processes} "
          f"({worker_plan(args.tokenize_processes, device.type == 'cuda')[0]})"
          + (f", compiled (warm-up with compilation: {warm_up:.1f} s)" if args.compile else ""))
    print(f"plain loop                     {len(texts) / t_plain:9.1f} docs/s")
    print(f"retrieval_lab, end to end      {len(texts) / t_cold:9.1f} docs/s   ratio {t_plain / t_cold:6.2f}x")
    print(f"retrieval_lab, tokenised cache {len(texts) / t_warm:9.1f} docs/s   ratio {t_plain / t_warm:6.2f}x")
    print(f"min cosine between the plain and our embedding of a document: {cosine.min():.5f}")
    print(f"token cache: {cache.nbytes() / 2**20:.1f} MiB for {len(texts)} documents")
    if args.profile:  # one more encoding of the tokenised corpus, under the profiler
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            timed(lambda: ours(cache))
        sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=60))
    if not args.docs:  # the whole corpus: compare the rankings on the test queries
        split = data.split("test")
        queries = list(split.queries.values())
        plain_q = plain_loop(encoder, queries, args.plain_batch_size, device, encoder.query_max_length)
        our_q = encode_texts(encoder, queries, "query", args.batch_size, device, progress=False, dtype=args.dtype,
                             compile=args.compile)
        print(f"nDCG@10 on {len(queries)} test queries: plain {ndcg_at_10(split, doc_ids, plain, plain_q):.4f}, "
              f"ours {ndcg_at_10(split, doc_ids, embeddings, our_q):.4f}")


if __name__ == "__main__":
    main()
