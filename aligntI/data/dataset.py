"""LLaVA-format samples → padded batches with explicit vision / instruction / response masks.

Work happens lazily in DataLoader workers: a record is decoded, its image opened and its text
tokenised only when the sampler asks for it. Bad samples raise :class:`BadSampleError` naming the
file, the sample id and the problem; with ``on_bad_sample: skip`` the next record of the same file is
used instead and the skip travels with the batch so the trainer can count and report it. Samples that
cannot fit ``max_length`` are always skipped and counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from aligntI.data.formatting import ConversationEncoder, FormatError, TooLongError, to_messages
from aligntI.data.records import MixedRecords, RecordSource

MAX_CONSECUTIVE_SKIPS = 100
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "pixel_values")


class BadSampleError(ValueError):
    def __init__(self, file: str, sample_id: str, index: int, problem: str):
        self.file, self.sample_id, self.index, self.problem = file, sample_id, index, problem
        super().__init__(f"{file}: sample {sample_id!r} (record {index}): {problem}")


@dataclass
class Skip:
    kind: str  # "bad" or "too_long"
    message: str


def load_sample(source: RecordSource, index: int, encoder: ConversationEncoder, image_processor) -> dict:
    """One record → arrays and pixel values; raises BadSampleError (or TooLongError inside it)."""
    try:
        record = source.get(index)
    except ValueError as err:
        raise BadSampleError(str(source.path), "?", index, str(err)) from None
    sample_id = str(record.get("id", f"#{index}"))

    def bad(problem: str) -> BadSampleError:
        return BadSampleError(str(source.path), sample_id, index, problem)

    if "conversations" not in record:
        raise bad("no 'conversations' field")
    try:
        messages, n_placeholders = to_messages(record["conversations"])
    except FormatError as err:
        raise bad(str(err)) from None
    image_name = record.get("image")
    if image_name is not None and not isinstance(image_name, str):
        raise bad(f"'image' must be a single relative path string, got {type(image_name).__name__}")
    if image_name is not None and n_placeholders != 1:
        raise bad(f"has an image but {n_placeholders} <image> placeholders in its conversation (need exactly 1)")
    if image_name is None and n_placeholders:
        raise bad(f"has {n_placeholders} <image> placeholder(s) but no 'image' field")

    pixel_values = None
    if image_name is not None:
        path = Path(source.images) / image_name
        if not path.is_file():
            raise bad(f"image not found: {path}")
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise bad(f"cannot decode image {path}: {err}") from None
        pixel_values = image_processor(images=[image], return_tensors="pt")["pixel_values"]

    try:
        enc = encoder.encode(messages)
    except TooLongError as err:
        raise TooLongError(f"{source.path}: sample {sample_id!r} (record {index}): {err}") from None
    except FormatError as err:
        raise bad(str(err)) from None
    return {"id": sample_id, "image": image_name, "encoded": enc, "pixel_values": pixel_values}


class LlavaDataset(torch.utils.data.Dataset):
    """Map-style view over :class:`MixedRecords`; an index is a global record id."""

    def __init__(self, records: MixedRecords, encoder: ConversationEncoder, image_processor,
                 on_bad_sample: str = "error"):
        self.records = records
        self.encoder = encoder
        self.image_processor = image_processor
        self.on_bad_sample = on_bad_sample

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, gid: int) -> dict:
        skips: list[Skip] = []
        for _ in range(MAX_CONSECUTIVE_SKIPS):
            source, index = self.records.locate(gid)
            try:
                item = load_sample(source, index, self.encoder, self.image_processor)
                item["skips"] = skips
                return item
            except TooLongError as err:
                skips.append(Skip("too_long", str(err)))
            except BadSampleError as err:
                if self.on_bad_sample == "error":
                    raise
                skips.append(Skip("bad", str(err)))
            # Replace with the next record of the same file: deterministic, so resume stays exact.
            lo, hi = self.records.source_range(gid)
            gid = lo + (gid - lo + 1) % (hi - lo)
        raise RuntimeError(f"{MAX_CONSECUTIVE_SKIPS} consecutive samples skipped; last: {skips[-1].message}")


class Collator:
    """Pads a list of samples; guarantees every batch runs the vision tower (ZeRO-3, ENGINEERING §4d).

    A batch with no image gets one all-zero dummy image whose tokens sit after the last real token of
    row 0 with ``attention_mask`` 0 and no labels: no real token can attend to them (causal order and
    padding mask), so the loss and gradients are unchanged while every rank calls the same modules.
    """

    def __init__(self, pad_token_id: int, image_token_id: int, num_image_tokens: int, image_shape: tuple,
                 padding_side: str = "right"):
        self.pad_token_id = pad_token_id
        self.image_token_id = image_token_id
        self.num_image_tokens = num_image_tokens
        self.image_shape = tuple(image_shape)  # (3, H, W) of the processor's output
        self.padding_side = padding_side

    def __call__(self, items: list[dict]) -> dict:
        encs = [it["encoded"] for it in items]
        images = [it["pixel_values"] for it in items if it["pixel_values"] is not None]
        dummy = not images
        length = max(len(e.input_ids) for e in encs) + (self.num_image_tokens if dummy else 0)
        batch_size = len(items)
        input_ids = torch.full((batch_size, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch_size, length), -100, dtype=torch.long)
        attention = torch.zeros((batch_size, length), dtype=torch.long)
        masks = {k: torch.zeros((batch_size, length), dtype=torch.bool)
                 for k in ("vision_mask", "instruction_mask", "response_mask")}
        real_length = length - (self.num_image_tokens if dummy else 0)
        for row, e in enumerate(encs):
            n = len(e.input_ids)
            start = real_length - n if self.padding_side == "left" else 0
            cols = slice(start, start + n)
            input_ids[row, cols] = torch.from_numpy(e.input_ids)
            labels[row, cols] = torch.from_numpy(e.labels)
            attention[row, cols] = 1
            masks["vision_mask"][row, cols] = torch.from_numpy(e.vision_mask)
            masks["instruction_mask"][row, cols] = torch.from_numpy(e.instruction_mask)
            masks["response_mask"][row, cols] = torch.from_numpy(e.response_mask)
        if dummy:
            input_ids[0, real_length:] = self.image_token_id
            pixel_values = torch.zeros((1, *self.image_shape))
        else:
            pixel_values = torch.cat(images, dim=0)
        # Positions count real tokens only, so left and right padding give the same logits.
        position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
        return {
            "input_ids": input_ids,
            "attention_mask": attention,
            "position_ids": position_ids,
            "pixel_values": pixel_values,
            "labels": labels,
            **masks,
            "sample_ids": [it["id"] for it in items],
            "images": [it["image"] for it in items],  # file names, e.g. to pair questions on one image
            "skips": [s for it in items for s in it["skips"]],
            "truncated": sum(int(e.truncated) for e in encs),
        }


def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in MODEL_INPUTS}


def image_shape(image_processor) -> tuple[int, int, int]:
    blank = Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8))
    return tuple(image_processor(images=[blank], return_tensors="pt")["pixel_values"].shape[1:])
