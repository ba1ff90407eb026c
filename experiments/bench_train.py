"""Training throughput and memory: a cropping (Contriever) step of MiniLM with and without gradient caching,
measured in the same run, on batches that `pairs=cropping` makes (spans of 10-50% of a document's words, word
deletion 0.1), padded to their longest text.

    python experiments/bench_train.py [--sizes 512 2048 8192] [--chunk 256] [--max-length 128] [--steps 3]
                                      [--loader-workers 0 2 4]

For each batch size: query-document pairs per second, model FLOP utilisation and peak GPU memory. Model FLOPs
of a step (forward + backward = 3 forwards) are 3 x (2 x non-embedding weights x real tokens + 4 x layers x
hidden size x the sum of squared sequence lengths, for attention), as in the PaLM paper's appendix, which leaves
recomputation out: a cached step runs the forward twice, but its MFU counts 3 x too, so MFU compares the useful
work of both paths. HFU (hardware FLOP utilisation) counts the cached step's second forward (4 x). Both divide by
--peak-tflops.
The baseline is the plain (uncached) step at the largest of the sizes that fits in memory; every cached size
prints its pairs/s ratio against it. On a CPU it runs, but the memory column and MFU mean little.

The steps above get their batch ready-made. Training also has to make it: crop the documents, tokenise, pad. For
each --loader-workers count, the data pipeline of `pairs=cropping` alone (Contriever cropping with word deletion,
then the collator) is timed at the smallest batch size, and its pairs/s printed against the plain step's. With 0
workers loading and training take turns in one process; with workers they overlap, and a ratio of 1 or more
means the GPU need not wait.
"""
from __future__ import annotations

import argparse
import time

import torch

from retrieval_lab.data.beir import BeirDataset
from retrieval_lab.data.datamodule import GroupCollator, RetrievalDataModule
from retrieval_lab.data.pairs import CroppingPairs
from retrieval_lab.losses.infonce import InfoNCELoss
from retrieval_lab.models.biencoder import BiEncoderModule
from retrieval_lab.models.encoder import Encoder


def cropping_batch(pairs: CroppingPairs, size: int) -> list[dict]:
    """``size`` examples of ``pairs=cropping`` (Contriever cropping with word deletion), as training draws them:
    epoch after epoch over the corpus when the batch is larger than the corpus."""
    examples = []
    for i in range(size):
        pairs.set_epoch(i // len(pairs))
        examples.append(pairs[i % len(pairs)])
    return examples


def model_flops(encoder: Encoder, batch: dict, forwards: int) -> float:
    """FLOPs of ``forwards`` forward passes' worth of work on ``batch``: the products with the weight matrices
    outside the embeddings, and attention (scores and weighted values), counted on the unpadded lengths."""
    config = encoder.query_model.config
    params = sum(p.numel() for name, p in encoder.named_parameters() if ".embeddings." not in name and p.dim() == 2)
    lengths = torch.cat([batch["query"]["attention_mask"].sum(1), batch["docs"]["attention_mask"].sum(1)]).double()
    forward = 2 * params * lengths.sum() + 4 * config.num_hidden_layers * config.hidden_size * (lengths ** 2).sum()
    return forwards * float(forward)


def run(module: BiEncoderModule, batch: dict, optimizer, steps: int, device) -> tuple[float, float]:
    """Seconds per step and peak memory (GiB) of ``steps`` optimiser steps on the same batch."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            if module.grad_cache_chunk:
                module.backward_step(batch)
            else:
                module.loss_from_embeddings([embed(x) for embed, x in module.towers(batch)], batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return (time.perf_counter() - start) / steps, peak


def loader_rate(data: str, tokenizer, size: int, max_length: int, workers: int, batches: int = 8) -> float:
    """Pairs/s that the cropping data pipeline alone supplies in batches of ``size`` (after its first batch)."""
    pairs = CroppingPairs(BeirDataset(data), augmentation={"deletion": 0.1})
    collator = GroupCollator(tokenizer, max_length, max_length)
    batches = max(1, min(batches, len(pairs) // size - 1))
    loader = iter(RetrievalDataModule(pairs, collator, size, workers).train_dataloader())
    next(loader)  # workers started, first batch made
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return size * batches / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/scifact")
    parser.add_argument("--model", default="packaged:minilm")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="H100 SXM dense bf16")
    parser.add_argument("--loader-workers", type=int, nargs="*", default=[0, 2], help="DataLoader worker counts")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pairs = CroppingPairs(BeirDataset(args.data), augmentation={"deletion": 0.1})
    encoder = Encoder(args.model, query_max_length=args.max_length, doc_max_length=args.max_length).to(device)
    module = BiEncoderModule(encoder, InfoNCELoss(0.05)).to(device)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-5)
    params = sum(p.numel() for p in encoder.parameters())
    embedding = sum(p.numel() for name, p in encoder.named_parameters() if ".embeddings." in name)
    collate = GroupCollator(encoder.tokenizer, args.max_length, args.max_length)
    rows, baseline = [], None
    for size in sorted(args.sizes):
        batch = collate(cropping_batch(pairs, size))
        batch = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in batch.items()}
        for chunk in (None, args.chunk):
            module.grad_cache_chunk = chunk
            try:
                run(module, batch, optimizer, 1, device)  # warm-up
                seconds, peak = run(module, batch, optimizer, args.steps, device)
            except torch.OutOfMemoryError:
                optimizer.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                rows.append((size, chunk, None, None, None, None))
                continue
            flops = model_flops(encoder, batch, 3) / seconds  # the model's FLOPs: no recomputation counted
            peak_flops = args.peak_tflops * 1e12
            rows.append((size, chunk, size / seconds, flops / peak_flops, flops * (4 if chunk else 3) / 3 / peak_flops,
                         peak))
            if chunk is None:
                baseline = (size, size / seconds)
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; {args.model} "
          f"({params / 1e6:.1f}M parameters, {embedding / 1e6:.1f}M of them embeddings), cropping pairs of up to "
          f"{args.max_length} tokens")
    print("| batch | grad cache chunk | pairs/s | MFU | HFU | peak GiB | pairs/s vs plain at the largest batch that "
          "fits |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for size, chunk, rate, mfu, hfu, peak in rows:
        if rate is None:
            print(f"| {size} | {chunk or 'off'} | out of memory | | | | |")
            continue
        ratio = f"{rate / baseline[1]:.2f} (plain at {baseline[0]})" if baseline and chunk else ""
        print(f"| {size} | {chunk or 'off'} | {rate:.1f} | {mfu:.3f} | {hfu:.3f} | {peak:.2f} | {ratio} |")
    size, step = rows[0][0], rows[0][2]  # the plain step at the smallest batch
    for workers in args.loader_workers if step else []:
        rate = loader_rate(args.data, encoder.tokenizer, size, args.max_length, workers)
        turns = f"; taking turns with the step: {1 / (1 / rate + 1 / step):.1f} pairs/s" if not workers else ""
        print(f"data pipeline at batch {size}, {workers} workers: {rate:.1f} pairs/s = {rate / step:.2f} x the "
              f"plain step{turns}")


if __name__ == "__main__":
    main()
