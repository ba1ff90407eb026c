"""Encoder: pooling against hand computation, towers, shared projection, model paths, saved folders."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT
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


def test_an_unreachable_hub_loads_a_cached_model_and_names_a_missing_one(tiny_model, tmp_path):
    """With the hub unreachable (its address a closed local port), a hub id in the Hugging Face cache loads from the
    cache, and one that is not there is one sentence naming the hub, without the hub library's retries (it tries
    one address only once: about half a minute before). Run in a fresh process: the cache and the hub's address
    are read when the hub library is imported."""
    import os
    import shutil
    import socket
    import subprocess
    import sys

    snapshot = tmp_path / "cache" / "models--org--tiny" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_model, snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0123abcd")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and k != "HF_HUB_OFFLINE"}
    env.update(HF_HUB_CACHE=str(tmp_path / "cache"), HF_ENDPOINT=f"http://127.0.0.1:{port}", PYTHONPATH=str(ROOT))
    code = """
import sys
from retrieval_lab.errors import ConfigError
from retrieval_lab.models.encoder import Encoder, unreachable_hub
print(unreachable_hub())
encoder = Encoder("org/tiny")
print(encoder.encode_docs(encoder.tokenize(["a cell"], "doc")).shape)
try:
    Encoder("org/missing")
except ConfigError as err:
    print(err)
"""
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0] == f"http://127.0.0.1:{port}"
    assert lines[1].startswith("torch.Size([1, ")
    assert lines[2] == (f"could not load model 'org/missing': no such local folder, it is not in the Hugging Face "
                        f"cache, and the hub (http://127.0.0.1:{port}) cannot be reached.")
    assert "Retrying" not in result.stderr


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



# ---- a folder written by Encoder.save loads back as the encoder that was saved ----
TEXTS = ["what about protein and cancer in the human brain", "virus neuron study results", "gene"]


def hydra_model_args() -> dict:
    """The arguments the default model config (conf/model/minilm.yaml) passes besides name_or_path."""
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / "minilm.yaml"))
    return {k: v for k, v in cfg.items() if k not in ("_target_", "name_or_path")}


def embeddings(enc: Encoder) -> tuple[torch.Tensor, torch.Tensor]:
    enc = enc.eval()
    with torch.no_grad():
        return enc.encode_queries(enc.tokenize(TEXTS, "query")), enc.encode_docs(enc.tokenize(TEXTS, "doc"))


def saved_encoder(tiny_model, folder, **settings) -> Encoder:
    """An encoder with every weight moved off its initial value (towers apart, projection not at init), saved."""
    torch.manual_seed(1)
    enc = Encoder(str(tiny_model), **settings)
    with torch.no_grad():
        for param in enc.parameters():
            param.add_(0.05 * torch.randn_like(param))
    enc.save(folder)
    return enc


@pytest.mark.parametrize("settings", [
    {"pooling": "mean", "normalize": False, "query_max_length": 6, "doc_max_length": 8},
    {"pooling": "cls", "projection_dim": 16, "normalize": True},
    {"shared_towers": False, "projection_dim": 8, "normalize": False},
], ids=["mean", "cls+projection+normalize", "separate-towers+projection"])
def test_a_saved_encoder_loads_back_as_it_was_trained(tiny_model, tmp_path, settings):
    original = saved_encoder(tiny_model, tmp_path / "m", **settings)
    q_expected, d_expected = embeddings(original)
    if not original.shared_towers:
        assert not torch.allclose(q_expected, embeddings(original)[1])  # the towers really differ
    for args in ({}, hydra_model_args()):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = Encoder(str(tmp_path / "m"), **args)
        assert not [w for w in caught if "is ignored" in str(w.message)]  # default arguments defer silently
        assert (loaded.pooling, loaded.normalize, loaded.shared_towers, loaded.dim) == \
               (original.pooling, original.normalize, original.shared_towers, original.dim)
        assert (loaded.query_max_length, loaded.doc_max_length) == (original.query_max_length, original.doc_max_length)
        q, d = embeddings(loaded)
        assert torch.allclose(q, q_expected, atol=1e-6) and torch.allclose(d, d_expected, atol=1e-6)


def test_a_saved_encoder_loads_without_a_report_of_missing_weights(tiny_model, tmp_path, capfd, caplog):
    """The pooler is dropped (mean or CLS pooling of the last hidden state), so a saved folder has none: loading it
    must not report a "newly initialised" pooler, which reads as a broken model."""
    saved_encoder(tiny_model, tmp_path / "m")
    capfd.readouterr()
    caplog.clear()
    with caplog.at_level("INFO"):
        Encoder(str(tmp_path / "m"))
    out = "".join(capfd.readouterr()) + caplog.text
    assert "MISSING" not in out and "newly initialized" not in out, out


def test_a_conflicting_architecture_argument_is_ignored_with_a_warning(tiny_model, tmp_path):
    original = saved_encoder(tiny_model, tmp_path / "m", pooling="cls", projection_dim=16)
    with pytest.warns(UserWarning, match=r"model.projection_dim=32 is ignored: .*retrieval_lab.json says "
                                         r"projection_dim=16"):
        loaded = Encoder(str(tmp_path / "m"), projection_dim=32, query_max_length=10)
    assert loaded.dim == 16 and loaded.query_max_length == 10  # a max length is the caller's to choose
    assert torch.allclose(embeddings(loaded)[1], embeddings(original)[1], atol=1e-6)
    # a value given that equals the default of an unsaved model is still a value given: warned too
    with pytest.warns(UserWarning, match=r"model.pooling=mean is ignored: .*retrieval_lab.json says pooling=cls"):
        assert Encoder(str(tmp_path / "m"), pooling="mean").pooling == "cls"


def test_a_damaged_saved_folder_is_one_clear_error(tiny_model, tmp_path):
    saved_encoder(tiny_model, tmp_path / "m", projection_dim=16)
    (tmp_path / "m" / "2_Dense" / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"2_Dense/model.safetensors is missing"):
        Encoder(str(tmp_path / "m"))
    settings = tmp_path / "m" / "retrieval_lab.json"
    settings.write_text(json.dumps({**json.loads(settings.read_text()), "pooling": "max"}))
    with pytest.raises(ConfigError, match=r"retrieval_lab.json: pooling must be one of mean, cls, got 'max'"):
        Encoder(str(tmp_path / "m"))
    settings.write_text("{")
    with pytest.raises(ConfigError, match=r"retrieval_lab.json could not be read as JSON"):
        Encoder(str(tmp_path / "m"))


# ---- each setting of Encoder and CrossEncoder is checked when the model is built, in one sentence ----
BAD_COUNTS = [("abc", "abc"), (-5, "-5"), (0, "0"), (2.5, "2.5"), (True, "true")]  # (value, as the message shows it)


@pytest.mark.parametrize("key", ["query_max_length", "doc_max_length", "projection_dim"])
@pytest.mark.parametrize("value,shown", BAD_COUNTS, ids=str)
def test_a_length_that_is_not_a_positive_whole_number_is_refused(key, value, shown):
    with pytest.raises(ConfigError) as err:
        Encoder("packaged:minilm", **{key: value})
    assert str(err.value) == f"model.{key} must be a positive whole number or null, got '{shown}'."


@pytest.mark.parametrize("value,shown", BAD_COUNTS + [(None, "null")], ids=str)
def test_a_cross_encoder_length_that_is_not_a_positive_whole_number_is_refused(value, shown):
    from retrieval_lab.models.cross_encoder import CrossEncoder

    with pytest.raises(ConfigError) as err:
        CrossEncoder("packaged:minilm", max_length=value)
    assert str(err.value) == f"the cross-encoder's max_length must be a positive whole number, got '{shown}'."


@pytest.mark.parametrize("key", ["normalize", "shared_towers"])
def test_a_switch_that_is_not_true_or_false_is_refused(key):
    with pytest.raises(ConfigError, match=rf"^model.{key} must be true or false or null, got 'abc'.$"):
        Encoder("packaged:minilm", **{key: "abc"})


@pytest.mark.parametrize("override", ["model.doc_max_length=abc", "model.query_max_length=-5",
                                      "model.doc_max_length=0", "model.query_max_length=2.5",
                                      "model.doc_max_length=true", "model.projection_dim=abc"])
def test_a_bad_length_on_the_command_line_is_one_sentence(override):
    """As Hydra hands the values over (a word as a string, true as a bool, 2.5 as a float)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from retrieval_lab.errors import find_user_error

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[override])
    key, value = override.split("=")
    with pytest.raises(Exception) as err:
        instantiate(cfg.model)
    assert str(find_user_error(err.value)) == f"{key} must be a positive whole number or null, got '{value}'."


def test_null_lengths_take_the_defaults(tiny_model):
    enc = Encoder(str(tiny_model), query_max_length=None, doc_max_length=None, projection_dim=None)
    assert (enc.query_max_length, enc.doc_max_length, enc.projection) == (64, 256, None)
