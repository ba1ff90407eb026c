"""The benchmarks' own arithmetic: bench_train's model FLOPs against torch's FLOP counter."""
from __future__ import annotations

import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import ROOT
from retrieval_lab.models.encoder import Encoder

sys.path.insert(0, str(ROOT / "experiments"))
from bench_train import model_flops  # noqa: E402


def test_model_flops_equal_what_torch_counts(tiny_model):
    """One forward of queries and documents of different lengths (each batch unpadded), with attention computed
    eagerly so that the counter sees its matrix products."""
    encoder = Encoder(tiny_model).eval()
    encoder.query_model.set_attn_implementation("eager")
    batch = {side: {"input_ids": torch.randint(1000, 2000, (3, n)), "attention_mask": torch.ones(3, n, dtype=torch.long)}
             for side, n in (("query", 9), ("docs", 40))}
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        encoder.encode_queries(batch["query"])
        encoder.encode_docs(batch["docs"])
    assert model_flops(encoder, batch, 1) == counter.get_total_flops()
    assert model_flops(encoder, batch, 3) == 3 * counter.get_total_flops()
