"""Index of LLaVA-format records over several JSON/JSONL files, mixed by weight, read lazily.

Millions of samples: a JSONL file is indexed by the byte offset of each line (nothing parsed up front);
a JSON array is parsed once and each record re-encoded into one flat byte buffer. Either way a record is
decoded only when a DataLoader worker asks for it, and no per-record Python object is held, so forked
workers share the index without copy-on-write growth.

Order: each epoch is a seeded permutation of the weighted draw, cut to whole global batches and dealt
round-robin to ranks. It is a pure function of (seed, epoch), so resuming only needs the step count.

Problems are :class:`DataError` s. A file that cannot be read as a whole (missing, not UTF-8, a byte-order
mark, a JSON array that does not parse, no records) fails when it is indexed; a record that is not valid
JSON or not an object fails when it is decoded.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from pathlib import Path

import numpy as np
import torch.utils.data

from aligntI.config import ConfigError


class DataError(ValueError):
    """A data file, or one record of it, cannot be used.

    ``record`` is the record's 0-based position in its file (what ``max_samples`` and ``aligntI attention-maps
    --samples`` count), ``line`` its 1-based line in a JSONL file, ``sample_id`` its ``id`` field; None when
    unknown. Every field is also in ``args`` so that the error pickles whole out of a DataLoader worker.
    """

    def __init__(self, file: str | Path, problem: str, record: int | None = None, sample_id: str | None = None,
                 line: int | None = None):
        super().__init__(str(file), problem, record, sample_id, line)
        self.file, self.problem, self.record, self.sample_id, self.line = str(file), problem, record, sample_id, line

    def __str__(self) -> str:
        where = []
        if self.record is not None:
            where.append(f"record {self.record}" + (f" (line {self.line})" if self.line is not None else ""))
        if self.sample_id is not None:
            where.append(f"sample {self.sample_id!r}")
        return ": ".join([self.file, ", ".join(where), self.problem] if where else [self.file, self.problem])


def json_type(value) -> str:
    """The JSON name of a decoded value's type: what the author of the file wrote."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


class RecordSource:
    """The records of one JSON or JSONL file, decoded on access.

    ``images`` is the folder image paths are relative to (default: the file's folder); a record's image must
    resolve inside it unless ``allow_images_outside`` (checked by :func:`aligntI.data.dataset.image_file`).
    """

    def __init__(self, path: str | Path, images: str | Path | None = None, max_samples: int | None = None,
                 allow_images_outside: bool = False):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(self.path, "is a directory, not a data file" if self.path.is_dir() else "file not found")
        self.images = Path(images) if images is not None else self.path.parent
        if not self.images.is_dir():
            raise DataError(self.path, f"image folder not found: {self.images}")
        self.images_real = Path(os.path.realpath(self.images))
        self.images_prefix = os.path.join(self.images_real, "")  # what every image's real path starts with
        self.allow_images_outside = allow_images_outside
        self._lines = None  # JSONL: the 1-based line of each record, for messages
        try:
            if self.path.suffix == ".jsonl":
                self._offsets, self._lines = _index_jsonl(self.path)
                self._buffer = None
            elif self.path.suffix == ".json":
                self._buffer, self._offsets = _pack_json_array(self.path)
            else:
                raise DataError(self.path, "expected a .json file (an array of records) or a .jsonl file "
                                           "(one record per line)")
        except OSError as err:
            raise DataError(self.path, f"cannot be read: {err.strerror or err}") from None
        if max_samples is not None:
            self._offsets = self._offsets[: max_samples + 1]
        if len(self) == 0:
            raise DataError(self.path, "holds no records")
        self._handle = None  # opened lazily per process (workers must not share a file position)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def raw(self, i: int) -> bytes:
        start, end = int(self._offsets[i]), int(self._offsets[i + 1])
        if self._buffer is not None:
            return self._buffer[start:end].tobytes()
        if self._handle is None:
            self._handle = open(self.path, "rb")  # noqa: SIM115 - kept open for the life of the worker
        self._handle.seek(start)
        return self._handle.read(end - start)

    def get(self, i: int) -> dict:
        """Decode record ``i``; one that is not UTF-8, not JSON or not an object raises :class:`DataError`."""
        raw = self.raw(i)
        if self._buffer is not None:  # re-encoded from an array that parsed: valid JSON
            record = json.loads(raw.decode("utf-8", "surrogatepass"))
        else:
            record = self._decode_line(i, raw)
        if not isinstance(record, dict):
            raise self.error(i, f"is a JSON {json_type(record)}, expected an object")
        return record

    def error(self, i: int, problem: str, sample_id: str | None = None) -> DataError:
        """The error for record ``i``, with its line when the file is JSONL."""
        line = None if self._lines is None else int(self._lines[i])
        return DataError(self.path, problem, record=i, sample_id=sample_id, line=line)

    def _decode_line(self, i: int, raw: bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise self.error(i, f"not valid UTF-8 at byte {err.start} of the line "
                                f"({raw[err.start:err.start + 4]!r}); save the file as UTF-8") from None
        try:
            return json.loads(text.rstrip())  # without the newline, an error's column is one on the file's line
        except json.JSONDecodeError as err:
            problem = f"not valid JSON at column {err.colno}: {err.msg.removesuffix(' at')}"
            raise self.error(i, problem, _guess_id(text)) from None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handle"] = None
        return state


def _refuse_byte_order_mark(path: Path, head: bytes) -> None:
    """JSON text is UTF-8 without a byte-order mark (RFC 8259); refused here rather than misread later."""
    if head.startswith(codecs.BOM_UTF8):
        raise DataError(path, "starts with a UTF-8 byte-order mark; save it as UTF-8 without BOM")
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise DataError(path, "is UTF-16 or UTF-32 (it starts with a byte-order mark); save it as UTF-8")


def _index_jsonl(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Start offset of each non-empty line, then the end of the last one; and each such line's number.

    Record i is bytes [offsets[i], offsets[i+1]): blank lines after a record ride along as whitespace.
    """
    starts, lines, end, pos = [], [], 0, 0
    with open(path, "rb") as f:
        _refuse_byte_order_mark(path, f.read(4))
        f.seek(0)
        for number, line in enumerate(f, 1):
            if line.strip():
                starts.append(pos)
                lines.append(number)
                end = pos + len(line)
            pos += len(line)
    return np.asarray(starts + [end], dtype=np.int64), np.asarray(lines, dtype=np.int64)


def _pack_json_array(path: Path) -> tuple[np.ndarray, np.ndarray]:
    data = path.read_bytes()
    _refuse_byte_order_mark(path, data[:4])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        # Say which record holds the bad byte: decode with replacements, which keep the JSON structure.
        line = data.count(b"\n", 0, err.start) + 1
        problem = (f"not valid UTF-8 at line {line} (byte {err.start}: {data[err.start:err.start + 4]!r}); "
                   "save the file as UTF-8")
        readable = data.decode("utf-8", "replace")
        raise _array_error(path, readable, len(data[: err.start].decode("utf-8")), problem) from None
    del data
    if not text.strip():
        raise DataError(path, "is empty")
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        problem = f"not valid JSON at line {err.lineno}, column {err.colno}: {err.msg.removesuffix(' at')}"
        if text.lstrip().startswith("{"):
            problem += " (one record per line? then name the file .jsonl)"
        raise _array_error(path, text, err.pos, problem) from None
    if not isinstance(records, list):
        raise DataError(path, f"is a JSON {json_type(records)}, expected an array of records")
    # surrogatepass: a lone surrogate escape (\ud800) is valid JSON; formatting reports it per sample.
    blobs = [json.dumps(r, ensure_ascii=False).encode("utf-8", "surrogatepass") for r in records]
    offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in blobs], out=offsets[1:])
    buffer = np.frombuffer(b"".join(blobs), dtype=np.uint8)
    return buffer, offsets


def _array_error(path: Path, text: str, pos: int, problem: str) -> DataError:
    """A whole-file error, placed on the array record at character ``pos`` when there is one."""
    found = _record_at(text, pos)
    if found is None:
        return DataError(path, problem)
    number, start = found
    return DataError(path, problem, record=number, sample_id=_guess_id(text[start:pos]))


_SPACE = re.compile(r"\s*")


def _record_at(text: str, pos: int) -> tuple[int, int] | None:
    """(number, start) of the top-level array element at character ``pos`` of ``text``, found by decoding the
    elements in turn (only on the error path); None when ``text`` is no array or ``pos`` is outside its elements."""
    decoder = json.JSONDecoder()
    i = _SPACE.match(text).end()
    if not text.startswith("[", i):
        return None
    i, number = _SPACE.match(text, i + 1).end(), 0
    while i <= pos:
        start = i
        try:
            _, i = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            return None if text.startswith("]", start) else (number, start)  # "]": a trailing comma
        if i > pos:
            return number, start
        i = _SPACE.match(text, i).end()
        if not text.startswith(",", i):  # a missing comma: the error is at the start of the next record
            return (number + 1, i) if i == pos and not text.startswith("]", i) else None
        i, number = _SPACE.match(text, i + 1).end(), number + 1
    return None


_ID = re.compile(r'"id"\s*:\s*("(?:[^"\\]|\\.)*"|-?\d+)')


def _guess_id(text: str) -> str | None:
    """The ``id`` a broken record's text still shows, if any: it tells the user which sample to fix."""
    match = _ID.search(text)
    try:
        return None if match is None else str(json.loads(match.group(1)))
    except json.JSONDecodeError:  # e.g. an invalid escape inside the id itself
        return None


class MixedRecords:
    """Several sources behind one global index; ``draws(epoch)`` gives the weighted, shuffled epoch."""

    def __init__(self, sources: list[RecordSource], weights: list[float], seed: int):
        if len(sources) != len(weights):
            raise ValueError("one weight per source")
        self.sources = sources
        self.weights = weights
        self.seed = seed
        self._starts = np.cumsum([0] + [len(s) for s in sources])  # RecordSource refuses an empty file

    def __len__(self) -> int:
        return int(self._starts[-1])

    def source_index(self, gid: int) -> int:
        """Which source global id ``gid`` belongs to."""
        return int(np.searchsorted(self._starts, gid, side="right")) - 1

    def locate(self, gid: int) -> tuple[RecordSource, int]:
        k = self.source_index(gid)
        return self.sources[k], gid - int(self._starts[k])

    def source_range(self, gid: int) -> tuple[int, int]:
        k = self.source_index(gid)
        return int(self._starts[k]), int(self._starts[k + 1])

    def epoch_size(self) -> int:
        return sum(int(round(w * len(s))) for s, w in zip(self.sources, self.weights))

    def draws(self, epoch: int) -> np.ndarray:
        """Global ids for one epoch: ``weight × len`` draws per source (whole repeats plus a subset)."""
        rng = np.random.default_rng([self.seed, epoch])
        parts = []
        for k, (src, w) in enumerate(zip(self.sources, self.weights)):
            n, start = len(src), int(self._starts[k])
            want = int(round(w * n))
            full, rest = divmod(want, n)
            ids = [rng.permutation(n) for _ in range(full)]
            if rest:
                ids.append(rng.permutation(n)[:rest])
            if ids:
                parts.append(np.concatenate(ids) + start)
        order = np.concatenate(parts)
        return order[rng.permutation(len(order))]


class ShardedResumableSampler(torch.utils.data.Sampler[int]):
    """This rank's share of an endless sequence of epochs, starting after ``start_sample`` of its own draws.

    Every epoch is cut to whole global batches so all ranks run the same number of micro-batches.
    """

    def __init__(self, records: MixedRecords, rank: int, world_size: int, global_batch_size: int,
                 start_sample: int = 0):
        self.records = records
        self.rank = rank
        self.world_size = world_size
        self.steps_per_epoch = records.epoch_size() // global_batch_size
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"train.global_batch_size: {global_batch_size} is more than the {records.epoch_size()} draws per "
                f"epoch of the training data ({', '.join(str(s.path) for s in records.sources)})"
            )
        self.per_rank_per_epoch = self.steps_per_epoch * global_batch_size // world_size
        self.start_sample = start_sample

    def __iter__(self):
        epoch, offset = divmod(self.start_sample, self.per_rank_per_epoch)
        while True:
            draws = self.records.draws(epoch)[: self.per_rank_per_epoch * self.world_size]
            mine = draws[self.rank :: self.world_size]
            for gid in mine[offset:]:
                yield int(gid)
            epoch, offset = epoch + 1, 0

    def __len__(self) -> int:  # endless; DataLoader only needs this for its progress bookkeeping
        return 2**62
