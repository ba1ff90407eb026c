"""One LightningDataModule for every training method: it batches (query, document group) examples."""
from __future__ import annotations

import hashlib

import lightning as L
import torch
from torch.utils.data import DataLoader

from retrieval_lab.data.sampling import EpochSampler
from retrieval_lab.errors import ConfigError
from retrieval_lab.losses.scores import FalseNegatives
from retrieval_lab.tokenization import machine_cores, tokenize_padded


def false_negatives(doc_ids: list[str], positives: list[list[str]], group: int) -> FalseNegatives:
    """The pairs (query i, column j) where column j holds a judged positive of query i other than its own target
    column i*G (the true entries of the B x B*G mask). Built from the columns of each document id, in time linear
    in the batch (a global batch under DDP is built in every step)."""
    columns: dict[str, list[int]] = {}
    for j, doc in enumerate(doc_ids):
        columns.setdefault(doc, []).append(j)
    hits = [(i, j) for i, pos in enumerate(positives) for p in set(pos) for j in columns.get(p, ()) if j != i * group]
    query, column = zip(*hits) if hits else ((), ())
    return FalseNegatives(torch.tensor(query, dtype=torch.long), torch.tensor(column, dtype=torch.long),
                          (len(positives), len(doc_ids)))


class GroupCollator:
    """Tokenise a list of examples into the batch layout of DESIGN.md.

    ``mask`` (:class:`FalseNegatives`) holds the pairs (i, j) where document column j is a judged positive of query i
    other than its own target column i*G (the same abstract can be the positive of several queries): such columns
    are no negatives.
    ``doc_keys`` (B*G) and ``positive_keys`` (B x P, padded with -1) hold the integer identities
    (:meth:`doc_key`) of the document columns and of each query's judged positives, for masks beyond the batch
    (MoCo's queue of past keys).
    ``teacher`` (B x G) holds the examples' teacher scores when they carry some. With ``pair_tokenizer``
    ((tokenizer, max length) of a cross-encoder), ``pairs`` holds ``[CLS] query [SEP] doc [SEP]`` for every
    group entry in the same order as ``docs``; ``tokenizer=None`` skips the bi-encoder's query/doc inputs.
    """

    def __init__(self, tokenizer, query_max_length: int, doc_max_length: int, pair_tokenizer=None):
        self.tokenizer, self.query_max_length, self.doc_max_length = tokenizer, query_max_length, doc_max_length
        self.pair_tokenizer = pair_tokenizer

    @staticmethod
    def doc_key(doc_id: str) -> int:
        """A document's integer identity, the same in every process and run (Python's ``hash`` of a str is not):
        its 8-byte blake2b digest as a non-negative int64, so that -1 names no document."""
        return int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "big") >> 1

    def _tokenize(self, texts, max_length):
        return tokenize_padded(self.tokenizer, texts, max_length)

    def __call__(self, examples: list[dict]) -> dict:
        group = len(examples[0]["docs"])
        doc_ids = [d for ex in examples for d in ex["doc_ids"]]
        positives = [sorted(ex["positives"]) for ex in examples]
        batch = {"mask": false_negatives(doc_ids, positives, group), "qids": [ex["qid"] for ex in examples],
                 "doc_ids": doc_ids, "positives": positives,
                 "doc_keys": torch.tensor([self.doc_key(d) for d in doc_ids], dtype=torch.long)}
        keys = [[self.doc_key(d) for d in pos] for pos in positives]
        width = max(1, *map(len, keys))
        batch["positive_keys"] = torch.tensor([k + [-1] * (width - len(k)) for k in keys], dtype=torch.long)
        if self.tokenizer is not None:
            batch["query"] = self._tokenize([ex["query"] for ex in examples], self.query_max_length)
            batch["docs"] = self._tokenize([t for ex in examples for t in ex["docs"]], self.doc_max_length)
        if "teacher" in examples[0]:
            batch["teacher"] = torch.tensor([ex["teacher"] for ex in examples], dtype=torch.float32)
        if self.pair_tokenizer is not None:
            tokenizer, max_length = self.pair_tokenizer
            batch["pairs"] = tokenizer([ex["query"] for ex in examples for _ in ex["docs"]],
                                       [t for ex in examples for t in ex["docs"]], padding=True,
                                       truncation="only_second", max_length=max_length, return_tensors="pt")
        return batch


class RetrievalDataModule(L.LightningDataModule):
    """``batch_sampler`` (e.g. TAS's ClusterBatchSampler) replaces the default shuffled batches."""

    def __init__(self, train_set, collator: GroupCollator, batch_size: int = 32, num_workers: int = 0,
                 seed: int = 0, batch_sampler=None):
        super().__init__()
        self.train_set, self.collator, self.batch_size, self.num_workers = train_set, collator, batch_size, num_workers
        self.sampler = EpochSampler(train_set, seed)
        self.batch_sampler = batch_sampler

    def setup(self, stage: str) -> None:
        """Lightning calls this in every process once the process group exists: TAS batches follow process 0's
        clusters (see ``ClusterBatchSampler.take_first_process_clusters``)."""
        sampler, trainer = self.batch_sampler, self.trainer
        if hasattr(sampler, "take_first_process_clusters") and trainer is not None and trainer.world_size > 1:
            sampler.take_first_process_clusters(trainer.strategy.broadcast(sampler.clusters.tolist(), src=0))

    def skip_batches(self, count: int) -> None:
        """Leave out the first ``count`` batches of the next epoch (they were trained on before a resume)."""
        if self.batch_sampler is not None:
            self.batch_sampler.skip = count
        else:
            self.sampler.skip = count * self.batch_size

    def batches_per_epoch(self) -> int:
        """This process's batches in an epoch (the loader's length), known without building the loader."""
        return len(self.batch_sampler) if self.batch_sampler is not None else len(self.sampler) // self.batch_size

    def resume_position(self) -> None:
        """Put the sampler (and the dataset's epoch) where the trainer stands: a resumed run goes on in its epoch's
        order, past the batches already trained on. Done when Lightning asks for the loader, after it restored the
        checkpoint: it starts the loader's workers at once (they draw the order and copy the dataset), before
        any epoch-start hook; so nothing may ask for it earlier (``BiEncoderModule.configure_optimizers`` counts
        the run's steps with ``batches_per_epoch``). (Assumes one optimiser step per batch.)"""
        trainer = self.trainer
        if trainer is None or not getattr(trainer, "global_step", 0):
            return
        batches = self.batches_per_epoch()
        epoch, done = divmod(trainer.global_step, batches) if batches else (0, 0)
        (self.batch_sampler.sampler if self.batch_sampler is not None else self.sampler).set_epoch(epoch)
        self.skip_batches(done)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        connector = getattr(trainer, "_accelerator_connector", None)
        if trainer is not None and trainer.world_size > 1 and getattr(connector, "use_distributed_sampler", False):
            raise ConfigError("training under DDP needs Trainer(use_distributed_sampler=False) (trainer."
                              "use_distributed_sampler=false): the samplers share the examples out themselves.")
        self.resume_position()
        if self.batch_sampler is not None:
            return DataLoader(self.train_set, batch_sampler=self.batch_sampler, collate_fn=self.collator,
                              num_workers=self.num_workers)
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=self.sampler, drop_last=True,
                          collate_fn=self.collator, num_workers=self.num_workers)


def data_workers(cfg, may_use_workers: bool = True) -> int:
    """``num_workers``, where ``auto`` is 0 on a CPU and where the negative strategy may not use workers (ANCE: a
    worker would see a refresh only from the next epoch on), else up to 8 per GPU and never more than half the CPU
    cores this process may run on. On an H200 at batch 512 the data pipeline made 0.82x the pairs/s of the training
    step with 0 workers, so the two took turns at about 3,450 pairs/s; with 4 workers it made 1.27x, with 8, 2.88x."""
    if cfg.num_workers != "auto":
        if not isinstance(cfg.num_workers, int) or cfg.num_workers < 0:
            raise ConfigError(f"num_workers must be auto or a whole number of 0 or more, got '{cfg.num_workers}'.")
        return cfg.num_workers
    on_cpu = cfg.trainer.get("accelerator") == "cpu" or not torch.cuda.is_available()
    if on_cpu or not may_use_workers:
        return 0
    devices = cfg.trainer.get("devices")
    gpus = devices if isinstance(devices, int) and devices > 0 else torch.cuda.device_count()
    return max(1, min(8, machine_cores() // (2 * max(1, gpus))))


def build_datamodule(cfg, dataset, module, strategy):
    """The training set the config asks for (``cfg.pairs`` with the negative ``strategy``'s extras and batch
    sampler), batched as ``module`` needs it; and the dev qrels for validation."""
    from hydra.utils import get_class, instantiate

    from retrieval_lab.data.beir import carve_dev

    encoder = module.encoder
    carve = cfg.validation.enabled and not cfg.data.dev_split  # the dev queries come out of the training qrels
    labels = get_class(cfg.pairs._target_).needs_qrels or strategy.file
    train_qrels = dataset.qrels(cfg.data.train_split, reachable_only=True) if labels or carve else None
    dev_qrels = None
    extras = strategy.dataset_extras(dataset, train_qrels)
    if module.loss is not None and "teacher" in module.loss.needs and "teacher" not in module.provides:
        extras["teacher"] = True
    if cfg.data.dev_split:
        dev_qrels = dataset.qrels(cfg.data.dev_split)
    elif carve:
        train_qrels, dev_qrels = carve_dev(train_qrels, cfg.data.dev_fraction, cfg.data.split_seed)
    train_set = instantiate(cfg.pairs)(dataset=dataset, qrels=train_qrels, group_size=strategy.group_size,
                                       seed=cfg.seed, **extras)
    if getattr(train_set, "skipped", 0):
        print(f"{train_set.skipped} training queries have no teacher score for a positive or for any negative in "
              f"{strategy.file}; training on the other {len(train_set)}.")
    batch_sampler = strategy.batch_sampler(train_set, encoder, cfg.batch_size, cfg.seed)
    collator = GroupCollator(encoder.tokenizer if module.uses_towers else None,
                             getattr(encoder, "query_max_length", None), getattr(encoder, "doc_max_length", None),
                             module.pair_tokenizer)
    datamodule = RetrievalDataModule(train_set, collator, cfg.batch_size, data_workers(cfg, strategy.uses_workers),
                                     cfg.seed, batch_sampler)
    return datamodule, dev_qrels
