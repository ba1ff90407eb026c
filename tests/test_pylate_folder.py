"""The PyLate files ``write_pylate_files`` adds to a saved ColBERT folder; with PyLate installed (and the
sentence-transformers 5 it needs), PyLate loads the folder as the same model."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import string
import sys
import types

import pytest
import torch
from safetensors.torch import load_file

from retrieval_lab.errors import ConfigError
from retrieval_lab.models.colbert import ColBERT
from retrieval_lab.models.pylate_folder import write_pylate_files

QUERIES = ["what causes cancer?", "protein folding, misfolding & disease in the brain of older patients"]
SHORT = {"query_max_length": 16, "doc_max_length": 64}  # the tiny model has 128 positions
DOCS = ["Cancer is caused by mutations (changes) in genes that control cell growth.",
        "Proteins fold into 3-D shapes; misfolded proteins -- e.g. amyloid -- aggregate! " * 6]


def saved(model: ColBERT, folder):
    model.save(folder)
    write_pylate_files(folder, model)
    return folder


def read(folder, name):
    return json.loads((folder / name).read_text())


def test_files_for_the_defaults(tiny_model, tmp_path):
    model = ColBERT(name_or_path=str(tiny_model), **SHORT)
    folder = saved(model, tmp_path / "m")
    assert read(folder, "modules.json") == [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "2_Dense", "type": "pylate.models.Dense.Dense"}]
    assert not (folder / "1_Pooling").exists() and not (folder / "3_Normalize").exists()
    assert read(folder, "2_Dense/config.json") == {
        "in_features": 32, "out_features": 128, "bias": True,
        "activation_function": "torch.nn.modules.linear.Identity", "use_residual": False}
    assert sorted(load_file(str(folder / "2_Dense" / "model.safetensors"))) == ["linear.bias", "linear.weight"]
    config = read(folder, "config_sentence_transformers.json")
    assert {key: value for key, value in config.items() if key != "__version__"} == {
        "prompts": {"query": "", "document": ""}, "default_prompt_name": None, "similarity_fn_name": "MaxSim",
        "query_prefix": "[unused0]", "document_prefix": "[unused1]", "query_length": 17, "document_length": 65,
        "attend_to_expansion_tokens": False, "skiplist_words": list(string.punctuation),
        "do_query_expansion": True}
    assert "sentence_transformers" not in config["__version__"]


@pytest.mark.parametrize("settings, expected", [
    ({"augment": False, "attend_to_expansion": True},
     {"do_query_expansion": False, "attend_to_expansion_tokens": False}),
    ({"attend_to_expansion": True}, {"do_query_expansion": True, "attend_to_expansion_tokens": True}),
    ({"skip_punctuation": False, "query_max_length": 8, "doc_max_length": 20},
     {"skiplist_words": [], "query_length": 9, "document_length": 21}),
    ({"query_marker": "[unused5]", "doc_marker": "[unused6]"},
     {"query_prefix": "[unused5]", "document_prefix": "[unused6]"}),
])
def test_settings_follow_the_model(tiny_model, tmp_path, settings, expected):
    config = read(saved(ColBERT(name_or_path=str(tiny_model), **{**SHORT, **settings}), tmp_path / "m"),
                  "config_sentence_transformers.json")
    assert {key: config[key] for key in expected} == expected


def test_the_folder_still_loads_back_as_the_same_colbert(tiny_model, tmp_path):
    torch.manual_seed(0)
    model = ColBERT(name_or_path=str(tiny_model), attend_to_expansion=True, **SHORT).eval()
    folder = saved(model, tmp_path / "m")
    again = ColBERT(name_or_path=str(folder)).eval()
    assert again.attend_to_expansion and again.projection is not None
    with torch.no_grad():
        for side, texts, encode in (("query", QUERIES, "encode_queries"), ("doc", DOCS, "encode_docs")):
            a = getattr(model, encode)(model.tokenize(texts, side))
            b = getattr(again, encode)(again.tokenize(texts, side))
            assert torch.equal(a.mask, b.mask) and torch.allclose(a.vectors, b.vectors, atol=1e-6)
    write_pylate_files(folder, again)  # a second time changes nothing
    assert read(folder, "modules.json")[1]["path"] == "2_Dense"


def test_without_a_projection_an_identity_dense(tiny_model, tmp_path):
    model = ColBERT(name_or_path=str(tiny_model), **SHORT)
    model.projection = None
    folder = saved(model, tmp_path / "m")
    assert read(folder, "modules.json")[1]["path"] == "1_Dense"
    assert read(folder, "1_Dense/config.json")["out_features"] == 32
    assert torch.equal(load_file(str(folder / "1_Dense" / "model.safetensors"))["linear.weight"], torch.eye(32))


def test_separate_towers_are_refused_and_no_normalisation_warned(tiny_model, tmp_path):
    model = ColBERT(name_or_path=str(tiny_model), shared_towers=False, **SHORT)
    model.save(tmp_path / "a")
    with pytest.raises(ConfigError, match="separate towers"):
        write_pylate_files(tmp_path / "a", model)
    model = ColBERT(name_or_path=str(tiny_model), normalize=False, **SHORT)
    model.save(tmp_path / "b")
    with pytest.warns(UserWarning, match="normalize_embeddings=False"):
        write_pylate_files(tmp_path / "b", model)


def pylate_models():
    pytest.importorskip("pylate")
    sentence_transformers = pytest.importorskip("sentence_transformers")
    if not sentence_transformers.__version__.startswith("5."):
        pytest.skip(f"PyLate loads under sentence-transformers 5 only, not {sentence_transformers.__version__}")
    if "datasets" not in sys.modules and importlib.util.find_spec("datasets") is None:
        stub = types.ModuleType("datasets")  # pylate.utils imports it; loading and encoding never use it
        stub.__spec__ = importlib.machinery.ModuleSpec("datasets", None)
        stub.Dataset, stub.DatasetDict = type("Dataset", (), {}), type("DatasetDict", (dict,), {})
        sys.modules["datasets"] = stub
    from pylate import models

    return models


@pytest.mark.parametrize("settings", [{}, {"augment": False}, {"attend_to_expansion": True, "doc_max_length": 16}])
def test_pylate_loads_the_same_model(tiny_model, tmp_path, settings):
    models = pylate_models()
    torch.manual_seed(0)
    ours = ColBERT(name_or_path=str(tiny_model), **{**SHORT, **settings}).eval()
    theirs = models.ColBERT(str(saved(ours, tmp_path / "m")), device="cpu")
    for side, texts, encode in (("query", QUERIES, "encode_queries"), ("doc", DOCS, "encode_docs")):
        with torch.no_grad():
            encoded = getattr(ours, encode)(ours.tokenize(texts, side))
        expected = [v[m] for v, m in zip(encoded.vectors, encoded.mask)]
        got = theirs.encode(texts, is_query=side == "query", convert_to_tensor=True)
        assert [len(v) for v in got] == [len(v) for v in expected]
        for a, b in zip(expected, got):
            assert torch.allclose(a, torch.as_tensor(b), atol=1e-5)
