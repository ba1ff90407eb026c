"""Which of a document's m vectors wins ME-BERT's maximum: for SciFact test queries against their judged documents
(and against every one of those documents), the share of pairs whose best vector is vector j, and each vector's
mean score.

    python experiments/mebert/vector_use.py [--model packaged:minilm runs/mebert/mebert_m4/model] [--vectors 4]
"""
from __future__ import annotations

import argparse

import torch

from retrieval_lab.data.beir import BeirDataset
from retrieval_lab.models.mebert import MEBERT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["packaged:minilm", "runs/mebert/mebert_m4/model"])
    parser.add_argument("--vectors", type=int, default=4)
    parser.add_argument("--data", default="data/scifact")
    parser.add_argument("--queries", type=int, default=100)
    args = parser.parse_args()
    test = BeirDataset(args.data).split("test")
    qids = list(test.queries)[:args.queries]
    docs = [next(iter(test.qrels[q])) for q in qids]
    print(f"| model | pairs won by vector 1..{args.vectors} (all pairs) | judged pairs won | mean score of vector 1..m |")
    print("| --- | --- | --- | --- |")
    for name in args.model:
        model = MEBERT(args.vectors, name_or_path=name, doc_max_length=128).eval()
        with torch.no_grad():
            q = model.encode_queries(model.tokenize([test.queries[x] for x in qids], "query"))
            d = model.encode_docs(model.tokenize([test.corpus[x].full_text for x in docs], "doc"))
            each = torch.einsum("qh,dmh->qdm", q, d.vectors).masked_fill(~d.mask[None], float("-inf"))
        won = each.argmax(-1)
        shares = torch.bincount(won.flatten(), minlength=args.vectors).float() / won.numel()
        judged = torch.bincount(won.diagonal(), minlength=args.vectors).tolist()
        means = each.masked_fill(~d.mask[None], 0).sum((0, 1)) / d.mask.sum(0).clamp(min=1) / len(qids)
        print(f"| {name} | {', '.join(f'{s:.2f}' for s in shares.tolist())} | {', '.join(map(str, judged))} | "
              f"{', '.join(f'{m:.3f}' for m in means.tolist())} |")


if __name__ == "__main__":
    main()
