"""Model folders that cannot give a meaningful encoder are refused in one sentence, and no file of a model folder
runs code: a folder without its tokenizer files, weights that do not fit the config, a pickle that runs code,
custom code, damaged files (tiny random BERTs, both the Encoder and the CrossEncoder)."""
from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_beir, run_module
from retrieval_lab.errors import ConfigError
from retrieval_lab.models.cross_encoder import CrossEncoder
from retrieval_lab.models.encoder import Encoder, load_tokenizer

MODELS = [Encoder, CrossEncoder]


def copy_model(tiny_model, folder, keep=None, weights: dict | None = None):
    """A copy of the tiny model folder (only the files in ``keep``), its weights replaced by ``weights``."""
    folder.mkdir(parents=True)
    for file in tiny_model.iterdir():
        if file.is_file() and (keep is None or file.name in keep):
            shutil.copy(file, folder / file.name)
    if weights is not None:
        save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


# ---- 1. a folder without its tokenizer files ----
@pytest.mark.parametrize("keep", [{"config.json", "model.safetensors"},
                                  {"config.json", "model.safetensors", "tokenizer_config.json",
                                   "special_tokens_map.json"}], ids=["weights-only", "tokenizer-config-only"])
@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_a_folder_without_its_tokenizer_files_is_refused(tiny_model, tmp_path, keep, model):
    """transformers would build a tokenizer of its 5 special tokens: every text encodes to [CLS] [UNK]... [SEP]."""
    folder = copy_model(tiny_model, tmp_path / "m", keep)
    if "special_tokens_map.json" in keep:  # transformers no longer writes one; older folders have it
        (folder / "special_tokens_map.json").write_text(json.dumps({"unk_token": "[UNK]", "cls_token": "[CLS]"}))
    with pytest.raises(ConfigError) as err:
        model(str(folder))
    assert str(err.value) == (f"model '{folder}' lacks the tokenizer files that fit it (tokenizer.json, vocab.txt or "
                              f"the like): the tokenizer found has 5 tokens, the config's vocab_size is 30522.")


def test_complete_folders_and_the_packaged_model_keep_their_tokenizer(tiny_model):
    assert len(load_tokenizer(str(tiny_model))) == len(load_tokenizer("packaged:minilm")) == 30522


def test_evaluation_of_a_folder_without_its_tokenizer_files_exits_with_one_sentence(tiny_model, tmp_path):
    """The entry point exits with status 2 and the sentence, and writes no metrics of a model that sees no text."""
    folder = copy_model(tiny_model, tmp_path / "m", {"config.json", "model.safetensors"})
    beir = make_beir(tmp_path / "beir", n_docs=20, n_train=4, n_test=4)
    result = run_module("retrieval_lab.evaluate", "data=beir", f"data.path={beir}", f"model.name_or_path={folder}",
                        f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == f"error: model '{folder}' lacks the tokenizer files that fit it " \
        "(tokenizer.json, vocab.txt or the like): the tokenizer found has 5 tokens, the config's vocab_size is 30522."
    assert not (tmp_path / "run" / "metrics.json").exists()


# ---- 2. weights that do not fit the architecture ----
def gpt2_weights() -> dict:
    from transformers import GPT2Config, GPT2Model

    model = GPT2Model(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=30522, n_positions=128))
    return {key: value.contiguous() for key, value in model.state_dict().items()}


WEIGHTS = {  # (weights from the tiny model's -> the folder's, how many encoder weights start at random, the first)
    "renamed": (lambda w: {f"encoder_model.{k}": v for k, v in w.items()}, 37, "embeddings.LayerNorm.bias"),
    "another-architecture": (lambda w: gpt2_weights(), 37, "embeddings.LayerNorm.bias"),
    "a-layer-missing": (lambda w: {k: v for k, v in w.items() if ".layer.1." not in k}, 16,
                        "encoder.layer.1.attention.output.LayerNorm.bias"),
    "another-shape": (lambda w: {**w, "embeddings.word_embeddings.weight": torch.zeros(30523, 32)}, 1,
                      "embeddings.word_embeddings.weight"),
}


@pytest.mark.parametrize("case", WEIGHTS)
@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_weights_that_do_not_fit_the_architecture_are_refused(tiny_model, tmp_path, case, model):
    change, count, first = WEIGHTS[case]
    folder = copy_model(tiny_model, tmp_path / "m", weights=change(load_file(str(tiny_model / "model.safetensors"))))
    with pytest.raises(ConfigError) as err:
        model(str(folder))
    prefix = "bert." if model is CrossEncoder else ""
    message = str(err.value)
    assert message.startswith(f"the weight files of model '{folder}' do not fit its config: {count} of the encoder's "
                              f"weights would start at random, missing from them or of another shape there "
                              f"({prefix}{first}"), message
    named = message[message.rindex("(") + 1:-2].split(", ")  # the first few, then "..."
    assert len(named) == min(count, 3) + (count > 3) and "pooler" not in message and "classifier" not in message


def saved_bi_encoder(tiny_model, folder):
    """A folder Encoder.save writes: no pooler weights."""
    Encoder(str(tiny_model)).save(folder)
    assert not any("pooler" in key for key in load_file(str(folder / "model.safetensors")))
    return folder


def test_the_weights_expected_to_be_new_still_load(tiny_model, tmp_path, capfd):
    """A folder without a pooler (dropped by the Encoder), a bi-encoder or base model warm-starting a cross-encoder
    (a new score head, said in one warning) and random_init models."""
    bi_encoder = saved_bi_encoder(tiny_model, tmp_path / "bi")
    assert Encoder(str(bi_encoder)).query_model.pooler is None
    capfd.readouterr()
    for name, head in ((tiny_model, "classifier.bias, classifier.weight"),
                       (bi_encoder, "bert.pooler.dense.bias, bert.pooler.dense.weight, classifier.bias, "
                                    "classifier.weight")):
        assert CrossEncoder(str(name)).random_head
        err = capfd.readouterr().err
        assert [line for line in err.splitlines() if line.startswith("warning:")] == [
            f"warning: model '{name}' has no score head that fits a cross-encoder: a new one starts at random "
            f"({head}), so its scores mean nothing until it is trained."]
        assert "MISSING" not in err
    cross = CrossEncoder(str(bi_encoder)).save(tmp_path / "ce")
    capfd.readouterr()
    assert not CrossEncoder(str(cross)).random_head
    assert "warning" not in capfd.readouterr().err
    # random_init reads the config only: weights that fit nothing do not matter
    unfit = copy_model(tiny_model, tmp_path / "unfit", weights={"x": torch.zeros(1)})
    for folder in (bi_encoder, unfit):
        assert Encoder(str(folder), random_init={"num_hidden_layers": 1}).query_model.config.num_hidden_layers == 1
        assert CrossEncoder(str(folder), random_init={"num_hidden_layers": 1}).random_head


# ---- 3. no file of a model folder runs code ----
class RunsCode:
    """Unpickling this runs a shell command that creates the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("write", ["torch.save", "pickle.dumps"])
@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_a_pickle_of_weights_that_would_run_code_is_refused_without_running_it(tiny_model, tmp_path, write, model):
    marker = tmp_path / "code-ran"
    folder = copy_model(tiny_model, tmp_path / "m", keep={"config.json", "tokenizer.json", "tokenizer_config.json"})
    payload = {**load_file(str(tiny_model / "model.safetensors")), "x": RunsCode(marker)}
    if write == "torch.save":
        torch.save(payload, folder / "pytorch_model.bin")
    else:
        (folder / "pytorch_model.bin").write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(ConfigError) as err:
        model(str(folder))
    assert str(err.value) == (f"the weights of model '{folder}' (a pickle, pytorch_model.bin) do not load as plain "
                              f"tensors, and anything else in a pickle could run code: save them as model.safetensors.")
    assert not marker.exists()


def test_a_pickle_of_plain_tensors_loads(tiny_model, tmp_path):
    folder = copy_model(tiny_model, tmp_path / "m", keep={"config.json", "tokenizer.json", "tokenizer_config.json"})
    torch.save(load_file(str(tiny_model / "model.safetensors")), folder / "pytorch_model.bin")
    expected = Encoder(str(tiny_model)).eval()
    loaded = Encoder(str(folder)).eval()
    with torch.no_grad():
        inputs = expected.tokenize(["protein cancer"], "doc")
        assert torch.equal(expected.encode_docs(inputs), loaded.encode_docs(inputs))


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_custom_code_in_a_model_folder_is_never_run(tiny_model, tmp_path, model):
    marker = tmp_path / "code-ran"
    folder = copy_model(tiny_model, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="custom_bert", auto_map={"AutoConfig": "custom.Config", "AutoModel": "custom.Model"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "custom.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    with pytest.raises(ConfigError) as err:
        model(str(folder))
    assert str(err.value) == (f"model '{folder}' needs custom code from its own files (auto_map in its config), "
                              f"which is never run.")
    assert not marker.exists()


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_damaged_weight_files_are_one_sentence(tiny_model, tmp_path, model):
    folder = copy_model(tiny_model, tmp_path / "m")
    (folder / "model.safetensors").write_bytes((tiny_model / "model.safetensors").read_bytes()[:100_000])
    with pytest.raises(ConfigError, match=rf"^the weight files of model '{folder}' could not be read as safetensors "
                                          r"\(.+\)\.$"):
        model(str(folder))


def test_a_saved_projection_is_read_as_safetensors_only(tiny_model, tmp_path):
    marker = tmp_path / "code-ran"
    Encoder(str(tiny_model), projection_dim=8).save(tmp_path / "m")
    dense = tmp_path / "m" / "2_Dense" / "model.safetensors"
    dense.write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(ConfigError, match=rf"^{dense} could not be read as safetensors \(.+\)\.$"):
        Encoder(str(tmp_path / "m"))
    assert not marker.exists()


@pytest.mark.parametrize("change,message", [
    ({"normalize": "yes"}, "normalize must be true or false or null, got 'yes'."),
    ({"shared_towers": 1}, "shared_towers must be true or false or null, got '1'."),
    ({"projection_dim": -8}, "projection_dim must be a positive whole number or null, got '-8'."),
    ({"doc_max_length": "abc"}, "doc_max_length must be a positive whole number or null, got 'abc'."),
    ({"query_max_length": 2.5}, "query_max_length must be a positive whole number or null, got '2.5'."),
    (None, "could not be read as JSON (Expecting value: line 1 column 1 (char 0))."),
], ids=["normalize", "shared_towers", "projection_dim", "doc_max_length", "query_max_length", "not-json"])
def test_a_malformed_saved_settings_file_is_one_sentence_naming_it(tiny_model, tmp_path, change, message):
    Encoder(str(tiny_model)).save(tmp_path / "m")
    file = tmp_path / "m" / "retrieval_lab.json"
    file.write_text("not json" if change is None else json.dumps({**json.loads(file.read_text()), **change}))
    with pytest.raises(ConfigError) as err:
        Encoder(str(tmp_path / "m"))
    assert str(err.value) == f"{file}{' ' if change is None else ': '}{message}"


@pytest.mark.parametrize("field,value", [("model_type", "no_such_type"), ("hidden_size", "abc")])
def test_a_config_json_with_a_wrong_field_is_one_sentence(field, value, tiny_model, tmp_path):
    folder = copy_model(tiny_model, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config[field] = value
    (folder / "config.json").write_text(json.dumps(config))
    for model in MODELS:
        with pytest.raises(ConfigError, match=rf"^could not load .*'{folder}': "):
            model(str(folder))
