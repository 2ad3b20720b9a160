"""LLaVA-format samples → padded batches with explicit vision / instruction / response masks.

Work happens lazily in DataLoader workers: a record is decoded, its image opened and its text
tokenised only when the sampler asks for it. A bad sample raises :class:`DataError` naming the file,
the record, the sample id and the problem; with ``on_bad_sample: skip`` the next record of the same file
is used instead and the skip travels with the batch so the trainer can count and report it. Samples that
cannot fit ``max_length`` are always skipped and counted. :func:`check_sample` runs every check short of
decoding pixels and tokenising, for the loader's look at all records before the first step.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from aligntI.data.formatting import ConversationEncoder, FormatError, TooLongError, to_messages
from aligntI.data.records import DataError, MixedRecords, RecordSource, json_type

MAX_CONSECUTIVE_SKIPS = 100
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "pixel_values")


@dataclass
class Skip:
    kind: str  # "bad" or "too_long"
    message: str


@dataclass
class Sample:
    """A record checked up to its image's pixels and its tokens."""

    record: dict
    id: str | None  # the record's ``id`` field, when it has one
    messages: list[dict]
    image: str | None  # the ``image`` field as the record writes it
    image_path: Path | None


def read_sample(source: RecordSource, index: int) -> Sample:
    """Record ``index``: decoded, its conversation and its image reference checked; raises :class:`DataError`."""
    record = source.get(index)
    sample_id = None if record.get("id") is None else str(record["id"])
    try:
        if "conversations" not in record:
            raise FormatError("no 'conversations' field")
        messages, n_placeholders = to_messages(record["conversations"])
        image = record.get("image")
        if image is not None and not isinstance(image, str):
            raise FormatError(f"'image' must be a single relative path string, got a JSON {json_type(image)}")
        if image is not None and n_placeholders != 1:
            raise FormatError(f"has an image but {n_placeholders} <image> placeholders in its conversation "
                              "(need exactly 1)")
        if image is None and n_placeholders:
            raise FormatError(f"has {n_placeholders} <image> placeholder(s) but no 'image' field")
        path = None if image is None else image_file(source, image)
    except FormatError as err:
        raise source.error(index, str(err), sample_id) from None
    return Sample(record, sample_id, messages, image, path)


def image_file(source: RecordSource, name: str) -> Path:
    """The image file a record names, checked to be one; raises :class:`FormatError` saying what is wrong.

    The path must resolve (``..``, absolute paths and symlinks followed) inside the source's image folder
    unless ``data.allow_images_outside``: a data file must not make the trainer read whatever file it names.
    Plain ``os.path`` strings and one ``stat``: this runs for every record before training.
    """
    if not name.strip():
        raise FormatError("'image' is an empty string")
    path = os.path.join(source.images, name)
    try:
        real = os.path.realpath(path)
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        mode = None
    except (OSError, ValueError) as err:  # no permission, a NUL byte in the name, ...
        raise FormatError(f"image path {name!r} cannot be used: {err}") from None
    if not source.allow_images_outside and not (real + os.sep).startswith(source.images_prefix):
        raise FormatError(f"image {name!r} resolves to {real}, outside the image folder {source.images_real} "
                          "(set data.allow_images_outside: true to allow that)")
    if mode is None:
        raise FormatError(f"image not found: {path}")
    if stat.S_ISDIR(mode):
        raise FormatError(f"image {path} is a directory, not an image file")
    if not stat.S_ISREG(mode):
        raise FormatError(f"image {path} is not a regular file")
    return Path(path)


def decode_image(path: Path) -> Image.Image:
    """The image as RGB. Whatever the decoder raises on these bytes (OSError, SyntaxError, ValueError,
    DecompressionBombError, ...) is a :class:`FormatError`: a property of the file, not of the code."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as err:
        raise FormatError(f"cannot decode image {path}: {err}") from err


def check_sample(source: RecordSource, index: int) -> Sample:
    """:func:`read_sample` plus the image's header (PIL identifies the format): all that can be checked of a
    record without decoding its pixels or tokenising it. Raises :class:`DataError`."""
    sample = read_sample(source, index)
    if sample.image_path is not None:
        try:
            with Image.open(sample.image_path):
                pass
        except Exception as err:  # as in decode_image: any failure on these bytes is the file's
            raise source.error(index, f"cannot decode image {sample.image_path}: {err}", sample.id) from err
    return sample


def load_sample(source: RecordSource, index: int, encoder: ConversationEncoder, image_processor) -> dict:
    """One record → arrays and pixel values; raises :class:`DataError`, or :class:`TooLongError` naming it."""
    sample = read_sample(source, index)
    pixel_values = None
    try:
        if sample.image_path is not None:
            image = decode_image(sample.image_path)
            pixel_values = image_processor(images=[image], return_tensors="pt")["pixel_values"]
        enc = encoder.encode(sample.messages)
    except TooLongError as err:
        raise TooLongError(str(source.error(index, str(err), sample.id))) from None
    except FormatError as err:
        raise source.error(index, str(err), sample.id) from None
    sample_id = sample.id if sample.id is not None else f"#{index}"
    return {"id": sample_id, "image": sample.image, "encoded": enc, "pixel_values": pixel_values}


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
        lo, hi = self.records.source_range(gid)
        source, first = self.records.locate(gid)
        for _ in range(min(MAX_CONSECUTIVE_SKIPS, hi - lo)):
            source, index = self.records.locate(gid)
            try:
                item = load_sample(source, index, self.encoder, self.image_processor)
                item["skips"] = skips
                return item
            except TooLongError as err:
                skips.append(Skip("too_long", str(err)))
            except DataError as err:
                if self.on_bad_sample == "error":
                    raise
                skips.append(Skip("bad", str(err)))
            # Replace with the next record of the same file: deterministic, so resume stays exact.
            gid = lo + (gid - lo + 1) % (hi - lo)
        last = skips[-1].message.removeprefix(f"{source.path}: ")
        raise DataError(source.path, f"{len(skips)} consecutive records from record {first} on (wrapping round "
                                     "the file) were skipped (bad or too long), so there is nothing to use in their "
                                     f"place; the last: {last}")


class Collator:
    """Pads a list of samples; guarantees every batch runs the vision tower (ZeRO-3).

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
