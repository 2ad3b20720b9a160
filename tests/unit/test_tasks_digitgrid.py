"""DigitGrid: determinism, disjoint splits, correct answers, vocabulary, image layout."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aligntI.tasks import digitgrid as dg

SIZES = {"train_size": 200, "val_size": 20, "test_size": 40}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("dg")
    meta = dg.write_digitgrid(out, seed=7, progress=False, **SIZES)
    return out, meta


def _digit_cells(labels):
    """Synthetic (4, 8, 8) images whose cells are distinguishable: cell k is filled with value 4*k+1."""
    return np.stack([np.full((8, 8), 4 * k + 1) for k in range(4)]), np.asarray(labels)


def test_determinism(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    dg.write_digitgrid(a, seed=3, progress=False, **SIZES)
    dg.write_digitgrid(b, seed=3, progress=False, **SIZES)
    dg.write_digitgrid(c, seed=4, progress=False, **SIZES)
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert len(fa) == sum(SIZES.values()) + 4  # PNGs + 3 split files + metadata
    assert fa == fb
    assert fa["train.json"] != fc["train.json"]
    assert fa["images/train/000000.png"] != fc["images/train/000000.png"]


def test_reuse_and_regenerate(tmp_path, capsys):
    meta = dg.write_digitgrid(tmp_path, seed=3, progress=False, **SIZES)
    capsys.readouterr()
    assert dg.write_digitgrid(tmp_path, seed=3, progress=False, **SIZES) == meta
    assert "reus" in capsys.readouterr().out
    # Smaller train split: regenerated, and the surplus PNGs are gone.
    small = dg.write_digitgrid(tmp_path, seed=3, progress=False, train_size=50, val_size=20, test_size=40)
    assert small["sizes"]["train"] == 50
    assert len(list((tmp_path / "images" / "train").glob("*.png"))) == 50
    assert len(json.loads((tmp_path / "train.json").read_text())) == 50


def test_split_pools_disjoint(written):
    out, meta = written
    pools = {s: set(meta["pools"][s]) for s in dg.SPLITS}
    assert {s: len(p) for s, p in pools.items()} == {"train": 1297, "val": 200, "test": 300}
    assert meta["pool_sizes"] == {"train": 1297, "val": 200, "test": 300}
    assert not (
        pools["train"] & pools["val"] or pools["train"] & pools["test"] or pools["val"] & pools["test"]
    )
    assert set().union(*pools.values()) == set(range(1797))
    assert {s: v.tolist() for s, v in dg.split_pools(7).items()} == meta["pools"]

    # Check the written pixels, not just the bookkeeping: every cell of every image is a source digit
    # from its own split's pool. Identical source images (if any) map to a set of indices.
    images, _ = dg.load_digits()
    rendered = dg.LEVELS[images]
    by_pixels: dict[bytes, set[int]] = {}
    for i, r in enumerate(rendered):
        by_pixels.setdefault(r.tobytes(), set()).add(i)
    for split in dg.SPLITS:
        for rec in json.loads((out / f"{split}.json").read_text()):
            img = np.asarray(Image.open(out / rec["image"]))[::2, ::2, 0]
            for r, c in ((0, 0), (0, 8), (8, 0), (8, 8)):
                assert by_pixels[img[r : r + 8, c : c + 8].tobytes()] & pools[split]


class _Fixed:
    """Stand-in rng so hand-built cases can pick a specific position/line."""

    def __init__(self, k):
        self.k = k

    def integers(self, n):
        return self.k


@pytest.mark.parametrize(
    "category,k,question,answer",
    [
        ("pos", 0, "what top-left ?", "3"),
        ("pos", 1, "what top-right ?", "5"),
        ("pos", 2, "what bottom-left ?", "8"),
        ("pos", 3, "what bottom-right ?", "1"),
        ("read", 0, "read top row", "3 5"),
        ("read", 1, "read bottom row", "8 1"),
        ("read", 2, "read left column", "3 8"),
        ("read", 3, "read right column", "5 1"),
        ("sum", 0, "sum top row", "8"),
        ("sum", 1, "sum bottom row", "9"),
        ("sum", 2, "sum left column", "1 1"),
        ("sum", 3, "sum right column", "6"),
        ("odd", 0, "which odd ?", "top-left top-right bottom-right"),
    ],
)
def test_answers(category, k, question, answer):
    cells, labels = _digit_cells([3, 5, 8, 1])
    _, q, a = dg.make_example(cells, labels, category, _Fixed(k))
    assert (q, a) == (question, answer)


def test_answer_edge_cases():
    cells, _ = _digit_cells([0, 0, 0, 0])
    rng = np.random.default_rng(0)
    assert dg.make_example(cells, [2, 4, 6, 0], "odd", rng)[2] == "none"
    assert dg.make_example(cells, [9, 9, 9, 9], "odd", rng)[2] == " ".join(dg.POSITIONS)
    assert dg.make_example(cells, [9, 9, 0, 0], "sum", _Fixed(0))[2] == "1 8"
    assert dg.make_example(cells, [0, 7, 0, 0], "sum", _Fixed(2))[2] == "0"
    with pytest.raises(ValueError):
        dg.make_example(cells, [1, 2, 3, 4], "count", rng)


def test_grid_layout():
    rng = np.random.default_rng(0)
    digits = rng.integers(0, 17, size=(4, 8, 8))
    image, _, _ = dg.make_example(digits, [3, 5, 8, 1], "pos", rng)
    assert image.dtype == np.uint8 and image.shape == (32, 32, 3)
    assert (image[..., 0] == image[..., 1]).all() and (image[..., 0] == image[..., 2]).all()
    for k, (r, c) in enumerate(((0, 0), (0, 16), (16, 0), (16, 16))):
        expected = np.kron(np.round(digits[k] / 16 * 255).astype(np.uint8), np.ones((2, 2), np.uint8))
        np.testing.assert_array_equal(image[r : r + 16, c : c + 16, 0], expected)
    assert image.max() <= 255 and dg.render_grid(np.full((4, 8, 8), 16)).min() == 255


def test_vocabulary_and_category_balance():
    vocab = set(dg.vocabulary())
    assert len(vocab) == len(dg.vocabulary())
    rng = np.random.default_rng(0)
    images, labels = dg.load_digits()
    counts = Counter()
    for _ in range(2000):
        cat = dg.CATEGORIES[int(rng.integers(4))]
        src = rng.choice(len(images), size=4, replace=False)
        _, q, a = dg.make_example(images[src], labels[src], cat, rng)
        assert set(q.split()) <= vocab and set(a.split()) <= vocab, (q, a)
        counts[cat] += 1
    assert all(400 <= counts[c] <= 600 for c in dg.CATEGORIES), counts


def test_written_records(written):
    out, meta = written
    vocab = set(meta["vocabulary"])
    assert meta["vocabulary"] == dg.vocabulary()
    counts = Counter()
    for split in dg.SPLITS:
        records = json.loads((out / f"{split}.json").read_text())
        assert len(records) == meta["sizes"][split]
        for i, rec in enumerate(records):
            assert rec["id"] == f"{split}-{i:06d}"
            assert rec["image"] == f"images/{split}/{i:06d}.png"
            human, gpt = rec["conversations"]
            assert human["from"] == "human" and gpt["from"] == "gpt"
            assert human["value"].startswith("<image>\n")
            words = human["value"].removeprefix("<image>\n").split() + gpt["value"].split()
            assert set(words) <= vocab
            assert rec["category"] in dg.CATEGORIES
            counts[rec["category"]] += 1
            with Image.open(out / rec["image"]) as im:
                assert im.size == (32, 32) and im.mode == "RGB"
    assert set(counts) == set(dg.CATEGORIES)


def test_written_answers_match_labels(written):
    """Answers in the files agree with the digits actually drawn (labels recovered from the pixels)."""
    out, _ = written
    images, labels = dg.load_digits()
    rendered = dg.LEVELS[images].reshape(len(images), -1)
    by_pixels = {}
    for r, lab in zip(rendered, labels):
        by_pixels.setdefault(r.tobytes(), set()).add(int(lab))
    for rec in json.loads((out / "val.json").read_text()):
        img = np.asarray(Image.open(out / rec["image"]))[::2, ::2, 0]
        labs = []
        for r, c in ((0, 0), (0, 8), (8, 0), (8, 8)):
            cand = by_pixels[img[r : r + 8, c : c + 8].tobytes()]
            assert len(cand) == 1
            labs.append(next(iter(cand)))
        q = rec["conversations"][0]["value"].removeprefix("<image>\n")
        a = rec["conversations"][1]["value"]
        expected = {}
        for k, p in enumerate(dg.POSITIONS):
            expected[f"what {p} ?"] = str(labs[k])
        for name, (i, j) in dg.LINES:
            expected[f"read {name}"] = f"{labs[i]} {labs[j]}"
            expected[f"sum {name}"] = " ".join(str(labs[i] + labs[j]))
        expected["which odd ?"] = " ".join(p for p, x in zip(dg.POSITIONS, labs) if x % 2) or "none"
        assert a == expected[q]
