"""Gradient caching gives the loss and parameter gradients of the plain step (tiny model, CPU), for the
bi-encoder, MoCo and the cross-encoder-based modules, and trains through the entry point."""
from __future__ import annotations

import json

import pytest
import torch

from retrieval_lab.data.datamodule import GroupCollator
from retrieval_lab.losses.infonce import InfoNCELoss
from retrieval_lab.losses.listwise_kl import ListwiseKLLoss
from retrieval_lab.losses.margin_mse import MarginMSELoss
from retrieval_lab.losses.samtone import SamToNeLoss
from retrieval_lab.models.biencoder import BiEncoderModule
from retrieval_lab.models.cross_encoder import CrossEncoder
from retrieval_lab.models.encoder import Encoder
from retrieval_lab.models.moco import MoCoModule
from retrieval_lab.models.rocketqa import RocketQAModule
from test_combinations import FAST, compose_train
from retrieval_lab.train import train

WORDS = "gene cancer protein virus cell brain heart lung kidney blood bone skin muscle immune liver tumor".split()


def make_batch(encoder, group, n=6, pair_tokenizer=None, seed=0, teacher=False):
    g = torch.Generator().manual_seed(seed)
    pick = lambda k: " ".join(WORDS[i] for i in torch.randint(len(WORDS), (k,), generator=g).tolist())
    examples = [{"qid": f"q{i}", "query": pick(3), "doc_ids": [f"d{i}_{j}" for j in range(group)],
                 "docs": [pick(4 + 3 * j + i % 3) for j in range(group)], "positives": {f"d{i}_0"}} for i in range(n)]
    for ex in examples if teacher else []:
        ex["teacher"] = torch.randn(group, generator=g).tolist()
    return GroupCollator(encoder.tokenizer, 16, 32, pair_tokenizer)(examples)


def grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def plain_and_cached(module, batch, chunk):
    module.zero_grad(set_to_none=True)
    loss = module.loss_from_embeddings([embed(inputs) for embed, inputs in module.towers(batch)], batch)
    loss.backward()
    plain = grads(module)
    module.zero_grad(set_to_none=True)
    module.grad_cache_chunk = chunk
    cached_loss = module.backward_step(batch)
    return loss.item(), plain, cached_loss.item(), grads(module)


def assert_same(plain_loss, plain, cached_loss, cached):
    assert cached_loss == pytest.approx(plain_loss, rel=1e-5)
    assert plain.keys() == cached.keys() and len(plain) > 10
    for name in plain:
        assert torch.allclose(plain[name], cached[name], atol=1e-6, rtol=1e-4), name


@pytest.mark.parametrize("loss,group,chunk", [(InfoNCELoss(0.05), 1, 2), (InfoNCELoss(0.05, bidirectional=True), 3, 4),
                                              (SamToNeLoss(0.05, side="both"), 2, 1), (MarginMSELoss(alpha=0.5), 3, 4)])
def test_biencoder_cached_equals_plain(tiny_model, loss, group, chunk):
    torch.manual_seed(0)
    encoder = Encoder(tiny_model, query_max_length=16, doc_max_length=32).eval()  # no dropout: exact comparison
    module = BiEncoderModule(encoder, loss, group_size=group)
    batch = make_batch(encoder, group, teacher="teacher" in loss.needs)
    assert_same(*plain_and_cached(module, batch, chunk))


def test_dropout_masks_are_replayed(tiny_model):
    """With dropout on and one chunk, the no-graph pass and the replay must draw the plain step's masks."""
    encoder = Encoder(tiny_model, query_max_length=16, doc_max_length=32).train()
    module = BiEncoderModule(encoder, InfoNCELoss(0.05), group_size=2)
    batch = make_batch(encoder, 2)
    torch.manual_seed(1)
    loss = module.loss_from_embeddings([embed(inputs) for embed, inputs in module.towers(batch)], batch)
    loss.backward()
    plain = grads(module)
    module.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    module.grad_cache_chunk = 12  # one chunk per tower (6 queries, 12 documents)
    cached_loss = module.backward_step(batch)
    assert_same(loss.item(), plain, cached_loss.item(), grads(module))


def test_chunks_take_rows_longest_first_cut_to_their_longest_row():
    from retrieval_lab.models.grad_cache import split_inputs

    lengths = [3, 7, 1, 5, 2, 7, 4]
    mask = torch.tensor([[1] * n + [0] * (8 - n) for n in lengths])
    inputs = {"input_ids": torch.arange(56).view(7, 8) * mask, "attention_mask": mask}
    pieces = split_inputs(inputs, 3)
    assert [rows.tolist() for rows, _ in pieces] == [[1, 5, 3], [6, 0, 4], [2]]  # longest first, stable
    assert [piece["input_ids"].shape for _, piece in pieces] == [(3, 7), (3, 4), (1, 1)]
    for rows, piece in pieces:  # each row's real tokens, whole
        for row, ids, m in zip(rows.tolist(), piece["input_ids"], piece["attention_mask"]):
            assert ids[m.bool()].tolist() == inputs["input_ids"][row, :lengths[row]].tolist()
    # left padding: every row ends in the last column, so nothing is cut (positions stay where they were)
    left = {"input_ids": inputs["input_ids"].flip(1), "attention_mask": mask.flip(1)}
    assert all(piece["input_ids"].size(1) == 8 for _, piece in split_inputs(left, 3))
    # one chunk for the whole batch: the batch as it is
    [(rows, piece)] = split_inputs(inputs, 7)
    assert rows.tolist() == list(range(7)) and torch.equal(piece["input_ids"], inputs["input_ids"])


def test_dropout_masks_are_replayed_in_sorted_chunks(tiny_model):
    """With dropout on and several chunks (rows regrouped by length), the gradients are those of the loss on the
    first pass's embeddings: the replay draws the same masks. The reference runs the first pass with a graph."""
    from retrieval_lab.models.grad_cache import split_inputs

    encoder = Encoder(tiny_model, query_max_length=16, doc_max_length=32).train()
    module = BiEncoderModule(encoder, InfoNCELoss(0.05), group_size=2)
    batch = make_batch(encoder, 2)
    torch.manual_seed(1)
    embeddings = []
    for embed, inputs in module.towers(batch):
        pieces = split_inputs(inputs, 4)
        parts = torch.cat([embed(piece) for _, piece in pieces])
        order = torch.cat([rows for rows, _ in pieces])
        embeddings.append(parts[torch.argsort(order)])
    loss = module.loss_from_embeddings(embeddings, batch)
    loss.backward()
    reference = grads(module)
    module.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    module.grad_cache_chunk = 4
    cached_loss = module.backward_step(batch)
    assert_same(loss.item(), reference, cached_loss.item(), grads(module))


def test_moco_cached_equals_plain(tiny_model):
    torch.manual_seed(0)
    encoder = Encoder(tiny_model, query_max_length=16, doc_max_length=32).eval()
    module = MoCoModule(encoder, InfoNCELoss(0.05), queue_size=8, momentum=0.9)
    module.enqueue(torch.nn.functional.normalize(torch.randn(5, encoder.dim), dim=-1))
    key_rows, encode_keys = [], module.key_encoder.encode_docs
    module.key_encoder.encode_docs = lambda inputs: key_rows.append(len(inputs["input_ids"])) or encode_keys(inputs)
    assert_same(*plain_and_cached(module, make_batch(encoder, 1), 4))
    assert key_rows == [6, 4, 2]  # the plain step's keys at once, the cached step's in chunks of 4


def test_rocketqa_cached_equals_plain(tiny_model):
    torch.manual_seed(0)
    encoder = Encoder(tiny_model, query_max_length=16, doc_max_length=32).eval()
    ranker = CrossEncoder(tiny_model, max_length=48).eval()
    module = RocketQAModule(encoder, ListwiseKLLoss(0.1), ranker, group_size=3)
    batch = make_batch(encoder, 3, pair_tokenizer=(ranker.tokenizer, 48))
    assert_same(*plain_and_cached(module, batch, 5))


@pytest.mark.parametrize("negatives", ["inbatch", "moco"])
def test_grad_cache_trains_through_the_entry_point(negatives, tiny_model, beir_folder, tmp_path):
    overrides = [f"negatives={negatives}", "trainer.grad_cache_chunk=3", "data=beir", f"data.path={beir_folder}",
                 f"model.name_or_path={tiny_model}", *FAST, "batch_size=8"]
    if negatives == "inbatch":
        overrides.remove("negatives.module.queue_size=6")
    train(compose_train(overrides), tmp_path)
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == 2
    log = (tmp_path / "csv" / "metrics.csv").read_text()
    assert "train/loss" in log and "lr-AdamW" in log


@pytest.mark.parametrize("precision", ["32", "16-mixed"])
def test_cached_steps_clip_like_the_trainer_under_a_loss_scaler(precision, tiny_model, beir_folder):
    """Gradient caching clips in the module (manual optimisation), the plain path in the Trainer. With a loss
    scaler (16-mixed, as on a GPU without bf16; here a CPU scaler starting at 1024) both clip the unscaled
    gradients, so one step moves the weights alike; clipping gradients still multiplied by the scale would shrink
    the step."""
    import lightning as L
    from lightning.pytorch.plugins.precision import MixedPrecision

    from retrieval_lab.data.beir import BeirDataset
    from retrieval_lab.data.datamodule import RetrievalDataModule
    from retrieval_lab.data.pairs import SupervisedPairs

    data = BeirDataset(beir_folder)

    class SGDModule(BiEncoderModule):  # a step of -gradient: the update is the clipped gradient itself
        def configure_optimizers(self):
            optimizer = torch.optim.SGD(self.parameters(), lr=1.0)
            return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)}

    def one_step(chunk):
        L.seed_everything(0)
        encoder = Encoder(str(tiny_model), query_max_length=16, doc_max_length=32)
        for m in encoder.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        module = SGDModule(encoder, InfoNCELoss(0.05), grad_cache_chunk=chunk, gradient_clip_val=1.0 if chunk else None)
        before = [p.detach().clone() for p in module.parameters()]
        plugins = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))] \
            if precision == "16-mixed" else []
        trainer = L.Trainer(max_steps=1, accelerator="cpu", plugins=plugins, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False,
                            gradient_clip_val=None if chunk else 1.0)
        trainer.fit(module, datamodule=RetrievalDataModule(SupervisedPairs(data, data.qrels("train")),
                                                           GroupCollator(encoder.tokenizer, 16, 32), batch_size=4))
        return torch.cat([(p.detach() - b).flatten() for p, b in zip(module.parameters(), before)])

    plain, cached = one_step(None), one_step(2)
    assert plain.norm() == pytest.approx(1.0, rel=1e-3)  # the gradient norm exceeds 1: clipped to 1
    # one step alike, up to fp16 noise (the cached loss gradient comes from a no-grad forward, whose fp16 kernels can
    # round otherwise; the float32 scores keep that difference, where fp16 scores used to round it away): clipping
    # the scaled gradients instead would have made the cached step 1024 times shorter
    assert cached.norm() == pytest.approx(1.0, rel=1e-3) and (cached - plain).norm() < 1e-2
