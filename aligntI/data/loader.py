"""Build the DataLoaders of one rank from the recipe's ``data`` section.

Before the first batch every record the loader will read is checked (:func:`check_records`: JSON, conversation,
image file and header). The ranks share the work and agree on the outcome, so bad data fails at start-up with
the same error on every rank, not hours in on one. What only decoding the pixels or tokenising can show is
found in a DataLoader worker: the :class:`DataError` travels to the trainer as a batch and is raised there
whole, because raised inside a worker torch would re-raise it as a RuntimeError around the worker's traceback.
"""

from __future__ import annotations

import os
import signal

import jinja2
import numpy as np
import torch.utils.data

from aligntI.config import ConfigError, DataConfig
from aligntI.data.dataset import Collator, LlavaDataset, check_sample, image_shape
from aligntI.data.formatting import ConversationEncoder, load_chat_template
from aligntI.data.records import DataError, MixedRecords, RecordSource, ShardedResumableSampler
from aligntI.models.loading import ModelDirError, num_image_tokens


def build_encoder(processor, data: DataConfig) -> ConversationEncoder:
    try:
        template = load_chat_template(data.chat_template) if data.chat_template else processor.chat_template
    except ConfigError as err:
        raise ConfigError(f"data.chat_template: {err}") from None
    if not template:
        raise ConfigError("data.chat_template: not set, and the processor has no chat template of its own")
    encoder = ConversationEncoder(
        tokenizer=processor.tokenizer,
        chat_template=template,
        image_token=processor.image_token,
        image_token_id=processor.image_token_id,
        num_image_tokens=num_image_tokens(processor),
        max_length=data.max_length,
    )
    try:  # a template that does not compile would otherwise fail in every DataLoader worker
        encoder.render([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    except jinja2.TemplateError as err:
        which = f"data.chat_template {data.chat_template!r}" if data.chat_template else "the processor's chat template"
        raise ConfigError(f"{which} cannot be rendered: {type(err).__name__}: {err}") from err
    return encoder


def build_collator(processor, encoder: ConversationEncoder, padding_side: str) -> Collator:
    pad = processor.tokenizer.pad_token_id
    if pad is None:
        raise ModelDirError(f"{processor.tokenizer.name_or_path}: the tokenizer has no pad token; set one in the "
                            "model directory's tokenizer config")
    return Collator(pad, encoder.image_token_id, encoder.num_image_tokens,
                    image_shape(processor.image_processor), padding_side)


def build_records(data: DataConfig, seed: int) -> MixedRecords:
    sources = [RecordSource(s.path, s.images, s.max_samples, data.allow_images_outside) for s in data.train]
    return MixedRecords(sources, [s.weight for s in data.train], seed)


def check_records(records: MixedRecords, gids, on_bad_sample: str, rank: int) -> None:
    """Check records ``gids`` (this rank's share) before the first batch; the verdict is merged over ranks.

    ``error``: every rank raises the same :class:`DataError`, the first bad record by file and number.
    ``skip``: rank 0 reports how many records of each file are bad (each is skipped, and counted, when drawn);
    a file none of whose checked records is usable is an error.
    """
    n = len(records.sources)
    checked, bad, first = [0] * n, [0] * n, [None] * n
    for gid in gids:
        k = records.source_index(int(gid))
        checked[k] += 1
        try:
            check_sample(*records.locate(int(gid)))
        except DataError as err:
            bad[k] += 1
            if first[k] is None:
                first[k] = err
            if on_bad_sample == "error":
                break
    parts = _from_every_rank((checked, bad, first))
    for k, source in enumerate(records.sources):
        n_checked, n_bad = sum(p[0][k] for p in parts), sum(p[1][k] for p in parts)
        found = [p[2][k] for p in parts if p[2][k] is not None]
        if not found:
            continue
        err = min(found, key=lambda e: e.record)
        if on_bad_sample == "error":
            raise err
        if n_bad == n_checked:
            raise DataError(source.path, f"none of its {n_checked} records can be used (on_bad_sample: skip); "
                                         f"the first: {_without_file(err)}")
        if rank == 0:
            print(f"[aligntI] data: {source.path}: {n_bad} of {n_checked} records are bad and are skipped when "
                  f"drawn (on_bad_sample: skip); the first: {_without_file(err)}", flush=True)


def _without_file(err: DataError) -> str:
    return str(err).removeprefix(f"{err.file}: ")


def _from_every_rank(obj) -> list:
    """``obj`` of every rank, in rank order; just this one's outside a process group."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    parts = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, obj)
    return parts


class _ErrorsAsItems(torch.utils.data.Dataset):
    """Returns a sample's :class:`DataError` instead of raising it, so that it leaves a worker intact."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        try:
            return self.dataset[i]
        except DataError as err:
            return err


class _CollateOrError:
    """The batch, or the first :class:`DataError` among its items."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, items: list):
        errors = [it for it in items if isinstance(it, DataError)]
        return errors[0] if errors else self.collate(items)


class RaisingLoader:
    """A DataLoader over :class:`_ErrorsAsItems` that raises, in this process, the DataError a batch carries."""

    def __init__(self, loader: torch.utils.data.DataLoader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            if isinstance(batch, DataError):
                raise batch
            yield batch


def leave_signals_to_the_trainer(worker_id: int) -> None:
    """A DataLoader worker's signals. Ctrl-C reaches every process of the terminal's group, and launchers and
    SLURM signal whole process trees, while the trainer finishes its step before it stops
    (aligntI/training/interrupts.py). A worker killed by a signal makes torch raise in the trainer at once, so:
    SIGINT is ignored; SIGTERM (also how the loader itself stops a worker that does not end in time) ends the
    worker with status 0, which torch does not treat as a failure."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0))


def build_train_loader(processor, data: DataConfig, *, seed: int, rank: int, world_size: int,
                       micro_batch_size: int, global_batch_size: int, start_sample: int = 0):
    """Returns ``(loader, sampler)``; the loader is endless and starts after ``start_sample`` of this rank."""
    encoder = build_encoder(processor, data)
    records = build_records(data, seed)
    check_records(records, range(rank, len(records), world_size), data.on_bad_sample, rank)
    dataset = LlavaDataset(records, encoder, processor.image_processor, data.on_bad_sample)
    sampler = ShardedResumableSampler(records, rank, world_size, global_batch_size, start_sample)
    loader = torch.utils.data.DataLoader(
        _ErrorsAsItems(dataset),
        batch_size=micro_batch_size,
        sampler=sampler,
        num_workers=data.num_workers,
        collate_fn=_CollateOrError(build_collator(processor, encoder, data.padding_side)),
        persistent_workers=data.num_workers > 0,
        prefetch_factor=4 if data.num_workers > 0 else None,
        worker_init_fn=leave_signals_to_the_trainer,
    )
    return RaisingLoader(loader), sampler


def sample_share(n_records: int, sample: int, seed: int, rank: int, world_size: int) -> list[int]:
    """This rank's share of a seeded uniform sample of ``sample`` records out of ``n_records`` (all of them when
    there are fewer), cut to a multiple of the world size so that every rank gets the same count: under ZeRO-3
    each forward is collective, and a rank with one batch more would wait forever."""
    take = min(sample, n_records) // world_size * world_size
    if take == 0:
        raise ConfigError(f"cannot give each of {world_size} ranks a sample: {n_records} records, {sample} asked")
    chosen = np.sort(np.random.default_rng(seed).choice(n_records, size=take, replace=False))
    return chosen[rank::world_size].tolist()


def build_sequential_loader(processor, data: DataConfig, *, batch_size: int, sample: int | None = None,
                            seed: int = 0, rank: int = 0, world_size: int = 1):
    """For analysis passes (IRS, bigram counts): every record dealt round-robin to ranks, or with ``sample``
    this rank's equal share of a seeded random sample over the whole source (:func:`sample_share`)."""
    encoder = build_encoder(processor, data)
    records = build_records(data, seed=0)
    if sample is None:
        indices = list(range(rank, len(records), world_size))
    else:
        indices = sample_share(len(records), sample, seed, rank, world_size)
    check_records(records, indices, data.on_bad_sample, rank)
    dataset = LlavaDataset(records, encoder, processor.image_processor, data.on_bad_sample)
    return RaisingLoader(torch.utils.data.DataLoader(
        torch.utils.data.Subset(_ErrorsAsItems(dataset), indices), batch_size=batch_size, shuffle=False,
        num_workers=data.num_workers,
        collate_fn=_CollateOrError(build_collator(processor, encoder, data.padding_side)),
        worker_init_fn=leave_signals_to_the_trainer,
    ))
