#!/usr/bin/env bash
# Issue 3's question on SciFact: can unsupervised contrastive training match BM25?
# (a) domain adaptation of the packaged MiniLM on the SciFact corpus, 2 x 2 x 2 grid; (b) a small encoder from
# scratch. Then the table. Run from the repository root after `make data`.
set -euo pipefail
python -m retrieval_lab.train -m experiment=contriever_scifact pairs=cropping,ict negatives=inbatch,moco \
    loss=infonce,samtone hydra.sweep.dir=multirun/contriever_scifact
python -m retrieval_lab.train experiment=contriever_scratch hydra.run.dir=multirun/contriever_scifact/scratch
python experiments/table.py multirun/contriever_scifact
