"""Build the training DataLoader of one rank from the recipe's ``data`` section."""

from __future__ import annotations

import numpy as np
import torch.utils.data

from aligntI.config import DataConfig
from aligntI.data.dataset import Collator, LlavaDataset, image_shape
from aligntI.data.formatting import ConversationEncoder, load_chat_template
from aligntI.data.records import MixedRecords, RecordSource, ShardedResumableSampler
from aligntI.models.loading import num_image_tokens


def build_encoder(processor, data: DataConfig) -> ConversationEncoder:
    template = load_chat_template(data.chat_template) if data.chat_template else processor.chat_template
    if not template:
        raise ValueError("data.chat_template is not set and the processor has no chat template")
    return ConversationEncoder(
        tokenizer=processor.tokenizer,
        chat_template=template,
        image_token=processor.image_token,
        image_token_id=processor.image_token_id,
        num_image_tokens=num_image_tokens(processor),
        max_length=data.max_length,
    )


def build_collator(processor, encoder: ConversationEncoder, padding_side: str) -> Collator:
    pad = processor.tokenizer.pad_token_id
    if pad is None:
        raise ValueError("the tokenizer has no pad token; set one in the model directory's tokenizer config")
    return Collator(pad, encoder.image_token_id, encoder.num_image_tokens,
                    image_shape(processor.image_processor), padding_side)


def build_records(data: DataConfig, seed: int) -> MixedRecords:
    sources = [RecordSource(s.path, s.images, s.max_samples) for s in data.train]
    return MixedRecords(sources, [s.weight for s in data.train], seed)


def build_train_loader(processor, data: DataConfig, *, seed: int, rank: int, world_size: int,
                       micro_batch_size: int, global_batch_size: int, start_sample: int = 0):
    """Returns ``(loader, sampler)``; the loader is endless and starts after ``start_sample`` of this rank."""
    encoder = build_encoder(processor, data)
    records = build_records(data, seed)
    dataset = LlavaDataset(records, encoder, processor.image_processor, data.on_bad_sample)
    sampler = ShardedResumableSampler(records, rank, world_size, global_batch_size, start_sample)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=micro_batch_size,
        sampler=sampler,
        num_workers=data.num_workers,
        collate_fn=build_collator(processor, encoder, data.padding_side),
        persistent_workers=data.num_workers > 0,
        prefetch_factor=4 if data.num_workers > 0 else None,
    )
    return loader, sampler


def sample_share(n_records: int, sample: int, seed: int, rank: int, world_size: int) -> list[int]:
    """This rank's share of a seeded uniform sample of ``sample`` records out of ``n_records`` (all of them when
    there are fewer), cut to a multiple of the world size so that every rank gets the same count: under ZeRO-3
    each forward is collective, and a rank with one batch more would wait forever."""
    take = min(sample, n_records) // world_size * world_size
    if take == 0:
        raise ValueError(f"cannot give each of {world_size} ranks a sample: {n_records} records, {sample} asked")
    chosen = np.sort(np.random.default_rng(seed).choice(n_records, size=take, replace=False))
    return chosen[rank::world_size].tolist()


def build_sequential_loader(processor, data: DataConfig, *, batch_size: int, sample: int | None = None,
                            seed: int = 0, rank: int = 0, world_size: int = 1):
    """For analysis passes (IRS, bigram counts): every record dealt round-robin to ranks, or with ``sample``
    this rank's equal share of a seeded random sample over the whole source (:func:`sample_share`)."""
    encoder = build_encoder(processor, data)
    records = build_records(data, seed=0)
    dataset = LlavaDataset(records, encoder, processor.image_processor, data.on_bad_sample)
    if sample is None:
        indices = list(range(rank, len(records), world_size))
    else:
        indices = sample_share(len(records), sample, seed, rank, world_size)
    return torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, indices), batch_size=batch_size, shuffle=False,
        num_workers=data.num_workers, collate_fn=build_collator(processor, encoder, data.padding_side),
    )
