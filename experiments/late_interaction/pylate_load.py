"""Does PyLate load a ColBERT this framework saved as the same model? Saves ColBERTs (packaged MiniLM, untrained
projection) under a few settings, adds PyLate's files (``write_pylate_files``), loads each folder with
``pylate.models.ColBERT`` and compares the token vectors of queries and documents and their MaxSim scores.

    PYTHONPATH=/tmp/pylate_pkgs python experiments/late_interaction/pylate_load.py

PyLate (1.6) and sentence-transformers 5.3.0, which it pins, installed with ``pip install --no-deps --target
/tmp/pylate_pkgs pylate sentence-transformers==5.3.0`` (sentence-transformers 6 ignores PyLate's settings file, see
:mod:`retrieval_lab.models.pylate_folder`). ``datasets``, which ``pylate.utils`` imports but loading and encoding never
use, is stubbed in ``sys.modules`` when it is not installed.
"""
from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import sys
import tempfile
import types
from pathlib import Path

import torch

from retrieval_lab.models.colbert import ColBERT
from retrieval_lab.models.pylate_folder import write_pylate_files

QUERIES = ["what causes cancer?", "protein folding, misfolding & disease",
           "how do vaccines train the immune system to recognise a virus that it has never seen before in any of "
           "its many forms, strains or variants, and for how long does that protection last in adults and children"]
DOCS = ["Cancer is caused by mutations (changes) in genes that control cell growth.",
        "Proteins fold into 3-D shapes; misfolded proteins -- e.g. amyloid -- aggregate!",
        "Vaccines expose the immune system to an antigen. " * 40]  # longer than doc_max_length
SETTINGS = {"default": {}, "attend_to_expansion": {"attend_to_expansion": True},
            "no_augment": {"augment": False}, "keep_punctuation": {"skip_punctuation": False},
            "short": {"query_max_length": 8, "doc_max_length": 16}}


def import_pylate():
    if importlib.util.find_spec("datasets") is None:
        stub = types.ModuleType("datasets")
        stub.__spec__ = importlib.machinery.ModuleSpec("datasets", None)  # transformers' find_spec checks want one
        stub.Dataset, stub.DatasetDict = type("Dataset", (), {}), type("DatasetDict", (dict,), {})
        sys.modules["datasets"] = stub
    import sentence_transformers
    from pylate import models, scores

    if not sentence_transformers.__version__.startswith("5."):
        print(f"warning: sentence-transformers {sentence_transformers.__version__}; PyLate 1.6 loads folders "
              f"under 5.x only")
    return models, scores


def ours_vectors(model: ColBERT, texts: list[str], side: str) -> list[torch.Tensor]:
    with torch.no_grad():
        inputs = model.tokenize(texts, side)
        encoded = model.encode_queries(inputs) if side == "query" else model.encode_docs(inputs)
    return [v[m] for v, m in zip(encoded.vectors, encoded.mask)]


def compare(name: str, settings: dict, folder: Path, models, scores) -> bool:
    torch.manual_seed(0)
    ours = ColBERT(name_or_path="packaged:minilm", **settings).eval()
    ours.save(folder)
    write_pylate_files(folder, ours)
    theirs = models.ColBERT(str(folder), device="cpu")
    print(f"  pylate: prefixes {theirs.query_prefix!r}/{theirs.document_prefix!r} (ids {theirs.query_prefix_id}/"
          f"{theirs.document_prefix_id}), lengths {theirs.query_length}/{theirs.document_length}, expansion "
          f"{theirs.do_query_expansion}, attend {theirs.attend_to_expansion_tokens}, skiplist "
          f"{len(theirs.skiplist_words)} words, modules {[type(m).__name__ for m in theirs]}")
    same = True
    ours_side, theirs_side = {}, {}
    for side, texts in (("query", QUERIES), ("doc", DOCS)):
        a = ours_vectors(ours, texts, side)
        b = [torch.as_tensor(v) for v in theirs.encode(texts, is_query=side == "query", convert_to_tensor=True)]
        counts = [(len(x), len(y)) for x, y in zip(a, b)]
        match = all(x == y for x, y in counts)
        diff = max((x - y).abs().max().item() for x, y in zip(a, b)) if match else float("nan")
        print(f"  {side:5s} token counts ours/pylate {counts}  match={match}  max |diff| {diff:.2e}")
        same &= match and diff < 1e-4
        ours_side[side], theirs_side[side] = a, b
    with torch.no_grad():
        mine = torch.tensor([[ours.score(*(_one(q), _one(d))).item() for d in ours_side["doc"]]
                             for q in ours_side["query"]])
    pylate = torch.tensor([[scores.colbert_scores(q[None], d[None]).item() for d in theirs_side["doc"]]
                           for q in theirs_side["query"]])
    print(f"  MaxSim ours   {[[round(x, 4) for x in row] for row in mine.tolist()]}")
    print(f"  MaxSim pylate {[[round(x, 4) for x in row] for row in pylate.tolist()]}")
    print(f"  max |score diff| {(mine - pylate).abs().max().item():.2e}")
    same &= (mine - pylate).abs().max().item() < 1e-3
    return same


def _one(vectors: torch.Tensor):
    from retrieval_lab.models.representation import MultiVector

    return MultiVector(vectors[None], torch.ones(1, len(vectors), dtype=torch.bool))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    args = parser.parse_args()
    models, scores = import_pylate()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.settings:
            print(f"{name}: {SETTINGS[name] or 'ColBERT defaults'}")
            results[name] = compare(name, SETTINGS[name], Path(tmp) / name, models, scores)
    print("same model in PyLate:", results)
    sys.exit(0 if all(results.values()) else 1)


if __name__ == "__main__":
    main()
