#!/usr/bin/env bash
# Issue 5 on SciFact: a cross-encoder teacher, its re-ranking of BM25's top 100, and three students that learn from
# it (Margin-MSE, listwise KL, RocketQA-v2 joint training), against the DPR student of experiments/hard_negatives.
# These are the settings that were run on the 2-core CPU (see README.md here); on a GPU, raise the teacher's
# budget (negatives.group_size=8 batch_size=16 trainer.max_epochs=10 model.max_length=320). Run from the repository
# root after `make data`.
set -euo pipefail
OUT=multirun/distillation
NEG=data/scifact/negatives
python -m retrieval_lab.mine retriever=bm25                                  # $NEG/bm25-train.jsonl (30 negatives)
# 1. the teacher: MiniLM as a cross-encoder, groups of 4 (positive + 3 BM25 negatives); evaluation re-ranks BM25's
#    top 100 of every test query (the run's "after")
python -m retrieval_lab.train module=cross_encoder negatives.group_size=4 batch_size=8 trainer.max_epochs=5 \
    model.max_length=192 optim.lr=5e-5 validation.enabled=false eval.before=false hydra.run.dir=$OUT/cross_encoder
# 2. the same re-ranking as its own command (any first stage: retriever=bm25|dense|hybrid)
# python -m retrieval_lab.evaluate retriever=bm25 reranker=cross_encoder \
#     reranker.model.name_or_path=$OUT/cross_encoder/model reranker.model.max_length=192
# 3. teacher scores for every (query, positive or negative) pair of a 7-negative BM25 file
python -m retrieval_lab.mine n_neg=7 output=$NEG/bm25top7-train.jsonl
python -m retrieval_lab.score model.name_or_path=$OUT/cross_encoder/model model.max_length=192 \
    input=$NEG/bm25top7-train.jsonl output=$NEG/ce-train.jsonl
# 4. students, all the scifact_infonce recipe with the scored file
#    (Margin-MSE compares margins on the teacher's scale: cosine x 20 spans the logits' range)
python -m retrieval_lab.train experiment=scifact_infonce negatives=bm25 negatives.file=$NEG/ce-train.jsonl \
    loss=margin_mse loss.scale=20 eval.before=false hydra.run.dir=$OUT/margin_mse
python -m retrieval_lab.train experiment=scifact_infonce negatives=bm25 negatives.file=$NEG/ce-train.jsonl \
    loss=margin_mse loss.scale=20 loss.alpha=1 eval.before=false hydra.run.dir=$OUT/margin_mse_alpha1
python -m retrieval_lab.train experiment=scifact_infonce negatives=bm25 negatives.file=$NEG/ce-train.jsonl \
    loss=listwise_kl negatives.group_size=4 batch_size=16 eval.before=false hydra.run.dir=$OUT/listwise_kl
# 5. RocketQA-v2: retriever and ranker (starting from the teacher) trained together
python -m retrieval_lab.train experiment=scifact_infonce module=rocketqa negatives.group_size=4 batch_size=16 \
    module.cross_encoder.name_or_path=$OUT/cross_encoder/model eval.before=false hydra.run.dir=$OUT/rocketqa
python experiments/table.py $OUT
