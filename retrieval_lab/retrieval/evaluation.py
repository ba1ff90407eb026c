"""Run a retriever on a split, score it, write the TREC run file; print metric tables."""
from __future__ import annotations

import time
from pathlib import Path

from retrieval_lab.data.beir import BeirSplit
from retrieval_lab.retrieval.metrics import Run, evaluate_run, top_k
from retrieval_lab.retrieval.runfile import write_trec_run


def retrieve_split(retriever, split: BeirSplit, k: int = 100, ignore_identical_ids: bool = True) -> Run:
    """The top ``k`` documents for every query of ``split``. With ``ignore_identical_ids`` (BEIR's evaluation
    default), a document with the query's own id is left out of its results: ArguAna and Quora hold each query in
    the corpus too. One more document is then retrieved, so ``k`` remain."""
    identical = ignore_identical_ids and not split.queries.keys().isdisjoint(split.corpus.keys())
    run = retriever.retrieve(split.corpus, split.queries, k + 1 if identical else k)
    if identical:
        run = top_k({q: {d: s for d, s in docs.items() if d != q} for q, docs in run.items()}, k)
    return run


def evaluate_retriever(retriever, split: BeirSplit, run_file: str | Path, k: int = 100,
                       metrics=("ndcg@10", "recall@100", "mrr@10"), tag: str = "retrieval_lab",
                       ignore_identical_ids: bool = True) -> dict[str, float]:
    start = time.perf_counter()
    run = retrieve_split(retriever, split, k, ignore_identical_ids)
    write_trec_run(run, run_file, tag)  # first: the retrieval's work is kept even if scoring fails
    scores = evaluate_run(split.qrels, run, metrics)
    scores["seconds"] = round(time.perf_counter() - start, 2)
    return scores


def print_table(rows: dict[str, dict[str, float]], metrics, title: str | None = None) -> None:
    """A small table, one row per system (e.g. before/after training), one column per metric."""
    from rich.console import Console
    from rich.table import Table

    table = Table()
    table.add_column("")
    for metric in metrics:
        table.add_column(metric, justify="right")
    for name, scores in rows.items():
        table.add_row(name, *(f"{scores[m]:.4f}" if m in scores else "-" for m in metrics))
    console = Console()
    if title:  # a line of its own: a title longer than the table (a data set's path) would wrap inside it
        console.print(title, highlight=False)
    console.print(table)
