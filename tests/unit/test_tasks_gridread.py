"""GridRead: answers read back from the pixels, disjoint pools, determinism, the options, the token mask."""

import json

import numpy as np
import pytest
from PIL import Image

from aligntI.tasks import digitgrid as dg
from aligntI.tasks.gridread import (
    GridReadOptions,
    cell_token_mask,
    make_question,
    parse_options,
    vocabulary,
    write_gridread,
)

OPTIONS = GridReadOptions(grid=3, upscale=1, phrasings=3, train_size=40, val_size=20, test_size=20, seed=7)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("gridread")
    return out, write_gridread(out, OPTIONS, progress=False)


def read_cells(path, grid):
    """Each cell of an image back to (source index, label) by exact match against every rendered source digit."""
    images, labels = dg.load_digits()
    rendered = dg.LEVELS[images].reshape(len(images), -1)
    pixels = np.asarray(Image.open(path))[:, :, 0]
    out = []
    for r in range(grid):
        for c in range(grid):
            cell = pixels[r * 8:(r + 1) * 8, c * 8:(c + 1) * 8].reshape(-1)
            match = np.flatnonzero((rendered == cell).all(-1))
            out.append((match, labels[match[0]]))
    return out


def expected(question: str, labels: list[int], n: int) -> str:
    """The answer, from the question's words and the digits read from the image."""
    words = question.split()
    nums = [int(w) for w in words if w.isdigit()]
    rows = [labels[i * n:(i + 1) * n] for i in range(n)]
    if "rows" in words:  # two rows, in the order asked
        return " , ".join(" ".join(map(str, rows[k - 1])) for k in nums)
    if "cell" in words or ("row" in words and "column" in words):
        return str(rows[nums[0] - 1][nums[1] - 1])
    if ("sum" in words or "add" in words) and nums:
        return " ".join(str(sum(rows[nums[0] - 1])))
    if "sums" in words or "each" in words:
        return " , ".join(" ".join(str(sum(r))) for r in rows)
    if "row" in words and nums:
        return " ".join(map(str, rows[nums[0] - 1]))
    if "column" in words and nums:
        return " ".join(str(r[nums[0] - 1]) for r in rows)
    if nums:  # where / find / which cells hold
        hits = [f"{i // n + 1} {i % n + 1}" for i, x in enumerate(labels) if x == nums[0]]
        return " , ".join(hits) or "none"
    return " , ".join(" ".join(map(str, r)) for r in rows)  # the whole grid


def test_every_answer_matches_the_digits_in_its_image(data):
    out, meta = data
    pools = {s: set(v) for s, v in meta["pools"].items()}
    seen = set()
    for split in ("train", "val", "test"):
        for rec in json.loads((out / f"{split}.json").read_text()):
            cells = read_cells(out / rec["image"], 3)
            for match, _ in cells:  # every source digit of the image comes from the split's own pool
                assert any(int(m) in pools[split] for m in match)
            question = rec["conversations"][0]["value"].removeprefix("<image>\n")
            labels = [int(label) for _, label in cells]
            assert rec["conversations"][1]["value"] == expected(question, labels, 3), question
            seen.add(rec["category"])
            n_cells = {"cell": 1, "row": 3, "column": 3, "row_sum": 3}.get(rec["category"], 9)
            assert len(rec["cells"]) == n_cells
    assert not pools["train"] & pools["test"] and not pools["val"] & pools["test"]
    assert seen == {"cell", "row", "column", "row_sum", "where", "grid", "row_sums"}


def test_two_rows_reads_both_rows_in_the_order_asked(tmp_path):
    opts = GridReadOptions(grid=3, upscale=1, phrasings=3, mix={"two_rows": 1.0}, train_size=40, val_size=0,
                           test_size=0, seed=7)
    write_gridread(tmp_path, opts, progress=False)
    orders = set()
    for rec in json.loads((tmp_path / "train.json").read_text()):
        question = rec["conversations"][0]["value"].removeprefix("<image>\n")
        labels = [int(label) for _, label in read_cells(tmp_path / rec["image"], 3)]
        assert rec["conversations"][1]["value"] == expected(question, labels, 3), question
        r, s = (int(w) for w in question.split() if w.isdigit())
        assert r != s and rec["cells"] == sorted({(r - 1) * 3 + c for c in range(3)} | {(s - 1) * 3 + c for c in range(3)})
        assert rec["item_sep"] == "space" and len(rec["conversations"][1]["value"].split()) == 7  # 6 digits, ","
        orders.add(r < s)
    assert orders == {True, False}


def test_same_options_same_bytes_other_seed_other_data(tmp_path, data):
    out, meta = data
    again = write_gridread(tmp_path / "a", OPTIONS, progress=False)
    assert again["sha256"] == meta["sha256"] and again["options"]["grid"] == 3
    other = write_gridread(tmp_path / "b", GridReadOptions(**{**vars(OPTIONS), "seed": 8}), progress=False)
    assert other["sha256"] != meta["sha256"]


def test_mix_leaves_out_categories_and_the_row_separator_is_an_answer_form(tmp_path):
    opts = parse_options(["grid=2", "upscale=1", "mix=grid:1", "row_separator=false", "train_size=5",
                          "val_size=0", "test_size=0"])
    write_gridread(tmp_path, opts, progress=False)
    recs = json.loads((tmp_path / "train.json").read_text())
    assert {r["category"] for r in recs} == {"grid"}
    assert all(len(r["conversations"][1]["value"].split()) == 4 for r in recs)  # 4 digits, no ","


def test_word_address_names_the_cell_with_one_word_and_draws_the_same_data():
    labels = list(range(9))
    pair, word = parse_options(["grid=3", "phrasings=3"]), parse_options(["grid=3", "phrasings=3", "address=word"])
    for seed in range(20):
        (q0, a0, c0), (q1, a1, c1) = (make_question(labels, "cell", o, np.random.default_rng(seed)) for o in (pair, word))
        assert (a0, c0) == (a1, c1)  # the same cell drawn; only its name differs
        r, c = divmod(c1[0], 3)
        assert f"r{r + 1}c{c + 1}" in q1.split() and "row" not in q1.split()
        assert set(q1.split()) <= set(vocabulary(word))
    assert "r3c3" in vocabulary(word) and "r3c3" not in vocabulary(pair)


@pytest.mark.parametrize("bad, message", [
    (["grid=12"], "grid must be 2..9"), (["mix=cell:1,color:2"], "unknown categories"),
    (["phrasings=4"], "phrasings must be 1..3"), (["size=3"], "expected key=value"),
    (["address=letters"], "address must be"), (["grid=x"], "expected an integer"), (["mix=cell"], "cat:weight"), (["mix=cell:0"], "positive sum"),
])
def test_bad_options_say_what_is_wrong(bad, message):
    with pytest.raises(ValueError, match=message):
        parse_options(bad)


def test_cell_token_mask_covers_the_cells_patches():
    mask = cell_token_mask([5], grid=4, patch_grid=8).reshape(8, 8)  # row 1, column 1: patches 2-3 x 2-3
    assert np.array_equal(np.argwhere(mask), [[2, 2], [2, 3], [3, 2], [3, 3]])
    assert cell_token_mask(list(range(16)), 4, 8).all()
    with pytest.raises(ValueError):
        cell_token_mask([0], grid=3, patch_grid=8)
