"""DigitGrid: a tiny multimodal VQA task built from scikit-learn's 8x8 handwritten digits.

Why it exists: the repo distils multimodal (vision + language) teachers into students, and we need an
example that trains end-to-end on a CPU in minutes, ships with no download, and still exercises what makes
multimodal KD interesting:

* instruction-dependent visual focus -- every image holds four digits in a 2x2 grid and the question decides
  which of them matter (one cell, one row/column, or all four), so the model cannot answer from the image
  alone nor from the text alone;
* multi-token answers -- "read"/"sum"/"odd" answers are several words long, so sequence-level distillation
  and teacher forcing behave differently from single-token classification.

Source digits (``sklearn.datasets.load_digits``, 1797 images) are split into disjoint train/val/test pools
so that test accuracy measures generalisation to unseen handwriting, not memorised pixels. The dataset is
written in LLaVA format (one JSON array per split plus PNGs) so the same loaders work for real VQA data.

Categories (drawn uniformly):

==========  ==============================  =============================================================
``pos``     ``what <pos> ?``                the digit at that cell, e.g. ``7``
``read``    ``read top row`` etc.           the line's two digits in order, e.g. ``3 5``
``sum``     ``sum left column`` etc.        decimal digits of the line sum, e.g. ``9`` or ``1 2``
``odd``     ``which odd ?``                 cells holding odd digits in TL,TR,BL,BR order, or ``none``
==========  ==============================  =============================================================
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

CATEGORIES = ("pos", "read", "sum", "odd")
SPLITS = ("train", "val", "test")
POSITIONS = ("top-left", "top-right", "bottom-left", "bottom-right")  # grid order TL, TR, BL, BR
# Each line: (question words, cell indices in reading order).
LINES = (
    ("top row", (0, 1)),
    ("bottom row", (2, 3)),
    ("left column", (0, 2)),
    ("right column", (1, 3)),
)
VAL_POOL, TEST_POOL = 200, 300
UPSCALE = 2
IMAGE_SIZE = 16 * UPSCALE
FORMAT_VERSION = 1  # bump when the generator changes so cached datasets are rebuilt
META_NAME = "digitgrid.json"

# v -> round(v/16*255) for v in 0..16; a table keeps the rounding identical everywhere.
LEVELS = np.round(np.arange(17) / 16 * 255).astype(np.uint8)


def vocabulary() -> list[str]:
    """Every word that can appear in a question or answer (the ``<image>`` placeholder excluded)."""
    digits = [str(d) for d in range(10)]
    words = ["what", "read", "sum", "which", "odd", "row", "column"]
    words += ["top", "bottom", "left", "right", "none", "?"]
    return digits + list(POSITIONS) + words


@lru_cache(maxsize=1)
def load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = d.images.astype(np.int64)
    labels = d.target.astype(np.int64)
    images.flags.writeable = False  # shared via the cache
    labels.flags.writeable = False
    return images, labels


def split_pools(seed: int) -> dict[str, np.ndarray]:
    """Disjoint source-image indices per split (seeded permutation: test 300, val 200, train the rest)."""
    images, _ = load_digits()
    perm = np.random.default_rng(seed).permutation(len(images))
    return {
        "test": np.sort(perm[:TEST_POOL]),
        "val": np.sort(perm[TEST_POOL : TEST_POOL + VAL_POOL]),
        "train": np.sort(perm[TEST_POOL + VAL_POOL :]),
    }


def render_grid(digit_images: np.ndarray) -> np.ndarray:
    """(4, 8, 8) values 0..16 -> uint8 RGB [32, 32, 3] with cells TL, TR, BL, BR, 2x nearest upscaling."""
    cells = LEVELS[np.asarray(digit_images, dtype=np.int64)]
    grid = np.block([[cells[0], cells[1]], [cells[2], cells[3]]])
    grid = grid.repeat(UPSCALE, axis=0).repeat(UPSCALE, axis=1)
    return np.repeat(grid[:, :, None], 3, axis=2)


def make_example(
    digit_images: np.ndarray, labels, category: str, rng: np.random.Generator
) -> tuple[np.ndarray, str, str]:
    """Build one (image, question, answer) from 4 source digits in TL, TR, BL, BR order. Pure given ``rng``."""
    digit_images = np.asarray(digit_images)
    if digit_images.shape != (4, 8, 8):
        raise ValueError(f"digit_images must have shape (4, 8, 8), got {digit_images.shape}")
    labels = [int(x) for x in np.asarray(labels).reshape(-1)]
    if len(labels) != 4 or not all(0 <= x <= 9 for x in labels):
        raise ValueError(f"labels must be 4 digits 0..9, got {labels}")

    if category == "pos":
        k = int(rng.integers(4))
        question, answer = f"what {POSITIONS[k]} ?", str(labels[k])
    elif category in ("read", "sum"):
        name, (a, b) = LINES[int(rng.integers(4))]
        question = f"{category} {name}"
        if category == "read":
            answer = f"{labels[a]} {labels[b]}"
        else:
            answer = " ".join(str(labels[a] + labels[b]))  # 12 -> "1 2": one token per decimal digit
    elif category == "odd":
        question = "which odd ?"
        answer = " ".join(p for p, x in zip(POSITIONS, labels) if x % 2) or "none"
    else:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
    return render_grid(digit_images), question, answer


def png_bytes(image: np.ndarray) -> bytes:
    # Encode in memory then write once: cheaper than letting PIL open the file, and PNG output carries no
    # timestamp, so identical pixels give identical bytes.
    buf = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _params(train_size: int, val_size: int, test_size: int, seed: int) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "seed": int(seed),
        "sizes": {"train": int(train_size), "val": int(val_size), "test": int(test_size)},
    }


def hash_splits(out: Path, splits: tuple[str, ...] = SPLITS) -> str:
    h = hashlib.sha256()
    for split in splits:
        h.update(f"{split}.json\0".encode())
        h.update((out / f"{split}.json").read_bytes())
    return h.hexdigest()


def _try_reuse(out: Path, params: dict) -> dict | None:
    """Return cached metadata if the dataset on disk was built with ``params`` and looks intact."""
    try:
        meta = json.loads((out / META_NAME).read_text())
        if {k: meta.get(k) for k in params} != params or meta.get("sha256") != hash_splits(out):
            return None
        for split in SPLITS:
            names = {e.name for e in os.scandir(out / "images" / split)}
            if any(f"{i:06d}.png" not in names for i in range(params["sizes"][split])):
                return None
    except (OSError, ValueError):
        return None
    return meta


def write_digitgrid(
    out_dir,
    *,
    train_size: int = 30000,
    val_size: int = 500,
    test_size: int = 1000,
    seed: int = 1234,
    progress: bool = True,
) -> dict:
    """Write DigitGrid in LLaVA format under ``out_dir`` and return its metadata.

    Deterministic: the same arguments give byte-identical files. If ``out_dir/digitgrid.json`` already
    describes the same parameters (and the split files match its hash), nothing is rewritten.
    """
    out = Path(out_dir)
    params = _params(train_size, val_size, test_size, seed)
    if any(n < 0 for n in params["sizes"].values()):
        raise ValueError(f"split sizes must be >= 0, got {params['sizes']}")
    meta = _try_reuse(out, params)
    if meta is not None:
        print(f"digitgrid: reusing existing dataset at {out}")
        return meta

    images, labels = load_digits()
    pools = split_pools(seed)
    out.mkdir(parents=True, exist_ok=True)
    # Metadata goes last; remove the old one first so an interrupted rewrite is never mistaken for complete.
    (out / META_NAME).unlink(missing_ok=True)

    total = sum(params["sizes"].values())
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="digitgrid", unit="img")

    for split_idx, split in enumerate(SPLITS):
        n = params["sizes"][split]
        pool = pools[split]
        img_dir = out / "images" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        # One stream per split, independent of the other splits' sizes: growing train keeps val/test fixed.
        rng = np.random.default_rng([int(seed), split_idx])
        records = []
        for i in range(n):
            category = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
            src = pool[rng.choice(len(pool), size=4, replace=False)]
            image, question, answer = make_example(images[src], labels[src], category, rng)
            rel = f"images/{split}/{i:06d}.png"
            (out / rel).write_bytes(png_bytes(image))
            records.append(
                {
                    "id": f"{split}-{i:06d}",
                    "image": rel,
                    "category": category,
                    "conversations": [
                        {"from": "human", "value": f"<image>\n{question}"},
                        {"from": "gpt", "value": answer},
                    ],
                }
            )
            if bar is not None:
                bar.update(1)
        # Drop PNGs left over from an earlier, larger build so the folder matches the JSON.
        for entry in os.scandir(img_dir):
            stem, ext = os.path.splitext(entry.name)
            if ext == ".png" and stem.isdigit() and len(stem) == 6 and int(stem) >= n:
                os.remove(entry.path)
        (out / f"{split}.json").write_text(json.dumps(records, indent=1) + "\n")
    if bar is not None:
        bar.close()

    meta = {
        **params,
        "name": "digitgrid",
        "image_size": [IMAGE_SIZE, IMAGE_SIZE, 3],
        "categories": list(CATEGORIES),
        "pool_sizes": {s: len(pools[s]) for s in SPLITS},
        "pools": {s: pools[s].tolist() for s in SPLITS},
        "vocabulary": vocabulary(),
        "sha256": hash_splits(out),
    }
    (out / META_NAME).write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def write_tokenizer(out_dir):
    """A word-level tokenizer trained on the text of ``out_dir/train.json``, saved in ``out_dir/tokenizer``."""
    from aligntI.models.builder import wordlevel_tokenizer

    records = json.loads(Path(out_dir, "train.json").read_text())
    # The role words come from the chat template; everything else from the task's own text.
    corpus = ["USER: ASSISTANT:"] + [t["value"].replace("<image>", " ") for r in records for t in r["conversations"]]
    tokenizer = wordlevel_tokenizer(corpus)
    tokenizer.save_pretrained(Path(out_dir, "tokenizer"))
    return tokenizer


def write_digitgrid_with_tokenizer(out_dir, **digitgrid_args):
    """Write DigitGrid (:func:`write_digitgrid`, which ``digitgrid_args`` go to) and, in ``out_dir/tokenizer``, a
    word-level tokenizer trained on its text (:func:`write_tokenizer`); returns the metadata and the tokenizer."""
    meta = write_digitgrid(out_dir, **digitgrid_args)
    return meta, write_tokenizer(out_dir)
