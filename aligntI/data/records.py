"""Index of LLaVA-format records over several JSON/JSONL files, mixed by weight, read lazily.

Millions of samples: a JSONL file is indexed by the byte offset of each line (nothing parsed up front);
a JSON array is parsed once and each record re-encoded into one flat byte buffer. Either way a record is
decoded only when a DataLoader worker asks for it, and no per-record Python object is held, so forked
workers share the index without copy-on-write growth.

Order: each epoch is a seeded permutation of the weighted draw, cut to whole global batches and dealt
round-robin to ranks. It is a pure function of (seed, epoch), so resuming only needs the step count.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch.utils.data


class RecordSource:
    """The records of one JSON or JSONL file, decoded on access."""

    def __init__(self, path: str | Path, images: str | Path | None = None, max_samples: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"data file not found: {self.path}")
        self.images = Path(images) if images is not None else self.path.parent
        if self.path.suffix == ".jsonl":
            self._offsets = _line_offsets(self.path)
            self._buffer = None
        elif self.path.suffix == ".json":
            self._buffer, self._offsets = _pack_json_array(self.path)
        else:
            raise ValueError(f"{self.path}: expected a .json or .jsonl file")
        if max_samples is not None:
            self._offsets = self._offsets[: max_samples + 1]
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
        """Decode record ``i``; a malformed line raises ``ValueError`` naming file and line."""
        try:
            record = json.loads(self.raw(i))
        except json.JSONDecodeError as err:
            raise ValueError(f"{self.path}: record {i} is not valid JSON: {err}") from None
        if not isinstance(record, dict):
            raise ValueError(f"{self.path}: record {i} is a {type(record).__name__}, expected an object")
        return record

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handle"] = None
        return state


def _line_offsets(path: Path) -> np.ndarray:
    """Start offset of each non-empty line, then the end of the last one.

    Record i is bytes [offsets[i], offsets[i+1]): blank lines after a record ride along as whitespace.
    """
    starts, end, pos = [], 0, 0
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                starts.append(pos)
                end = pos + len(line)
            pos += len(line)
    return np.asarray(starts + [end], dtype=np.int64)


def _pack_json_array(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        records = json.loads(path.read_bytes())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON array of records, got {type(records).__name__}")
    blobs = [json.dumps(r, ensure_ascii=False).encode() for r in records]
    offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in blobs], out=offsets[1:])
    buffer = np.frombuffer(b"".join(blobs), dtype=np.uint8)
    return buffer, offsets


class MixedRecords:
    """Several sources behind one global index; ``draws(epoch)`` gives the weighted, shuffled epoch."""

    def __init__(self, sources: list[RecordSource], weights: list[float], seed: int):
        if len(sources) != len(weights):
            raise ValueError("one weight per source")
        self.sources = sources
        self.weights = weights
        self.seed = seed
        self._starts = np.cumsum([0] + [len(s) for s in sources])
        for s in sources:
            if len(s) == 0:
                raise ValueError(f"{s.path}: no records")

    def __len__(self) -> int:
        return int(self._starts[-1])

    def locate(self, gid: int) -> tuple[RecordSource, int]:
        k = int(np.searchsorted(self._starts, gid, side="right")) - 1
        return self.sources[k], gid - int(self._starts[k])

    def source_range(self, gid: int) -> tuple[int, int]:
        k = int(np.searchsorted(self._starts, gid, side="right")) - 1
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
            raise ValueError(
                f"the training data has {records.epoch_size()} draws per epoch, fewer than one global batch "
                f"({global_batch_size})"
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
