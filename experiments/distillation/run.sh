#!/usr/bin/env bash
# Issue 5 on SciFact: a cross-encoder teacher, its re-ranking of BM25's top 100, and three students that learn from
# it (Margin-MSE, listwise KL, RocketQA-v2 joint training), against the DPR student of experiments/hard_negatives.
# Sized for a GPU (each step is a few seconds on an H100; hours on a 2-core CPU). Run from the repository root
# after `make data`.
set -euo pipefail
OUT=multirun/distillation
NEG=data/scifact/negatives
python -m retrieval_lab.mine retriever=bm25                                  # $NEG/bm25-train.jsonl
# 1. the teacher: MiniLM as a cross-encoder, 8 documents a group (positive + 7 BM25 negatives)
python -m retrieval_lab.train module=cross_encoder negatives.group_size=8 batch_size=16 trainer.max_epochs=3 \
    optim.lr=3e-5 eval.before=false hydra.run.dir=$OUT/cross_encoder
# 2. re-ranking: BM25 top 100 re-ranked by the teacher (the training run's "after" is the same pipeline)
python -m retrieval_lab.evaluate retriever=bm25 reranker=cross_encoder \
    reranker.cross_encoder.name_or_path=$OUT/cross_encoder/model hydra.run.dir=$OUT/rerank_bm25
# 3. teacher scores for every (query, positive or negative) pair of the BM25 file
python -m retrieval_lab.score model.name_or_path=$OUT/cross_encoder/model output=$NEG/ce-train.jsonl
# 4. students, all the scifact_infonce recipe with the scored file
#    (Margin-MSE compares margins on the teacher's scale: cosine x 20 spans the logits' range)
python -m retrieval_lab.train experiment=scifact_infonce negatives=bm25 negatives.file=$NEG/ce-train.jsonl \
    loss=margin_mse loss.scale=20 eval.before=false hydra.run.dir=$OUT/margin_mse
python -m retrieval_lab.train experiment=scifact_infonce negatives=bm25 negatives.file=$NEG/ce-train.jsonl \
    loss=listwise_kl negatives.group_size=8 batch_size=16 eval.before=false hydra.run.dir=$OUT/listwise_kl
# 5. RocketQA-v2: retriever and ranker (starting from the teacher) trained together
python -m retrieval_lab.train experiment=scifact_infonce module=rocketqa negatives.group_size=8 batch_size=16 \
    module.cross_encoder.name_or_path=$OUT/cross_encoder/model eval.before=false hydra.run.dir=$OUT/rocketqa
python experiments/table.py $OUT
