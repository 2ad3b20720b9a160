"""What the benchmark modules share: :class:`BenchItem`, :class:`BenchScore`, :class:`Benchmark` (an entry of
the registry) and the helpers that read LLaVA's evaluation files and tally scores."""

from __future__ import annotations

import io
import json
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from aligntI.data.records import DataError

IMAGE_TOKEN = "<image>"
SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."
LETTER_PROMPT = "Answer with the option's letter from the given choices directly."

REFERENCE_KEYS = ("answers", "answer", "label")


@dataclass
class BenchItem:
    """One benchmark question, ready for generation and scoring.

    ``question`` is the full user turn (``"<image>\\n"`` first when there is an image, the benchmark's prompt
    suffix last). ``image`` is a file path; MMBench's images come decoded from the TSV in ``image_bytes``
    instead. :meth:`open_image` reads either.
    """

    id: str
    question: str
    image: str | None
    reference: Any
    category: str = "all"
    meta: dict = field(default_factory=dict)
    image_bytes: bytes | None = field(default=None, repr=False)

    def open_image(self) -> Image.Image:
        if self.image_bytes is not None:
            try:
                with Image.open(io.BytesIO(self.image_bytes)) as im:
                    return im.convert("RGB")
            except (UnidentifiedImageError, OSError) as e:
                raise DataError("<embedded image>", f"cannot be decoded ({e})", sample_id=self.id) from e
        if self.image is None:
            raise DataError("<no image>", "the question has no image", sample_id=self.id)
        path = Path(self.image)
        if not path.is_file():
            raise DataError(path, "image file not found", sample_id=self.id)
        with Image.open(path) as im:
            return im.convert("RGB")

    def to_json(self) -> dict:
        """JSON-serialisable view (the image bytes are left out)."""
        return {"id": self.id, "question": self.question, "image": self.image, "reference": self.reference,
                "category": self.category, "meta": self.meta}

    @classmethod
    def from_json(cls, record: dict) -> BenchItem:
        return cls(id=record["id"], question=record["question"], image=record.get("image"),
                   reference=record["reference"], category=record.get("category", "all"),
                   meta=dict(record.get("meta") or {}))


@dataclass
class BenchScore:
    """``score`` is the number a paper's table reports; everything else is in ``metrics``."""

    name: str
    score: float
    metrics: dict
    n: int
    per_sample: dict[str, dict] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"name": self.name, "score": self.score, "n": self.n,
                "metrics": self.metrics, "per_sample": self.per_sample}


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: how its files are read, how its answers are scored, how its score is shown."""

    name: str
    title: str  # its column in the score table
    # (question file, image folder, annotations, max_samples) -> questions
    read_questions: Callable[[Path, Path | None, Path | None, int | None], list[BenchItem]]
    score_answers: Callable[[list[BenchItem], dict[str, str]], BenchScore]  # questions, id -> generated text
    detail: Callable[[BenchScore], str]  # its line under the score table
    folders: bool = True  # reads an image folder and annotations (MMBench has both inside its TSV)


# ----------------------------------------------------------------------------------- reading question files


def existing(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(path, f"{what}: file not found")
    return path


def fail(path: Path, sample: Any, message: str) -> DataError:
    return DataError(path, message, sample_id=str(sample))


def read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(path, f"not valid UTF-8 at byte {e.start}; save the file as UTF-8") from None


def read_json(path: Path) -> Any:
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(path, f"not valid JSON ({e})") from e


def read_records(path: Path) -> list[dict]:
    """A JSON array or JSON lines, each record an object."""
    text = read_text(path)
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(path, f"not valid JSON ({e})") from e
        where = [f"record {i}" for i in range(len(records))]
    else:
        records, where = [], []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(path, f"line {n} is not valid JSON ({e})") from e
            where.append(f"line {n}")
    for rec, at in zip(records, where):
        if not isinstance(rec, dict):
            raise DataError(path, f"{at} is not a JSON object")
    return records


def unique_ids(raw: list[str]) -> list[str]:
    """Ids that repeat get ``#1``, ``#2``... in order; the others stay as they are."""
    counts = Counter(raw)
    taken = set(raw)
    seen: Counter = Counter()
    out = []
    for r in raw:
        if counts[r] == 1:
            out.append(r)
            continue
        seen[r] += 1
        new = f"{r}#{seen[r]}"
        while new in taken:  # never collide with an id that is itself in the file
            new += "'"
        taken.add(new)
        out.append(new)
    return out


def raw_id(rec: dict, key: str, path: Path, position: int) -> Any:
    if rec.get(key) is None:
        raise DataError(path, f"has no {key!r}", record=position)
    return rec[key]


def with_suffix(text: str, suffix: str) -> str:
    body = text.rstrip()
    return body if body.endswith(suffix) else f"{body}\n{suffix}"


def user_turn(text: str, has_image: bool) -> str:
    """LLaVA removes any ``<image>`` from the text, strips it, and puts ``<image>\\n`` first."""
    text = text.replace(IMAGE_TOKEN, "").strip()
    return f"{IMAGE_TOKEN}\n{text}" if has_image else text


def inline_reference(rec: dict) -> Any:
    for key in REFERENCE_KEYS:
        if rec.get(key) is not None:
            return rec[key]
    return None


def image_path(rec: dict, images: Path | None, data: Path, sample: str) -> str:
    rel = rec.get("image")
    if not isinstance(rel, str) or not rel:
        raise fail(data, sample, "has no 'image'")
    return str((images if images is not None else data.parent) / rel)


def category_of(rec: dict) -> str:
    cat = rec.get("category")
    return "all" if cat in (None, "", "default") else str(cat)


def question_text(rec: dict, data: Path, sample: str) -> str:
    text = rec.get("text")
    if not isinstance(text, str) or not text.strip():
        raise fail(data, sample, "has no question 'text'")
    return text


def yes_no(value: Any, where: Path, sample: str) -> str:
    label = value.strip().lower() if isinstance(value, str) else None
    if label not in ("yes", "no"):
        raise fail(where, sample, f"reference must be 'yes' or 'no', got {value!r}")
    return label


def need_annotations(annotations: Path | None, data: Path, sample: str, what: str) -> Path:
    if annotations is None:
        raise fail(data, sample, f"carries no reference and no annotations were given ({what})")
    return annotations


def numbered(data: Path, max_samples: int | None, key: str = "question_id"):
    """(record, unique id) pairs of a question file, the first ``max_samples`` of them."""
    records = read_records(data)
    raw = [str(raw_id(rec, key, data, i)) for i, rec in enumerate(records)]
    pairs = list(zip(records, unique_ids(raw)))
    return pairs[:max_samples] if max_samples is not None else pairs


# -------------------------------------------------------------------------------------------------- scoring


def pct(num: float, den: float) -> float:
    return 100.0 * num / den if den else 0.0


def bad_sample(name: str, item: BenchItem, message: str) -> ValueError:
    return ValueError(f"{name}: sample {item.id!r}: {message}")


def per_category(pairs: list[tuple[str, float]]) -> dict[str, float]:
    groups: dict[str, list[float]] = defaultdict(list)
    for cat, value in pairs:
        groups[cat].append(value)
    return {cat: pct(sum(v), len(v)) for cat, v in sorted(groups.items())}
