"""The files that make a saved :class:`~retrieval_lab.models.colbert.ColBERT` folder load in PyLate
(``pylate.models.ColBERT(folder)``, lightonai/pylate) as the same model: the same token vectors for queries and
documents.

``write_pylate_files(folder, colbert)`` runs on a folder ``Encoder.save`` wrote for a ColBERT with symmetric towers.
It rewrites ``modules.json`` to PyLate's two modules, the Transformer (the folder itself) and ``pylate.models.Dense.Dense``
(the projection: ``2_Dense``, whose ``model.safetensors`` our loader also reads; its ``config.json`` gains PyLate's
``use_residual: false``), drops the ``1_Pooling`` and ``*_Normalize`` modules (PyLate loads none but
Transformer and Dense modules), and writes ``config_sentence_transformers.json`` with PyLate's ColBERT settings:

- ``query_prefix`` / ``document_prefix``: ``query_marker`` / ``doc_marker``. PyLate inserts the prefix's token id
  right after the first token ([CLS]), as ``ColBERT._with_marker`` does (``ColBERT.insert_prefix_token``).
- ``query_length`` / ``document_length``: ``query_max_length + 1`` / ``doc_max_length + 1``. PyLate truncates the
  text (with [CLS] and [SEP]) to that length minus one and then inserts the prefix; we truncate to
  ``*_max_length`` and then insert the marker: the same tokens.
- ``do_query_expansion``: ``augment`` (PyLate pads queries to ``query_length`` with [MASK], attention 0, and keeps a
  vector for every position; without it, only the attended tokens); ``attend_to_expansion_tokens``:
  ``attend_to_expansion`` (PyLate sets the whole query attention mask to 1).
- ``skiplist_words``: the punctuation characters whose token ids ColBERT drops from documents (``skip_ids``:
  ``string.punctuation`` less those the vocabulary lacks; [] without ``skip_punctuation``). PyLate maps each word
  to an id and drops those tokens from documents after encoding (they are attended); a character the vocabulary
  lacks would map to [UNK] there and drop every [UNK], which we do not, so such characters are left out of the
  list. With BERT's vocabulary (MiniLM's) the list is all of ``string.punctuation``.
- ``similarity_fn_name``: ``MaxSim``.

A ColBERT without a projection gets an identity ``1_Dense`` (hidden x hidden, no bias): PyLate adds a random
128-dimension projection to a folder without a Dense module.

What the files cannot express:

- Separate query and document towers: PyLate has one encoder; ``write_pylate_files`` refuses them.
- ``normalize: false``: PyLate's ``encode`` L2-normalises every token vector unless called with
  ``normalize_embeddings=False``; a warning says so.
- A text that contains a marker literally ("[unused0]"): PyLate adds the prefixes to the tokenizer
  (``add_tokens``), so there that text holds the marker token; our tokenizer splits it into "[", "unused", "##0", "]".

PyLate 1.6 loads under sentence-transformers 5 only (it pins 5.3.0; its ``ColBERT._load_sbert_model`` reads the
settings file): under sentence-transformers 6.3 ``pylate.models.ColBERT(folder)`` fails for any folder, its own saves
too (``KeyError: 'activation_function'`` in ``Dense.from_sentence_transformers``). Without the settings file PyLate
would use its "[Q] " / "[D] " prefixes, added to the vocabulary as new, random tokens, and lengths 32 / 180.

The Dense keeps its bias (``bias: true``; PyLate creates its own projections without one, but loads this one with
it). ``Encoder(folder)`` / ``ColBERT(name_or_path=folder)`` still loads the folder back: it reads
``retrieval_lab.json``, the model and tokenizer files and ``2_Dense/model.safetensors``, none of which change.
"""
from __future__ import annotations

import json
import shutil
import string
import warnings
from pathlib import Path

import torch

from retrieval_lab.errors import ConfigError

CONFIG = "config_sentence_transformers.json"
TRANSFORMER = "sentence_transformers.models.Transformer"
DENSE = "pylate.models.Dense.Dense"
IDENTITY = "torch.nn.modules.linear.Identity"
DROPPED = ("sentence_transformers.models.Pooling", "sentence_transformers.models.Normalize")


def skiplist_words(colbert) -> list[str]:
    """The punctuation characters whose token ids ``colbert`` drops from documents, in ``string.punctuation``'s
    order."""
    skipped = set(colbert.skip_ids.tolist())
    return [p for p in string.punctuation if colbert.tokenizer.convert_tokens_to_ids(p) in skipped]


def pylate_settings(colbert) -> dict:
    """PyLate's ColBERT settings (``config_sentence_transformers.json``) for ``colbert``."""
    return {"prompts": {"query": "", "document": ""}, "default_prompt_name": None,
            "similarity_fn_name": "MaxSim",
            "query_prefix": colbert.query_marker, "document_prefix": colbert.doc_marker,
            "query_length": colbert.query_max_length + 1,  # + the marker, as our query vectors count it
            "document_length": colbert.doc_max_length + 1,
            "attend_to_expansion_tokens": bool(colbert.augment and colbert.attend_to_expansion),
            "skiplist_words": skiplist_words(colbert),
            "do_query_expansion": bool(colbert.augment)}


def _versions() -> dict:
    import transformers

    # no "sentence_transformers" key: sentence-transformers warns when a folder names a newer one than it runs
    return {"transformers": transformers.__version__, "pytorch": torch.__version__}


def _drop_unused_modules(folder: Path) -> None:
    """Delete the module folders of the old ``modules.json`` that PyLate does not load (pooling, normalisation)."""
    modules = folder / "modules.json"
    if not modules.is_file():
        return
    for module in json.loads(modules.read_text()):
        path = module.get("path", "")
        target = (folder / path).resolve()
        if module.get("type") in DROPPED and path and target.parent == folder.resolve() and target.is_dir():
            shutil.rmtree(target)


def _write_dense(folder: Path, colbert) -> str:
    """The Dense module folder's name, its ``config.json`` written (and, without a projection, an identity's
    weights)."""
    hidden = colbert.query_model.config.hidden_size
    if colbert.projection is not None:
        name, bias, out = "2_Dense", colbert.projection.bias is not None, colbert.projection.out_features
        if not (folder / name / "model.safetensors").is_file():
            raise ConfigError(f"{folder / name / 'model.safetensors'} is missing: write_pylate_files runs on a folder "
                              f"Encoder.save wrote.")
    else:
        from safetensors.torch import save_file

        name, bias, out = "1_Dense", False, hidden
        (folder / name).mkdir(exist_ok=True)
        save_file({"linear.weight": torch.eye(hidden).contiguous()}, str(folder / name / "model.safetensors"))
    (folder / name / "config.json").write_text(json.dumps({
        "in_features": hidden, "out_features": out, "bias": bias, "activation_function": IDENTITY,
        "use_residual": False}, indent=4))
    return name


def write_pylate_files(folder: Path, colbert) -> None:
    """Make ``folder``, written by ``Encoder.save`` for ``colbert`` (symmetric towers), a PyLate ColBERT folder
    too (see the module docstring)."""
    folder = Path(folder)
    if colbert.doc_model is not None:
        raise ConfigError("PyLate holds one encoder for queries and documents: a ColBERT with separate towers "
                          "(model.shared_towers=false) cannot be saved as a PyLate folder.")
    if not colbert.normalize:
        warnings.warn("this ColBERT does not L2-normalise its vectors (model.normalize=false), which PyLate's folder "
                      "cannot say: call PyLate's encode with normalize_embeddings=False.", stacklevel=2)
    _drop_unused_modules(folder)
    dense = _write_dense(folder, colbert)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": TRANSFORMER},
        {"idx": 1, "name": "1", "path": dense, "type": DENSE}], indent=2))
    config_file = folder / CONFIG
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    config = {**config, "__version__": _versions(), **pylate_settings(colbert)}
    config_file.write_text(json.dumps(config, indent=2) + "\n")
