"""Benchmark registry and input loaders for LLaVA-1.5-style evaluation.

Six benchmarks, read from LLaVA-1.5's evaluation files (the ``playground/data/eval/<bench>/`` layout) and
turned into :class:`BenchItem` s: the exact user turn LLaVA sends to the model, the image, and the reference
the matching scorer in :mod:`aligntI.eval.scoring` needs.

======== ================================== ============================================= =====================
name     questions (``data``)               references (``annotations``)                  prompt suffix
======== ================================== ============================================= =====================
gqa      llava_gqa_testdev_balanced.jsonl   testdev_balanced_questions.json {qid: {...}}  short answer
sqa_img  llava_test_CQM-A.json              problems.json (or the folder holding it)      option letter
textvqa  llava_textvqa_val_v051_ocr.jsonl   TextVQA_0.5.1_val.json                        short answer
pope     llava_pope_test.jsonl              folder with coco_pope_{split}.json            short answer
mme      llava_mme.jsonl                    MME_Benchmark_release_version/                short answer
mmbench  mmbench_dev_20230712.tsv           (in the TSV)                                  option letter
======== ================================== ============================================= =====================

Everywhere a record that carries its own reference (key ``answers``, ``answer`` or ``label``) uses it, so
``annotations`` is optional for self-contained files. The suffix is appended (after a newline) only when the
text does not already end with it; LLaVA's own files already contain it.

Sample ids are the file's question ids as strings. LLaVA's TextVQA and MME files repeat a question id (the
TextVQA image id; the MME image, asked twice): every occurrence of an id that appears more than once in the
file gets ``#1``, ``#2``, ... in file order, counted over the whole file so ``max_samples`` never renames one.
The raw id is kept in ``meta["question_id"]``.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from aligntI.data.records import DataError

BENCHMARKS: tuple[str, ...] = ("gqa", "sqa_img", "textvqa", "pope", "mme", "mmbench")
TITLES = {"gqa": "GQA", "sqa_img": "SQA-IMG", "textvqa": "TextVQA", "pope": "POPE-F1", "mme": "MME-P/20",
          "mmbench": "MMB-dev"}

IMAGE_TOKEN = "<image>"
SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."
LETTER_PROMPT = "Answer with the option's letter from the given choices directly."
OCR_PREFIX = "Reference OCR token:"  # LLaVA writes "Reference OCR token: tok1, tok2, ..." as its own line
YES_NO_PROMPT = "Please answer yes or no."  # the MME release's questions end with it; LLaVA's prompts drop it

POPE_SPLITS = ("adversarial", "popular", "random")
MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
SQA_OPTIONS = ("A", "B", "C", "D", "E")
MMBENCH_OPTIONS = ("A", "B", "C", "D")
MMBENCH_CIRCULAR_MOD = 1_000_000  # rotated copies of question i have index i + k * 1_000_000
TEXTVQA_N_ANSWERS = 10

_REFERENCE_KEYS = ("answers", "answer", "label")


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


def load_benchmark(name: str, data: str | Path, images: str | Path | None = None,
                   annotations: str | Path | None = None, max_samples: int | None = None) -> list[BenchItem]:
    """Read one benchmark's question file (plus its references) into :class:`BenchItem` s.

    ``images`` is the image folder (image paths in the file are relative to it; without it, relative to the
    data file's folder). ``max_samples`` keeps the first N questions (for SQA-IMG: the first N with an image).
    MMBench takes its images and answers from the TSV and ignores ``images`` and ``annotations``.
    """
    if name not in _LOADERS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    if max_samples is not None and (not isinstance(max_samples, int) or max_samples < 1):
        raise ValueError(f"max_samples must be a positive integer or None, got {max_samples!r}")
    data = _existing(data, f"{name} question file")
    if name != "mmbench":
        if images is not None:
            images = Path(images)
            if not images.is_dir():
                raise DataError(data, f"{name} image folder {images} not found")
        if annotations is not None:
            annotations = Path(annotations)
            if not annotations.exists():
                raise DataError(data, f"{name} annotations {annotations} not found")
    items = _LOADERS[name](data, images, annotations, max_samples)
    if not items:
        raise DataError(data, f"holds no {name} questions")
    return items


# ---------------------------------------------------------------------------------------------- helpers


def _existing(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(path, f"{what}: file not found")
    return path


def _fail(path: Path, sample: Any, message: str) -> DataError:
    return DataError(path, message, sample_id=str(sample))


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(path, f"not valid UTF-8 at byte {e.start}; save the file as UTF-8") from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(path, f"not valid JSON ({e})") from e


def _read_records(path: Path) -> list[dict]:
    """A JSON array or JSON lines, each record an object."""
    text = _read_text(path)
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


def _unique_ids(raw: list[str]) -> list[str]:
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


def _raw_id(rec: dict, key: str, path: Path, position: int) -> Any:
    if rec.get(key) is None:
        raise DataError(path, f"has no {key!r}", record=position)
    return rec[key]


def _with_suffix(text: str, suffix: str) -> str:
    body = text.rstrip()
    return body if body.endswith(suffix) else f"{body}\n{suffix}"


def _user_turn(text: str, has_image: bool) -> str:
    """LLaVA removes any ``<image>`` from the text, strips it, and puts ``<image>\\n`` first."""
    text = text.replace(IMAGE_TOKEN, "").strip()
    return f"{IMAGE_TOKEN}\n{text}" if has_image else text


def _inline_reference(rec: dict) -> Any:
    for key in _REFERENCE_KEYS:
        if rec.get(key) is not None:
            return rec[key]
    return None


def _image_path(rec: dict, images: Path | None, data: Path, sample: str) -> str:
    rel = rec.get("image")
    if not isinstance(rel, str) or not rel:
        raise _fail(data, sample, "has no 'image'")
    return str((images if images is not None else data.parent) / rel)


def _category(rec: dict) -> str:
    cat = rec.get("category")
    return "all" if cat in (None, "", "default") else str(cat)


def _text(rec: dict, data: Path, sample: str) -> str:
    text = rec.get("text")
    if not isinstance(text, str) or not text.strip():
        raise _fail(data, sample, "has no question 'text'")
    return text


def _yes_no(value: Any, where: Path, sample: str) -> str:
    label = value.strip().lower() if isinstance(value, str) else None
    if label not in ("yes", "no"):
        raise _fail(where, sample, f"reference must be 'yes' or 'no', got {value!r}")
    return label


def _need_annotations(annotations: Path | None, data: Path, sample: str, what: str) -> Path:
    if annotations is None:
        raise _fail(data, sample, f"carries no reference and no annotations were given ({what})")
    return annotations


def _numbered(data: Path, max_samples: int | None, key: str = "question_id"):
    """(record, unique id) pairs of a question file, the first ``max_samples`` of them."""
    records = _read_records(data)
    raw = [str(_raw_id(rec, key, data, i)) for i, rec in enumerate(records)]
    pairs = list(zip(records, _unique_ids(raw)))
    return pairs[:max_samples] if max_samples is not None else pairs


# ---------------------------------------------------------------------------------------------- GQA


def _load_gqa(data: Path, images: Path | None, annotations: Path | None, max_samples: int | None):
    """GQA testdev-balanced as LLaVA runs it (``scripts/v1_5/eval/gqa.sh`` + ``model_vqa_loader.py``).

    References come from GQA's ``testdev_balanced_questions.json`` ({question_id: {"answer", "types", ...}});
    the category is the question's structural type there (verify/query/choose/logical/compare) when known.
    """
    questions = None
    items = []
    for rec, sid in _numbered(data, max_samples):
        qid = rec["question_id"]
        ref, category = _inline_reference(rec), _category(rec)
        if ref is None:
            path = _need_annotations(annotations, data, sid, "GQA's testdev_balanced_questions.json")
            if questions is None:
                questions = _read_json(path)
                if not isinstance(questions, dict):
                    raise DataError(path, "expected GQA's {question_id: question} object")
            entry = questions.get(str(qid))
            if not isinstance(entry, dict):
                raise _fail(path, sid, f"question {qid} is not in the annotations (from {data})")
            ref = entry.get("answer")
            structural = (entry.get("types") or {}).get("structural")
            if structural and category == "all":
                category = str(structural)
        if not isinstance(ref, str) or not ref.strip():
            raise _fail(data, sid, f"GQA reference must be a non-empty string, got {ref!r}")
        items.append(BenchItem(
            id=sid, question=_user_turn(_with_suffix(_text(rec, data, sid), SHORT_ANSWER_PROMPT), True),
            image=_image_path(rec, images, data, sid), reference=ref, category=category,
            meta={"question_id": qid}))
    return items


# ---------------------------------------------------------------------------------------------- ScienceQA


_OPTION_LINE = re.compile(r"^([A-E])\. ")


def _count_option_lines(text: str) -> int:
    """Options are the last lines of a LLaVA ScienceQA prompt: ``A. ...``, ``B. ...`` in order."""
    lines = text.strip().split("\n")
    if lines and lines[-1].strip() == LETTER_PROMPT:
        lines.pop()
    letters = []
    for line in reversed(lines):
        m = _OPTION_LINE.match(line)
        if not m:
            break
        letters.append(m.group(1))
    letters.reverse()
    return len(letters) if letters == list(SQA_OPTIONS[: len(letters)]) else 0


def _sqa_letter(value: Any, n_choices: int, where: Path, sample: str) -> str:
    if isinstance(value, bool):  # bool is an int: never an answer index
        value = None
    if isinstance(value, int) and 0 <= value < min(n_choices, len(SQA_OPTIONS)):
        return SQA_OPTIONS[value]
    if isinstance(value, str) and value.strip() in SQA_OPTIONS[:n_choices]:
        return value.strip()
    raise _fail(where, sample, f"ScienceQA reference must be an option letter or index among {n_choices} "
                               f"choices, got {value!r}")


def _load_sqa_img(data: Path, images: Path | None, annotations: Path | None, max_samples: int | None):
    """ScienceQA test, image subset (SQA-IMG), as LLaVA-1.5 runs it (``model_vqa_science.py`` with
    ``--single-pred-prompt``, scored by ``eval_science_qa.py``'s IMG-Accuracy).

    Records are LLaVA conversations (``id``, ``image``, ``conversations``); only those with an image are kept.
    The prompt is the human turn plus ``"\\nAnswer with the option's letter from the given choices directly."``.
    The reference letter comes from the record's own ``answer`` (letter or index), else from ``problems.json``
    (``answer`` index, ``choices``, ``subject``), else from the record's gpt turn when it is a single letter
    (LLaVA's file has it there).
    """
    records = _read_records(data)
    raw = [str(_raw_id(rec, "id", data, i)) for i, rec in enumerate(records)]
    pairs = [(rec, sid) for rec, sid in zip(records, _unique_ids(raw)) if rec.get("image")]
    if max_samples is not None:
        pairs = pairs[:max_samples]
    problems = None
    items = []
    for rec, sid in pairs:
        turns = rec.get("conversations")
        if not isinstance(turns, list) or not turns or not isinstance(turns[0], dict) or not isinstance(
                turns[0].get("value"), str):
            raise _fail(data, sid, "has no human turn in 'conversations'")
        human = turns[0]["value"]
        n_choices = _count_option_lines(human.replace(IMAGE_TOKEN, ""))
        category = str(rec.get("subject") or rec.get("category") or "all")
        ref = _inline_reference(rec)
        where = data
        if ref is None and annotations is not None:
            path = annotations / "problems.json" if annotations.is_dir() else annotations
            if problems is None:
                problems = _read_json(_existing(path, "ScienceQA problems.json"))
                if not isinstance(problems, dict):
                    raise DataError(path, "expected ScienceQA's {problem_id: problem} object")
            prob = problems.get(str(rec["id"]))
            if not isinstance(prob, dict):
                raise _fail(path, sid, f"problem {rec['id']} is not in problems.json (from {data})")
            if isinstance(prob.get("choices"), list):
                n_choices = len(prob["choices"])
            category = str(prob.get("subject") or category)
            ref, where = prob.get("answer"), path
        if ref is None and len(turns) > 1 and isinstance(turns[1], dict):
            gpt = str(turns[1].get("value", "")).strip()
            ref = gpt if gpt in SQA_OPTIONS else None
        if ref is None:
            raise _fail(data, sid, "carries no reference (no 'answer', no letter in its gpt turn) and no "
                                   "problems.json was given as annotations")
        if n_choices == 0:
            raise _fail(data, sid, "its options ('A. ...' lines) cannot be found and problems.json gives none")
        letter = _sqa_letter(ref, n_choices, where, sid)
        items.append(BenchItem(
            id=sid, question=_user_turn(_with_suffix(human.replace(IMAGE_TOKEN, ""), LETTER_PROMPT), True),
            image=_image_path(rec, images, data, sid), reference=letter, category=category,
            meta={"question_id": rec["id"], "n_choices": n_choices}))
    return items


# ---------------------------------------------------------------------------------------------- TextVQA


def _textvqa_question(text: str) -> str:
    """The question line of a LLaVA TextVQA prompt (``eval_textvqa.py``'s prompt_processor), lowercased."""
    for line in text.split("\n"):
        line = line.strip()
        if line and not line.startswith(OCR_PREFIX) and line != SHORT_ANSWER_PROMPT:
            return line.lower()
    return ""


def _textvqa_prompt(text: str, ocr_tokens: Any) -> str:
    if OCR_PREFIX in text or not isinstance(ocr_tokens, list):
        return _with_suffix(text, SHORT_ANSWER_PROMPT)  # kept byte for byte (an empty OCR line ends in a space)
    body = text.rstrip()
    if body.endswith(SHORT_ANSWER_PROMPT):
        body = body[: -len(SHORT_ANSWER_PROMPT)].rstrip()
    return f"{body}\n{OCR_PREFIX} {', '.join(str(t) for t in ocr_tokens)}\n{SHORT_ANSWER_PROMPT}"


def _load_textvqa(data: Path, images: Path | None, annotations: Path | None, max_samples: int | None):
    """TextVQA val with OCR tokens in the prompt, as LLaVA-1.5 runs it (``llava_textvqa_val_v051_ocr.jsonl``
    through ``model_vqa_loader.py``, scored by ``eval_textvqa.py``).

    LLaVA's file uses the image id as ``question_id`` and finds the annotation by (image id, lowercased
    question); that is the first lookup here, then (image file stem, question), then the TextVQA question id.
    A prompt without a ``Reference OCR token:`` line gets one (``", "``-joined tokens, before the suffix) when
    the record or the annotation has ``ocr_tokens``, as LLaVA's file has it.
    """
    by_pair: dict | None = None
    by_qid: dict | None = None
    items = []
    for rec, sid in _numbered(data, max_samples):
        qid = rec["question_id"]
        text = _text(rec, data, sid)
        image = _image_path(rec, images, data, sid)
        ref, where = _inline_reference(rec), data
        ocr = rec.get("ocr_tokens")
        meta: dict[str, Any] = {"question_id": qid}
        if ref is None:
            path = _need_annotations(annotations, data, sid, "TextVQA_0.5.1_val.json")
            if by_pair is None:
                blob = _read_json(path)
                entries = blob.get("data") if isinstance(blob, dict) else blob
                if not isinstance(entries, list):
                    raise DataError(path, "expected TextVQA's {'data': [...]} annotations")
                by_pair, by_qid = {}, {}
                for e in entries:
                    if isinstance(e, dict) and isinstance(e.get("question"), str):
                        by_pair[(str(e.get("image_id")), e["question"].strip().lower())] = e
                        by_qid[str(e.get("question_id"))] = e
            question = _textvqa_question(text)
            entry = (by_pair.get((str(qid), question)) or by_pair.get((Path(rec["image"]).stem, question)))
            if entry is None:
                entry = by_qid.get(str(qid))
                if entry is not None and entry["question"].strip().lower() != question:
                    raise _fail(path, sid, f"question id {qid} is {entry['question']!r} in the annotations "
                                           f"but {question!r} in {data}")
            if entry is None:
                raise _fail(path, sid, f"no annotation for image {qid!r} / question {question!r} (from {data})")
            ref, where = entry.get("answers"), path
            if ocr is None:
                ocr = entry.get("ocr_tokens")
            meta["textvqa_question_id"] = entry.get("question_id")
        if (not isinstance(ref, list) or len(ref) != TEXTVQA_N_ANSWERS
                or not all(isinstance(a, str) for a in ref)):
            raise _fail(where, sid, f"TextVQA reference must be a list of {TEXTVQA_N_ANSWERS} answer strings, "
                                    f"got {ref!r}")
        items.append(BenchItem(id=sid, question=_user_turn(_textvqa_prompt(text, ocr), True), image=image,
                               reference=list(ref), category=_category(rec), meta=meta))
    return items


# ---------------------------------------------------------------------------------------------- POPE


def _load_pope(data: Path, images: Path | None, annotations: Path | None, max_samples: int | None):
    """POPE (COCO) adversarial / popular / random, as LLaVA-1.5 runs it (``llava_pope_test.jsonl``, scored by
    ``eval_pope.py``). The record's ``category`` is the split.

    ``eval_pope.py`` pairs the n-th answer of a split with the n-th line of ``coco_pope_<split>.json`` (the
    question ids differ: LLaVA's file offsets each split by 10,000,000). The same pairing is used here, and a
    label line that names a different question or image than the record it is paired with is an error.
    """
    if annotations is not None and not annotations.is_dir():
        raise DataError(annotations, "POPE annotations must be the folder holding coco_pope_<split>.json")
    labels: dict[str, list[dict]] = {}
    position: Counter = Counter()
    items = []
    for rec, sid in _numbered(data, max_samples):
        split = _category(rec)
        n = position[split]
        position[split] += 1
        text = _text(rec, data, sid)
        image = _image_path(rec, images, data, sid)
        ref, where = _inline_reference(rec), data
        meta: dict[str, Any] = {"question_id": rec["question_id"], "split": split}
        if ref is None:
            folder = _need_annotations(annotations, data, sid, "the folder of coco_pope_<split>.json")
            if split == "all":
                raise _fail(data, sid, "has no POPE split in 'category', so its label file is unknown")
            label_file = folder / f"coco_pope_{split}.json"
            if split not in labels:
                labels[split] = _read_records(_existing(label_file, f"POPE {split} labels"))
            if n >= len(labels[split]):
                raise _fail(label_file, sid, f"is question {n + 1} of split {split} but the label file has "
                                             f"{len(labels[split])} lines")
            line = labels[split][n]
            question = text.replace(SHORT_ANSWER_PROMPT, "").strip().lower()
            if isinstance(line.get("text"), str) and line["text"].strip().lower() != question:
                raise _fail(label_file, sid, f"label line {n + 1} asks {line['text']!r}, the question file asks "
                                             f"{question!r}: files out of step")
            if isinstance(line.get("image"), str) and Path(line["image"]).name != Path(rec["image"]).name:
                raise _fail(label_file, sid, f"label line {n + 1} is for image {line['image']!r}, the question "
                                             f"is for {rec['image']!r}: files out of step")
            ref, where = line.get("label"), label_file
            meta["label_line"] = n + 1
        items.append(BenchItem(id=sid, question=_user_turn(_with_suffix(text, SHORT_ANSWER_PROMPT), True),
                               image=image, reference=_yes_no(ref, where, sid), category=split, meta=meta))
    return items


# ---------------------------------------------------------------------------------------------- MME


def _mme_key(question: str) -> str:
    q = question.replace(SHORT_ANSWER_PROMPT, "").replace(YES_NO_PROMPT, "")
    return " ".join(q.split()).lower()


def _load_mme(data: Path, images: Path | None, annotations: Path | None, max_samples: int | None):
    """MME, as LLaVA-1.5 runs it (``llava_mme.jsonl`` through ``model_vqa_loader.py``, then
    ``convert_answer_to_mme.py`` and MME's ``eval_tool/calculation.py``).

    ``question_id`` is ``<category>/[images/]<file>`` and each image is asked twice (one yes, one no). The
    ground truth is in the MME release folder (``annotations``, else the ``images`` folder, which LLaVA points
    at the same place): ``<category>/questions_answers_YN/<stem>.txt`` when the category has an ``images``
    folder, else ``<category>/<stem>.txt``; each line ``question<TAB>Yes|No``, the question ending with
    ``Please answer yes or no.``. LLaVA's prompt swaps that for the short-answer suffix; questions are matched
    with both suffixes removed and whitespace collapsed.
    """
    root = annotations if annotations is not None else images
    gt_files: dict[Path, list[tuple[str, str]]] = {}
    items = []
    for rec, sid in _numbered(data, max_samples):
        qid = str(rec["question_id"])
        category = str(rec.get("category") or qid.split("/")[0])
        text = _text(rec, data, sid)
        image = _image_path(rec, images, data, sid)
        ref, where = _inline_reference(rec), data
        if ref is None:
            if root is None:
                raise _fail(data, sid, "carries no reference and no MME release folder was given as annotations")
            cat_dir = root / category
            qa_dir = cat_dir / "questions_answers_YN" if (cat_dir / "images").is_dir() else cat_dir
            gt_file = qa_dir / (qid.split("/")[-1].split(".")[0] + ".txt")
            if gt_file not in gt_files:
                _existing(gt_file, f"MME ground truth for {qid}")
                pairs = []
                for n, line in enumerate(_read_text(gt_file).splitlines(), 1):
                    if not line.strip():
                        continue
                    parts = line.strip().split("\t")
                    if len(parts) != 2:
                        raise DataError(gt_file, f"line {n} is not 'question<TAB>answer'")
                    pairs.append((_mme_key(parts[0]), parts[1]))
                gt_files[gt_file] = pairs
            key = _mme_key(text)
            found = [a for q, a in gt_files[gt_file] if q == key]
            if not found:
                raise _fail(gt_file, sid, f"question {key!r} is not in the ground-truth file (from {data})")
            ref, where = found[0], gt_file
        items.append(BenchItem(
            id=sid, question=_user_turn(_with_suffix(text, SHORT_ANSWER_PROMPT), True), image=image,
            reference=_yes_no(ref, where, sid), category=category,
            meta={"question_id": rec["question_id"], "image_key": qid}))
    return items


# ---------------------------------------------------------------------------------------------- MMBench


def _is_none(value: Any) -> bool:
    """Empty cells, as LLaVA's ``is_none`` (NaN, 'nan', 'none') sees pandas' reading of them."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in ("", "nan", "none")


def _read_tsv(path: Path) -> list[dict]:
    old = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)  # base64 images are far longer than csv's default 128 KiB field
    try:
        return list(csv.DictReader(io.StringIO(_read_text(path), newline=""), delimiter="\t"))
    except csv.Error as e:
        raise DataError(path, f"not a readable TSV ({e})") from e
    finally:
        csv.field_size_limit(old)


def _load_mmbench(data: Path, images: Path | None, annotations: Path | None, max_samples: int | None):
    """MMBench dev, as LLaVA-1.5 runs it (``model_vqa_mmbench.py --single-pred-prompt``).

    The TSV holds ``index, question, hint, A, B, C, D, answer, category, l2-category, image`` (base64). The
    prompt is ``[hint\\n]question`` then ``\\nA. option`` for each option up to the first empty one, then
    ``\\nAnswer with the option's letter from the given choices directly.``. Rows with index >= 1,000,000 are
    the circularly rotated copies of row ``index % 1,000,000`` (CircularEval); an image cell that holds only
    an index refers to that row's image, as in OpenCompass's TSVs.
    """
    rows = _read_tsv(data)
    if rows and not {"index", "question", "image"} <= set(rows[0]):
        raise DataError(data, f"MMBench TSV needs columns index, question, image; has {sorted(rows[0])}")
    indices = []
    for n, row in enumerate(rows, 2):
        try:
            indices.append(int(float(row["index"])))
        except (TypeError, ValueError) as e:
            raise DataError(data, f"line {n} has index {row.get('index')!r}, not an integer") from e
    by_index = dict(zip(indices, rows))
    if max_samples is not None:
        rows, indices = rows[:max_samples], indices[:max_samples]
    items = []
    for index, row in zip(indices, rows):
        sid = str(index)
        options = {}
        for letter in MMBENCH_OPTIONS:
            if _is_none(row.get(letter)):
                break
            options[letter] = row[letter]
        if len(options) < 2:
            raise _fail(data, sid, "has fewer than two options")
        ref = row.get("answer")
        ref = None if _is_none(ref) else ref.strip()
        if ref is None:
            raise _fail(data, sid, "has no 'answer' (MMBench references come from the TSV's answer column)")
        if ref not in options:
            raise _fail(data, sid, f"answer must be one of the options {list(options)}, got {ref!r}")
        question = row["question"]
        if not _is_none(row.get("hint")):
            question = f"{row['hint']}\n{question}"
        for letter, option in options.items():
            question = f"{question}\n{letter}. {option}"
        question = f"{IMAGE_TOKEN}\n{question}\n{LETTER_PROMPT}"
        b64 = row.get("image") or ""
        if b64.strip().isdigit() and len(b64.strip()) <= 64:
            target = by_index.get(int(b64.strip()))
            if target is None:
                raise _fail(data, sid, f"image refers to index {b64.strip()}, which is not in the file")
            b64 = target.get("image") or ""
        if not b64.strip():
            raise _fail(data, sid, "has no image")
        try:
            image_bytes = base64.b64decode("".join(b64.split()), validate=True)
            with Image.open(io.BytesIO(image_bytes)) as im:
                im.size  # noqa: B018 - reads the header only: a bad image fails here, not mid-generation
        except (binascii.Error, ValueError, UnidentifiedImageError, OSError) as e:
            raise _fail(data, sid, f"image is not a base64-encoded image ({e})") from e
        l2 = row.get("l2-category", row.get("l2_category"))
        items.append(BenchItem(
            id=sid, question=question, image=None, reference=ref,
            category="all" if _is_none(row.get("category")) else row["category"],
            meta={"question_id": index, "index": index, "group": index % MMBENCH_CIRCULAR_MOD,
                  "options": options, "hint": None if _is_none(row.get("hint")) else row["hint"],
                  "l2_category": None if _is_none(l2) else l2},
            image_bytes=image_bytes))
    return items


_LOADERS = {"gqa": _load_gqa, "sqa_img": _load_sqa_img, "textvqa": _load_textvqa, "pope": _load_pope,
            "mme": _load_mme, "mmbench": _load_mmbench}
