"""Encoder: pooling against hand computation, towers, shared projection, model paths."""
from __future__ import annotations

import pytest
import torch

from retrieval_lab.errors import ConfigError
from retrieval_lab.models.encoder import Encoder, pool, resolve_model_path


def test_mean_pooling_ignores_padding():
    hidden = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    out = pool(hidden, mask, "mean")
    assert torch.equal(out[0], (hidden[0, 0] + hidden[0, 1]) / 2)
    assert torch.equal(out[1], hidden[1].mean(0))
    assert torch.equal(pool(hidden, mask, "cls"), hidden[:, 0])


def test_padding_does_not_change_an_embedding(tiny_model):
    enc = Encoder(str(tiny_model)).eval()
    with torch.no_grad():
        alone = enc.encode_docs(enc.tokenize(["protein cancer"], "doc"))
        padded = enc.encode_docs(enc.tokenize(["protein cancer", "a much longer text with many more words in it"], "doc"))
    assert torch.allclose(alone[0], padded[0], atol=1e-5)
    assert torch.allclose(alone.norm(dim=-1), torch.ones(1))


def test_asymmetric_towers_with_shared_projection(tiny_model):
    enc = Encoder(str(tiny_model), shared_towers=False, projection_dim=16, normalize=False).eval()
    assert enc.dim == 16 and enc.doc_model is not enc.query_model
    batch = enc.tokenize(["protein cancer"], "query")
    q, d = enc.encode_queries(batch), enc.encode_docs(batch)
    assert torch.allclose(q, d)  # both towers start from the same weights
    (q.sum() - d.sum()).backward()
    assert enc.projection.weight.grad is not None  # the projection is shared by both sides
    q_grad = next(enc.query_model.parameters()).grad
    d_grad = next(enc.doc_model.parameters()).grad
    assert q_grad is not None and d_grad is not None and not torch.allclose(q_grad, d_grad)


def test_asymmetric_save_writes_one_folder_per_tower(tiny_model, tmp_path):
    enc = Encoder(str(tiny_model), shared_towers=False, projection_dim=16)
    enc.save(tmp_path / "m")
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(tmp_path / "m" / "doc"), device="cpu")
    with torch.no_grad():
        ours = enc.eval().encode_docs(enc.tokenize(["gene cell brain"], "doc"))
    assert torch.allclose(torch.tensor(st.encode(["gene cell brain"])), ours, atol=1e-5)


def test_packaged_model_resolves_to_a_folder():
    assert (resolve_model_path("packaged:minilm").endswith("model"))


@pytest.mark.parametrize("name,match", [("./no/such/model", "does not exist"), ("/tmp/none/at/all", "does not exist")])
def test_missing_model_path_is_one_clear_error(name, match):
    with pytest.raises(ConfigError, match=match):
        resolve_model_path(name)


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        resolve_model_path(str(tmp_path))


def test_unknown_pooling_is_refused(tiny_model):
    with pytest.raises(ConfigError, match="model.pooling"):
        Encoder(str(tiny_model), pooling="max")


def test_encoder_starts_in_training_mode(tiny_model):
    """from_pretrained hands back eval mode; Lightning keeps whatever mode it finds, so dropout must be on."""
    enc = Encoder(str(tiny_model))
    assert enc.training and all(m.training for m in enc.modules())


def test_random_init_builds_the_architecture_with_new_weights(tiny_model):
    pretrained = Encoder(str(tiny_model))
    scratch = Encoder(str(tiny_model), random_init={"num_hidden_layers": 1, "hidden_size": 16, "num_attention_heads": 2})
    assert scratch.query_model.config.num_hidden_layers == 1 and scratch.dim == 16
    same = Encoder(str(tiny_model), random_init={})
    w_pre = pretrained.query_model.embeddings.word_embeddings.weight
    assert not torch.allclose(same.query_model.embeddings.word_embeddings.weight, w_pre)
    with pytest.raises(ConfigError, match="model.random_init.no_such_field"):
        Encoder(str(tiny_model), random_init={"no_such_field": 3})


def test_half_precision_weights_load_in_float32(tiny_model, tmp_path):
    """A model folder saved in fp16 (how weights travel cheaply) trains in fp32 like any other."""
    from transformers import AutoModel

    from retrieval_lab.models.cross_encoder import CrossEncoder

    half = tmp_path / "half"
    AutoModel.from_pretrained(tiny_model).half().save_pretrained(half)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (tiny_model / name).exists():
            (half / name).write_bytes((tiny_model / name).read_bytes())
    full, from_half = Encoder(str(tiny_model)).eval(), Encoder(str(half)).eval()
    assert {p.dtype for p in from_half.parameters()} == {torch.float32}
    assert {p.dtype for p in CrossEncoder(str(half)).parameters()} == {torch.float32}
    with torch.no_grad():
        inputs = full.tokenize(["protein cancer"], "doc")
        assert torch.allclose(full.encode_docs(inputs), from_half.encode_docs(inputs), atol=1e-2)

