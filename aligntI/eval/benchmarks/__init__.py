"""The benchmarks of LLaVA-1.5-style evaluation, one module each, and their registry :data:`BENCHMARKS`.

Each module (``gqa.py``, ``sqa_img.py``, ...) reads its benchmark's files from LLaVA-1.5's evaluation set (the
``playground/data/eval/<bench>/`` layout) into :class:`BenchItem` s (the exact user turn LLaVA sends to the
model, the image, the reference), scores generated answers with the convention behind the paper's numbers
(its docstrings name the script reproduced) and gives the benchmark's title in the score table. A new
benchmark is a new module plus its line in :data:`BENCHMARKS`.

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

from pathlib import Path

from aligntI.data.records import DataError
from aligntI.eval.benchmarks import gqa, mmbench, mme, pope, sqa_img, textvqa
from aligntI.eval.benchmarks.common import (
    LETTER_PROMPT,
    SHORT_ANSWER_PROMPT,
    BenchItem,
    Benchmark,
    BenchScore,
    existing,
)

__all__ = ["BENCHMARKS", "LETTER_PROMPT", "SHORT_ANSWER_PROMPT", "BenchItem", "BenchScore", "Benchmark",
           "load_benchmark", "title_of"]

# The order of the score table's columns.
BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (gqa.BENCHMARK, sqa_img.BENCHMARK, textvqa.BENCHMARK,
                                                        pope.BENCHMARK, mme.BENCHMARK, mmbench.BENCHMARK)}


def title_of(name: str) -> str:
    """A benchmark's column title in the score table; a name outside the registry stands for itself."""
    return BENCHMARKS[name].title if name in BENCHMARKS else name


def load_benchmark(name: str, data: str | Path, images: str | Path | None = None,
                   annotations: str | Path | None = None, max_samples: int | None = None) -> list[BenchItem]:
    """Read one benchmark's question file (plus its references) into :class:`BenchItem` s.

    ``images`` is the image folder (image paths in the file are relative to it; without it, relative to the
    data file's folder). ``max_samples`` keeps the first N questions (for SQA-IMG: the first N with an image).
    MMBench takes its images and answers from the TSV and ignores ``images`` and ``annotations``.
    """
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    if max_samples is not None and (not isinstance(max_samples, int) or max_samples < 1):
        raise ValueError(f"max_samples must be a positive integer or None, got {max_samples!r}")
    bench = BENCHMARKS[name]
    data = existing(data, f"{name} question file")
    if bench.folders:
        if images is not None:
            images = Path(images)
            if not images.is_dir():
                raise DataError(data, f"{name} image folder {images} not found")
        if annotations is not None:
            annotations = Path(annotations)
            if not annotations.exists():
                raise DataError(data, f"{name} annotations {annotations} not found")
    items = bench.read_questions(data, images, annotations, max_samples)
    if not items:
        raise DataError(data, f"holds no {name} questions")
    return items
