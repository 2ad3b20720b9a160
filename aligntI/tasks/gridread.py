"""GridRead: DigitGrid's sibling with room for Align-TI's two mechanisms: localized questions, long answers.

DigitGrid's 2x2 grid has 16 vision tokens and questions about 25-100% of them, with 1-4-token answers, so
teacher-attention IVA weights cover nearly the tokens uniform weights do, and TPA has few transitions to
align. GridRead puts ``grid`` x ``grid`` handwritten digits (default 4x4: 64 px at 2x, 64 vision tokens with
patch 8, one cell = 4 tokens = 6% of them) in one image, and asks questions whose relevant region ranges from
one cell to the whole grid, many with long structured answers:

============  ==========================  ===========================================  ================  =======
category      question (phrasing 0)       answer                                       relevant cells    items
============  ==========================  ===========================================  ================  =======
``cell``      ``what row 2 column 3 ?``   the digit, ``7``                             1                 digits
``row``       ``read row 2``              the row's digits, ``3 5 1 2``                a row             digits
``column``    ``read column 3``           the column's digits, top to bottom           a column          digits
``row_sum``   ``sum row 2``               decimal digits of the sum, ``1 8``           a row             number
``where``     ``where 7 ?``               row-column pairs in reading order,           all               pairs
                                          ``1 3 , 4 2``, or ``none``
``grid``      ``read grid``               every digit row by row, rows separated by    all               digits
                                          ``,`` (``row_separator``): 19 tokens at 4x4
``row_sums``  ``sum each row``            every row's sum, ``1 8 , 2 2 , 9 , 3 0``     all               numbers
``two_rows``  ``read rows 4 and 2``       both rows in the order asked, ``,`` between  two rows          digits
============  ==========================  ===========================================  ================  =======

Rows and columns are numbered from 1. ``two_rows`` is a long answer that needs addressing (9 words at 4x4): it is
not in the default mix, so the default data stay as they were; add it with ``mix``. Every record holds its
``category``, the ``cells`` the question is about (row-major indices) and how its answer splits into ``items``
(``item_sep``: ``space``, each word but ``,`` an item; ``comma``, each ``,``-separated group), so a long answer is
scored per item as well as all-or-nothing (:mod:`aligntI.eval.items`). Options (grid size, question mix, phrasings,
answer form, upscaling) are :class:`GridReadOptions` (also ``address``: ``row 2 column 3`` or one word, ``r2c3``),
recorded in ``gridread.json``; the same options and seed give byte-identical files.
The source-digit pools per split are DigitGrid's: disjoint, so test accuracy measures unseen handwriting.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from aligntI.tasks.digitgrid import LEVELS, hash_splits, load_digits, png_bytes, split_pools, write_tokenizer

CATEGORIES = ("cell", "row", "column", "row_sum", "where", "grid", "row_sums", "two_rows")
SPLITS = ("train", "val", "test")
# Question wordings per category, in order: ``phrasings: k`` draws uniformly among the first k.
PHRASINGS = {
    "cell": ("what row {r} column {c} ?", "digit at row {r} column {c} ?", "read cell {r} {c}"),
    "row": ("read row {r}", "list row {r}", "what is in row {r} ?"),
    "column": ("read column {c}", "list column {c}", "what is in column {c} ?"),
    "row_sum": ("sum row {r}", "add row {r}", "what is the sum of row {r} ?"),
    "where": ("where {d} ?", "find {d}", "which cells hold {d} ?"),
    "grid": ("read grid", "list every digit", "what is in the grid ?"),
    "row_sums": ("sum each row", "add each row", "what are the row sums ?"),
    "two_rows": ("read rows {r} and {s}", "list rows {r} and {s}", "what is in rows {r} and {s} ?"),
}
# ``address: word``: a cell question names its cell with one word, ``r2c3`` (row 2, column 3), as DigitGrid's
# ``top-left`` does, instead of the two numbers of ``row 2 column 3``.
CELL_WORD_PHRASINGS = ("what {rc} ?", "digit at {rc} ?", "read cell {rc}")
ADDRESSES = ("pair", "word")
# How an answer splits into the items per-item accuracy counts (aligntI.eval.items.answer_items).
ITEM_SEP = {"cell": "space", "row": "space", "column": "space", "row_sum": "comma", "where": "comma",
            "grid": "space", "row_sums": "comma", "two_rows": "space"}
DIGIT_PX = 8  # scikit-learn's digits are 8x8
FORMAT_VERSION = 1  # bump when the generator changes so cached datasets are rebuilt
META_NAME = "gridread.json"


@dataclass(frozen=True)
class GridReadOptions:
    """The generator's knobs; every one is recorded in ``gridread.json`` and decides the data."""

    grid: int = 4  # cells per side, 2..9 (row and column numbers are single words)
    upscale: int = 2  # nearest-neighbour factor: image side = grid * 8 * upscale px
    # Relative weight of each category (0 leaves it out); answers of 8+ tokens: row/column at grid >= 4,
    # grid, row_sums and many where.
    mix: dict[str, float] = field(default_factory=lambda: {
        "cell": 3.0, "row": 1.5, "column": 1.5, "row_sum": 1.0, "where": 1.0, "grid": 1.5, "row_sums": 1.5})
    phrasings: int = 1  # wordings per category, 1..3
    address: str = "pair"  # how a cell question names its cell: "pair", row 2 column 3; "word", r2c3
    row_separator: bool = True  # "," between rows in grid answers
    train_size: int = 30000
    val_size: int = 500
    test_size: int = 1000
    seed: int = 1234

    def validate(self) -> None:
        if not 2 <= self.grid <= 9:
            raise ValueError(f"grid must be 2..9 (row and column numbers are single digits), got {self.grid}")
        if self.upscale < 1:
            raise ValueError(f"upscale must be >= 1, got {self.upscale}")
        unknown = set(self.mix) - set(CATEGORIES)
        if unknown:
            raise ValueError(f"mix: unknown categories {sorted(unknown)}; known: {', '.join(CATEGORIES)}")
        if any(w < 0 for w in self.mix.values()) or sum(self.mix.values()) <= 0:
            raise ValueError(f"mix: weights must be >= 0 with a positive sum, got {self.mix}")
        if self.address not in ADDRESSES:
            raise ValueError(f"address must be one of {', '.join(ADDRESSES)}, got {self.address!r}")
        if not 1 <= self.phrasings <= 3:
            raise ValueError(f"phrasings must be 1..3, got {self.phrasings}")
        if min(self.train_size, self.val_size, self.test_size) < 0:
            raise ValueError("split sizes must be >= 0")
        if self.grid * self.grid > min(len(p) for p in split_pools(self.seed).values()):
            raise ValueError(f"grid {self.grid} needs more digits per image than a split's pool holds")

    @property
    def image_size(self) -> int:
        return self.grid * DIGIT_PX * self.upscale

    def sizes(self) -> dict[str, int]:
        return {"train": self.train_size, "val": self.val_size, "test": self.test_size}


def parse_options(pairs: list[str]) -> GridReadOptions:
    """``key=value`` strings (``mix`` as ``cat:weight,cat:weight``; unnamed categories get 0) -> options."""
    defaults = GridReadOptions()
    kwargs: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in asdict(defaults):
            raise ValueError(f"task option {pair!r}: expected key=value with key one of {', '.join(asdict(defaults))}")
        if key == "mix":
            mix = {}
            for part in value.split(","):
                cat, colon, weight = part.partition(":")
                if not colon:
                    raise ValueError(f"task option mix: expected cat:weight,..., got {value!r}")
                mix[cat.strip()] = float(weight)
            kwargs[key] = mix
        elif key == "row_separator":
            if value.lower() not in ("true", "false"):
                raise ValueError(f"task option row_separator: expected true or false, got {value!r}")
            kwargs[key] = value.lower() == "true"
        elif key == "address":
            kwargs[key] = value
        else:
            try:
                kwargs[key] = int(value)
            except ValueError:
                raise ValueError(f"task option {key}: expected an integer, got {value!r}") from None
    options = GridReadOptions(**kwargs)
    options.validate()
    return options


def vocabulary(options: GridReadOptions) -> list[str]:
    """Every word that can appear in a question or answer at ``options``."""
    words = [str(d) for d in range(10)] + [",", "none"]
    for category, forms in PHRASINGS.items():
        if category == "cell" and options.address == "word":
            forms = CELL_WORD_PHRASINGS
            words += [f"r{r}c{c}" for r in range(1, options.grid + 1) for c in range(1, options.grid + 1)]
        for form in forms[: options.phrasings]:
            words += [w for w in form.split() if not w.startswith("{")]
    return list(dict.fromkeys(words))


def render(digit_images: np.ndarray, grid: int, upscale: int) -> np.ndarray:
    """(grid², 8, 8) values 0..16 in row-major cell order -> uint8 RGB image, nearest upscaling."""
    cells = LEVELS[np.asarray(digit_images, dtype=np.int64)].reshape(grid, grid, DIGIT_PX, DIGIT_PX)
    image = cells.transpose(0, 2, 1, 3).reshape(grid * DIGIT_PX, grid * DIGIT_PX)
    image = image.repeat(upscale, axis=0).repeat(upscale, axis=1)
    return np.repeat(image[:, :, None], 3, axis=2)


def _number(n: int) -> str:
    return " ".join(str(n))  # 18 -> "1 8": one token per decimal digit


def make_question(labels: list[int], category: str, options: GridReadOptions,
                  rng: np.random.Generator) -> tuple[str, str, list[int]]:
    """(question, answer, relevant cells) for a grid of ``labels`` (row-major). Pure given ``rng``."""
    n = options.grid
    if len(labels) != n * n:
        raise ValueError(f"expected {n * n} labels for a {n}x{n} grid, got {len(labels)}")
    rows = [labels[r * n : (r + 1) * n] for r in range(n)]
    form = PHRASINGS[category][int(rng.integers(options.phrasings))]
    if category == "cell":
        r, c = int(rng.integers(n)), int(rng.integers(n))
        if options.address == "word":
            question = CELL_WORD_PHRASINGS[PHRASINGS[category].index(form)].format(rc=f"r{r + 1}c{c + 1}")
        else:
            question = form.format(r=r + 1, c=c + 1)
        return question, str(rows[r][c]), [r * n + c]
    if category in ("row", "row_sum"):
        r = int(rng.integers(n))
        answer = " ".join(map(str, rows[r])) if category == "row" else _number(sum(rows[r]))
        return form.format(r=r + 1), answer, [r * n + c for c in range(n)]
    if category == "column":
        c = int(rng.integers(n))
        return form.format(c=c + 1), " ".join(str(rows[r][c]) for r in range(n)), [r * n + c for r in range(n)]
    if category == "two_rows":
        r, s = (int(x) for x in rng.choice(n, size=2, replace=False))  # two different rows, in either order
        answer = " , ".join(" ".join(map(str, rows[x])) for x in (r, s))
        return form.format(r=r + 1, s=s + 1), answer, [x * n + c for x in sorted((r, s)) for c in range(n)]
    everything = list(range(n * n))
    if category == "where":
        d = int(rng.integers(10))
        hits = [f"{i // n + 1} {i % n + 1}" for i, x in enumerate(labels) if x == d]
        return form.format(d=d), " , ".join(hits) or "none", everything
    if category == "grid":
        sep = " , " if options.row_separator else " "
        return form, sep.join(" ".join(map(str, row)) for row in rows), everything
    if category == "row_sums":
        return form, " , ".join(_number(sum(row)) for row in rows), everything
    raise ValueError(f"unknown category {category!r}; expected one of {', '.join(CATEGORIES)}")


def cell_token_mask(cells: list[int], grid: int, patch_grid: int) -> np.ndarray:
    """Bool ``[patch_grid²]`` (row-major patches): the vision tokens that cover ``cells`` of a ``grid``² image."""
    if patch_grid % grid:
        raise ValueError(f"a {patch_grid}x{patch_grid} patch grid does not split into {grid}x{grid} cells")
    k = patch_grid // grid
    mask = np.zeros((patch_grid, patch_grid), dtype=bool)
    for cell in cells:
        r, c = divmod(cell, grid)
        mask[r * k : (r + 1) * k, c * k : (c + 1) * k] = True
    return mask.reshape(-1)


def _params(options: GridReadOptions) -> dict:
    return {"format_version": FORMAT_VERSION, "options": asdict(options)}


def _reusable(out: Path, params: dict) -> dict | None:
    try:
        meta = json.loads((out / META_NAME).read_text())
        if {k: meta.get(k) for k in params} != params or meta.get("sha256") != hash_splits(out, SPLITS):
            return None
    except (OSError, ValueError):
        return None
    return meta


def write_gridread(out_dir, options: GridReadOptions | None = None, *, progress: bool = True) -> dict:
    """Write GridRead in LLaVA format (``{split}.json`` + PNGs) and ``gridread.json``; returns the metadata.
    An identical dataset already in ``out_dir`` is reused."""
    options = options or GridReadOptions()
    options.validate()
    out = Path(out_dir)
    params = _params(options)
    meta = _reusable(out, params)
    if meta is not None:
        print(f"gridread: reusing existing dataset at {out}")
        return meta
    images, labels = load_digits()
    pools = split_pools(options.seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / META_NAME).unlink(missing_ok=True)  # written last: an interrupted build is never taken as complete
    cats = [c for c in CATEGORIES if options.mix.get(c, 0) > 0]
    weights = np.array([options.mix[c] for c in cats], dtype=np.float64)
    weights /= weights.sum()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(options.sizes().values()), desc="gridread", unit="img")
    for split_idx, split in enumerate(SPLITS):
        n = options.sizes()[split]
        pool = pools[split]
        img_dir = out / "images" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([options.seed, split_idx])  # one stream per split
        records = []
        for i in range(n):
            category = cats[int(rng.choice(len(cats), p=weights))]
            src = pool[rng.choice(len(pool), size=options.grid**2, replace=False)]
            question, answer, cells = make_question([int(x) for x in labels[src]], category, options, rng)
            rel = f"images/{split}/{i:06d}.png"
            (out / rel).write_bytes(png_bytes(render(images[src], options.grid, options.upscale)))
            records.append({
                "id": f"{split}-{i:06d}", "image": rel, "category": category, "cells": cells,
                "item_sep": ITEM_SEP[category],
                "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                  {"from": "gpt", "value": answer}],
            })
            if bar is not None:
                bar.update(1)
        for entry in os.scandir(img_dir):  # PNGs of an earlier, larger build
            stem, ext = os.path.splitext(entry.name)
            if ext == ".png" and stem.isdigit() and int(stem) >= n:
                os.remove(entry.path)
        (out / f"{split}.json").write_text(json.dumps(records, indent=1) + "\n")
    if bar is not None:
        bar.close()
    meta = {**params, "name": "gridread", "image_size": [options.image_size, options.image_size, 3],
            "categories": cats, "pools": {s: pools[s].tolist() for s in SPLITS},
            "vocabulary": vocabulary(options), "sha256": hash_splits(out, SPLITS)}
    (out / META_NAME).write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def write_gridread_with_tokenizer(out_dir, options: GridReadOptions | None = None, **kwargs):
    """:func:`write_gridread` and a word-level tokenizer trained on its text in ``out_dir/tokenizer``."""
    meta = write_gridread(out_dir, options, **kwargs)
    return meta, write_tokenizer(out_dir)
