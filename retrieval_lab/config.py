"""Config helpers: OmegaConf resolvers, start-up checks of impossible combinations, run metadata."""
from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from retrieval_lab.errors import ConfigError, warn


def _precision() -> str:
    import torch

    if not torch.cuda.is_available():
        return "32-true"
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"  # 16-mixed uses a loss scaler


OmegaConf.register_new_resolver("auto_precision", _precision, replace=True)
# run folders are <time>_<process id>: two runs started in the same second on one machine never share a folder.
# Cached like Hydra's ${now:}: the jobs of a sweep in worker processes (joblib, submitit) keep the sweep's name.
OmegaConf.register_new_resolver("pid", lambda: str(os.getpid()), replace=True, use_cache=True)
for _noisy in ("faiss.loader", "bm25s"):  # Hydra logs at INFO; these would print their internals
    logging.getLogger(_noisy).setLevel(logging.WARNING)


def require(cfg: DictConfig, key: str, ok: bool, why: str) -> None:
    if not ok:
        value = OmegaConf.select(cfg, key)
        value = value.get("_target_", "").rsplit(".", 1)[-1] if isinstance(value, DictConfig) else value
        raise ConfigError(f"{key}={value} {why}")


def check_all_set(cfg: DictConfig) -> None:
    """Refuse a config with a mandatory key left unset (``???``, e.g. model=hf without a name), naming the key."""
    for key in sorted(OmegaConf.missing_keys(cfg)):
        raise ConfigError(f"config key {key} must be set ({key}=...).")


_ABSENT = object()


def check_kinds(cfg: DictConfig, whole=(), optional_whole=(), numbers=()) -> None:
    """Refuse a value of the wrong kind (a word where a number goes, 2.5 for a count) in one sentence, before a
    comparison with it raises a TypeError. Keys the config does not have are skipped."""
    def is_whole(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    for keys, ok, kind in ((whole, is_whole, "a whole number"),
                           (optional_whole, lambda v: v is None or is_whole(v), "a whole number (or null)"),
                           (numbers, lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number")):
        for key in keys:
            value = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False)
            if value is not _ABSENT and not ok(value):
                raise ConfigError(f"{key}={value} must be {kind}.")


def check_search(cfg: DictConfig, k_key: str, metrics_key: str, sample_key: str | None = None) -> None:
    """The depth of a search and its corpus sample: ``k`` of at least 1 and at least every metric's cutoff (recall@100
    on 10 documents would be another measure under the same name); a sample of at least 1 document."""
    import re

    k, metrics = OmegaConf.select(cfg, k_key), OmegaConf.select(cfg, metrics_key)
    require(cfg, k_key, k >= 1, "must be at least 1.")
    for metric in metrics:
        cutoff = re.search(r"@(\d+)$", str(metric))
        require(cfg, k_key, cutoff is None or k >= int(cutoff.group(1)),
                f"retrieves fewer documents than {metric} looks at; raise {k_key} or drop {metric} from {metrics_key}.")
    if sample_key is not None:
        sample = OmegaConf.select(cfg, sample_key)
        require(cfg, sample_key, sample is None or sample >= 1, "must be a number of documents (or null: all).")


def accepted_settings(target: str) -> set[str] | None:
    """The keyword arguments a config block's ``_target_`` takes; None when it takes any (``**kwargs`` that reach
    no explicit signature). A subclass's ``**kwargs`` are followed into its parents' ``__init__``."""
    import inspect

    from hydra.utils import get_object

    try:
        obj = get_object(target)
    except Exception:  # noqa: BLE001 - Hydra raises its own error, naming the target, when it instantiates
        return None
    names: set[str] = set()
    for fn in [c.__init__ for c in obj.__mro__ if c is not object] if inspect.isclass(obj) else [obj]:
        try:
            params = inspect.signature(fn).parameters.values()
        except (TypeError, ValueError):
            return None
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            return names
    return None


# keys of a config block with a _target_ that our code takes out before instantiating it
CONSUMED = {"trainer": {"grad_cache_chunk"}}


def check_targets(cfg: DictConfig, prefix: str = "") -> None:
    """Refuse a key that the block's ``_target_`` does not take (``+loss.temprature=0.1``: Hydra accepts an added key,
    and the constructor would refuse it only once the run has set up), naming the key and the nearest setting."""
    import difflib

    if "_target_" in cfg:
        accepted = accepted_settings(cfg._target_)
        if accepted is not None:
            for key in cfg:
                if key.startswith("_") or key in accepted or key in CONSUMED.get(prefix.rstrip("."), ()):
                    continue
                near = difflib.get_close_matches(key, sorted(accepted), n=1)
                name = cfg._target_.rsplit(".", 1)[-1]
                listed = f"its settings: {', '.join(sorted(accepted))}" if len(accepted) <= 12 else \
                    f"see {name}'s documentation for its {len(accepted)} settings"
                raise ConfigError(f"{prefix}{key} is not a setting of {name} ("
                                  f"{f'did you mean {prefix}{near[0]}? ' if near else ''}{listed}).")
    for key in cfg:
        value = cfg._get_node(key)
        if isinstance(value, DictConfig) and not value._is_missing() and not value._is_none():
            check_targets(value, f"{prefix}{key}.")


def check_train_config(cfg: DictConfig) -> None:
    """Refuse, with one sentence, the settings that cannot work together."""
    check_targets(cfg)
    for key in ("data.path", "model.name_or_path", "batch_size", "optim.lr"):
        if OmegaConf.select(cfg, key, throw_on_missing=False) is None:
            raise ConfigError(f"config key {key} must be set.")
    check_kinds(cfg, whole=("seed", "data.split_seed", "batch_size", "negatives.group_size", "checkpoint.keep",
                            "eval.k", "eval.batch_size"),
                optional_whole=("eval.corpus_sample", "validation.corpus_sample", "negatives.clusters",
                                "negatives.clusters_per_batch", "negatives.module.queue_size", "negatives.balanced_bins"),
                numbers=("optim.lr", "optim.weight_decay", "optim.warmup_ratio", "loss.temperature", "loss.scale",
                         "loss.alpha", "loss.teacher_temperature", "data.dev_fraction", "negatives.module.momentum"))
    check_search(cfg, "eval.k", "eval.metrics", "eval.corpus_sample")
    require(cfg, "validation.corpus_sample", cfg.validation.corpus_sample is None or cfg.validation.corpus_sample >= 1,
            "must be a number of documents (or null: all).")
    group = cfg.negatives.group_size
    require(cfg, "batch_size", cfg.batch_size >= 1, "must be at least 1.")
    require(cfg, "batch_size", group > 1 or cfg.batch_size >= 2,
            "leaves no negative: in-batch negatives need batch_size >= 2 (or a negatives group with group_size > 1).")
    require(cfg, "optim.lr", cfg.optim.lr > 0, "must be positive.")
    require(cfg, "optim.warmup_ratio", 0 <= cfg.optim.warmup_ratio < 1, "must lie in [0, 1).")
    require(cfg, "negatives.group_size", group >= 1, "must be at least 1.")
    require(cfg, "checkpoint.keep", cfg.checkpoint.keep >= 0, "must be 0 or more.")
    require(cfg, "logger.wandb.mode", cfg.logger.wandb.mode in ("offline", "online", "disabled"),
            "is not offline, online or disabled.")
    every = cfg.checkpoint.every_n_steps
    require(cfg, "checkpoint.every_n_steps", every is None or (isinstance(every, int) and every >= 0),
            "must be 0 (epoch ends only) or more.")
    chunk = cfg.trainer.get("grad_cache_chunk")
    require(cfg, "trainer.grad_cache_chunk", chunk is None or (isinstance(chunk, int) and chunk >= 1),
            "must be a positive number of rows (or null for no gradient caching).")
    accumulate = cfg.trainer.get("accumulate_grad_batches", 1)
    require(cfg, "trainer.accumulate_grad_batches", accumulate in (1, None),
            "is not supported: each accumulated batch would be its own softmax (no larger pool of negatives), "
            "MoCo would enqueue one batch's keys in N and resuming assumes one step per batch; use "
            "trainer.grad_cache_chunk for batches larger than memory allows.")
    epochs, steps = cfg.trainer.max_epochs, cfg.trainer.max_steps
    for key, value in (("trainer.max_epochs", epochs), ("trainer.max_steps", steps)):
        require(cfg, key, value is None or isinstance(value, int), "must be a whole number (or null).")
    require(cfg, "trainer.max_epochs", (epochs or 0) >= 1 or (steps or 0) > 0,
            "leaves nothing to train (set trainer.max_epochs >= 1 or trainer.max_steps > 0).")
    require(cfg, "trainer.max_steps", steps != 0, "trains nothing, so the pretrained weights would be saved and "
            "reported as the trained model (set trainer.max_steps > 0, or -1 for no step limit).")
    limit = cfg.trainer.get("limit_train_batches")
    require(cfg, "trainer.limit_train_batches", limit is None or (not isinstance(limit, bool) and
            isinstance(limit, (int, float)) and limit > 0), "trains on no batch (a fraction in (0, 1], a number of "
            "batches, or null for all).")
    if cfg.validation.enabled:
        require(cfg, "validation.every_n_epochs", isinstance(cfg.validation.every_n_epochs, int)
                and cfg.validation.every_n_epochs >= 1, "must be 1 or more (or validation.enabled=false).")
        every = cfg.validation.get("every_n_steps")
        require(cfg, "validation.every_n_steps", every is None or (isinstance(every, int) and every >= 1),
                "must be 1 or more (or null).")
    get_class(cfg.model._target_).check_index(cfg.eval.index, cfg.eval.get("index_settings"), "eval.index")
    from retrieval_lab.retrieval.metrics import check_metrics

    check_metrics(cfg.eval.metrics)
    check_declarations(cfg)
    if cfg.data.get("dev_split"):
        require(cfg, "data.dev_split", cfg.data.dev_split not in (cfg.data.train_split, cfg.eval.split),
                "is also the training or the test split: validation would measure what training sees or tunes on "
                "the test queries.")
    if cfg.data.get("dev_split") is None and cfg.validation.enabled:
        require(cfg, "data.dev_fraction", 0 < cfg.data.dev_fraction < 1,
                "must lie strictly between 0 and 1 to carve a dev split (or set validation.enabled=false).")


def build(node: DictConfig):
    """``instantiate(node)``, a ConfigError of the class's own checks raised as it is (not wrapped by Hydra)."""
    from hydra.utils import instantiate

    from retrieval_lab.errors import find_user_error

    try:
        return instantiate(node)
    except Exception as err:  # noqa: BLE001 - re-raised unless a sentence of ours is behind it
        found = find_user_error(err)
        if found is None:
            raise
        raise found from None


def module_config(cfg: DictConfig) -> DictConfig:
    """The LightningModule's config: ``module`` (conf/module/*) where set, else the negative strategy's."""
    return cfg.module if cfg.get("module") else cfg.negatives.module


def check_declarations(cfg: DictConfig) -> None:
    """The cross-cutting checks, read from what each part declares: the loss (an instance: its blocks and needs
    follow its settings), the negative strategy (an instance), the module class, the model family's class (not
    instantiated: that would load weights) and the pairs class."""
    from retrieval_lab.models.family import REPRESENTATIONS

    loss, strategy = build(cfg.loss), build(cfg.negatives)
    module, family, pairs = (get_class(module_config(cfg)._target_), get_class(cfg.model._target_),
                             get_class(cfg.pairs._target_))
    strategy.check(cfg, loss, module, family)
    if strategy.file and not pairs.takes_negatives:
        raise ConfigError(f"pairs={pairs.__name__} cannot use a mined negatives file: only pairs=supervised draws "
                          "its negatives from one.")
    kept = sorted(strategy.needs - module.provides - REPRESENTATIONS)  # what its module must keep
    if kept:
        raise ConfigError(f"negatives={strategy.option} cannot be used with module={module.__name__}: "
                          f"{strategy.why.get(kept[0], f'that module does not provide its {kept[0]}.')}")
    representation = family.doc_representation
    wanted = strategy.needs & REPRESENTATIONS
    if wanted and representation not in wanted:
        why = strategy.why.get(next(iter(sorted(wanted))), "")
        if module.fixed_negatives:
            raise ConfigError(f"module={module.option} trains on fixed negatives files (negatives=bm25): {why}")
        raise ConfigError(f"negatives={strategy.option} cannot be used with model={family.__name__} "
                          f"(doc_representation '{representation}'): {why}")
    if representation not in module.families:
        if "pairs" in (representation, *module.families):
            raise ConfigError("a cross-encoder is trained with module=cross_encoder (which sets model=cross_encoder); "
                              "the other modules train a bi-encoder model.")
        raise ConfigError(f"module={module.__name__} cannot train model={family.__name__}: it trains model "
                          f"families whose doc_representation is {' or '.join(sorted(module.families))}, not "
                          f"'{representation}'.")
    loss_name = f"loss={type(loss).__name__}"
    wanted = getattr(family, "temperature", None)
    if wanted and isinstance(getattr(loss, "temperature", None), (int, float)) and loss.temperature < wanted / 4:
        warn(f"model={family.__name__}'s scores want loss.temperature={wanted:g} or so: at loss.temperature="
             f"{loss.temperature:g} the logits are {wanted / loss.temperature:g} times larger, and the softmax is "
             f"nearly one-hot.")
    if not module.takes_loss and not isinstance(loss, module.ignored_loss):
        raise ConfigError(f"module={module.option} trains with a fixed objective (cross-entropy over each group): "
                          f"{loss_name} would be ignored; leave loss at its default.")
    given = strategy.provides | module.provides
    if module.needs - strategy.provides:
        raise ConfigError(strategy.refusal(f"module={module.option}", module.needs - strategy.provides))
    if not module.takes_loss:
        return
    if module.loss_needs - loss.needs:
        raise ConfigError(module.loss_refusal)
    unread = loss.blocks - family.blocks
    if unread:
        block = sorted(unread)[0]
        setting = loss.setting_for(block)
        raise ConfigError(f"{loss_name}{f' with {setting}' if setting else ''} reads the {block} scores, which "
                          f"model={family.__name__} does not compute (it computes {', '.join(sorted(family.blocks))}).")
    if loss.needs - given:
        raise ConfigError(strategy.refusal(loss_name, loss.needs - given))
    if "queue" in strategy.provides and "queue" not in loss.blocks:
        raise ConfigError(f"negatives={strategy.option} gives the loss a queue of momentum keys as negatives, which "
                          f"{loss_name} does not read: the queue would be ignored (use negatives=inbatch or bm25).")


def _not_litlogger_tip(record) -> bool:
    return "litlogger" not in record.getMessage()


def quiet_library_notices() -> None:
    """Leave out of an entry point's output what does not concern its user: Lightning's advertisement for its logging
    service, a deprecation inside Lightning, a cast warning inside ranx's compiled metrics, and Lightning's advice for
    a run shorter than its logging interval (``BiEncoderModule.on_train_start`` logs such a run's last step)."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    warnings.filterwarnings("ignore", message="unsafe cast from uint64 to int64")
    warnings.filterwarnings("ignore", message=r"The number of training batches .* is smaller than the logging interval")
    for handler in logging.getLogger("lightning.pytorch").handlers:
        if _not_litlogger_tip not in handler.filters:  # once, though every job of a sweep calls this
            handler.addFilter(_not_litlogger_tip)


def git_commit() -> dict:
    """The commit of the code that ran, and whether the work tree had uncommitted changes."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
