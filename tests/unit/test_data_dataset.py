"""Bad input gives a clear error (file, sample id, problem) or is skipped and counted; mixing and sharding."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aligntI.config import DataConfig, DataSource
from aligntI.data.dataset import LlavaDataset
from aligntI.data.loader import build_collator, build_encoder, build_train_loader
from aligntI.data.records import DataError, MixedRecords, RecordSource, ShardedResumableSampler
from aligntI.models.builder import VisionSpec, build_processor

GOOD = {"id": "good", "image": "ok.png",
        "conversations": [{"from": "human", "value": "<image>\nwhat top-left ?"}, {"from": "gpt", "value": "7"}]}


def conv(q="what top-left ?", a="7"):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


BAD_CASES = {
    "missing_image": ({"id": "s1", "image": "nope.png", "conversations": conv("<image>\nq")}, "image not found"),
    "corrupt_image": ({"id": "s2", "image": "corrupt.png", "conversations": conv("<image>\nq")},
                      "cannot decode image"),
    "no_conversations": ({"id": "s3", "image": "ok.png"}, "no 'conversations' field"),
    "malformed_turn": ({"id": "s4", "conversations": [{"from": "human"}, {"from": "gpt", "value": "x"}]},
                       "string 'from' and 'value'"),
    "wrong_role_order": ({"id": "s5", "image": "ok.png",
                          "conversations": [{"from": "gpt", "value": "7"}, {"from": "human", "value": "<image>"}]},
                         "alternate"),
    "image_without_placeholder": ({"id": "s6", "image": "ok.png", "conversations": conv("what top-left ?")},
                                  "has an image but 0 <image> placeholders"),
    "placeholder_without_image": ({"id": "s7", "conversations": conv("<image>\nwhat ?")},
                                  "no 'image' field"),
    "two_placeholders": ({"id": "s8", "image": "ok.png", "conversations": conv("<image><image>\nq")},
                         "has an image but 2 <image> placeholders"),
}


@pytest.fixture
def setup(tmp_path, word_tokenizer):
    Image.fromarray(np.full((32, 32, 3), 200, dtype=np.uint8)).save(tmp_path / "ok.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    processor = build_processor(word_tokenizer, VisionSpec(), "llava_v1_compact")
    return tmp_path, processor


def dataset_for(tmp_path, processor, records, on_bad="error", name="data.json", max_length=64):
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records))
    data = DataConfig(train=[DataSource(str(path))], max_length=max_length, on_bad_sample=on_bad)
    mixed = MixedRecords([RecordSource(path)], [1.0], seed=0)
    return LlavaDataset(mixed, build_encoder(processor, data), processor.image_processor, on_bad), path


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_sample_error_names_file_id_and_problem(setup, case):
    tmp_path, processor = setup
    record, fragment = BAD_CASES[case]
    ds, path = dataset_for(tmp_path, processor, [GOOD, record])
    assert ds[0]["id"] == "good"
    with pytest.raises(DataError) as info:
        ds[1]
    msg = str(info.value)
    assert str(path) in msg and f"record 1, sample {record['id']!r}" in msg and fragment in msg, msg


def test_invalid_json_line_in_jsonl(setup):
    tmp_path, processor = setup
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{not json\n")
    mixed = MixedRecords([RecordSource(path)], [1.0], seed=0)
    ds = LlavaDataset(mixed, build_encoder(processor, DataConfig(train=[DataSource(str(path))])),
                      processor.image_processor)
    with pytest.raises(DataError, match=r"broken.jsonl: record 1 \(line 2\): not valid JSON"):
        ds[1]


def test_skip_mode_replaces_and_counts_every_bad_case(setup):
    tmp_path, processor = setup
    bad = [BAD_CASES[k][0] for k in sorted(BAD_CASES)]
    ds, _ = dataset_for(tmp_path, processor, bad + [GOOD], on_bad="skip")
    item = ds[0]  # every bad record is replaced by the next one of the file, down to the good one
    assert item["id"] == "good"
    assert [s.kind for s in item["skips"]] == ["bad"] * len(bad)
    assert all("data.json: record" in s.message for s in item["skips"])


def test_too_long_samples_are_skipped_and_counted(setup):
    tmp_path, processor = setup
    long = {"id": "long", "image": "ok.png", "conversations": conv("<image>\n" + "what ? " * 30, "7")}
    ds, _ = dataset_for(tmp_path, processor, [long, GOOD], max_length=40)
    item = ds[0]  # on_bad_sample=error still skips what cannot fit: that is not bad input
    assert item["id"] == "good" and [s.kind for s in item["skips"]] == ["too_long"]
    assert "'long'" in item["skips"][0].message


def test_text_only_batch_gets_a_masked_dummy_image(setup):
    tmp_path, processor = setup
    text_only = {"id": "t", "conversations": conv("hello", "world")}
    ds, _ = dataset_for(tmp_path, processor, [text_only, text_only])
    encoder = ds.encoder
    batch = build_collator(processor, encoder, "right")([ds[0], ds[1]])
    n = encoder.num_image_tokens
    assert batch["pixel_values"].shape[0] == 1
    assert (batch["input_ids"] == encoder.image_token_id).sum() == n  # exactly one image's worth of tokens
    dummy = batch["input_ids"][0] == encoder.image_token_id
    assert (batch["attention_mask"][0][dummy] == 0).all() and not batch["vision_mask"].any()
    assert (batch["labels"][0][dummy] == -100).all()
    assert dummy.nonzero().min() > batch["attention_mask"][0].nonzero().max()  # after every real token


def test_mixing_by_weight_and_max_samples(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.json"
    a.write_text("".join(json.dumps({"id": f"a{i}"}) + "\n\n" for i in range(10)))  # blank lines are fine
    b.write_text(json.dumps([{"id": f"b{i}"} for i in range(20)]))
    mixed = MixedRecords([RecordSource(a), RecordSource(b, max_samples=8)], [2.5, 0.5], seed=3)
    assert len(mixed) == 18 and mixed.epoch_size() == 25 + 4
    draws = mixed.draws(0)
    ids = [mixed.locate(int(g))[0].get(mixed.locate(int(g))[1])["id"] for g in draws]
    assert sum(i.startswith("a") for i in ids) == 25 and sum(i.startswith("b") for i in ids) == 4
    assert all(int(i[1:]) < 8 for i in ids if i.startswith("b"))
    counts = {f"a{i}": ids.count(f"a{i}") for i in range(10)}
    assert sorted(counts.values()) == [2] * 5 + [3] * 5  # two full passes plus half of a third
    assert np.array_equal(mixed.draws(0), MixedRecords(mixed.sources, [2.5, 0.5], seed=3).draws(0))
    assert not np.array_equal(mixed.draws(0), mixed.draws(1))


def test_sampler_shards_are_disjoint_and_resume_exactly(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"id": i}) + "\n" for i in range(50)))
    mixed = MixedRecords([RecordSource(path)], [1.0], seed=0)

    def take(rank, n, start=0):
        it = iter(ShardedResumableSampler(mixed, rank, 2, global_batch_size=8, start_sample=start))
        return [next(it) for _ in range(n)]

    r0, r1 = take(0, 24), take(1, 24)  # 48 per epoch (6 global batches); 24 each
    assert not set(r0) & set(r1) and len(set(r0) | set(r1)) == 48
    full = take(0, 48)
    assert len(set(full[24:])) == 24 and full[24:] != full[:24]  # epoch 2: a fresh permutation
    assert take(0, 23, start=17) == full[17:40]  # resuming mid-stream (even across an epoch) is exact


def test_loader_runs_in_workers(setup, tmp_path):
    _, processor = setup
    records = [GOOD | {"id": f"g{i}"} for i in range(12)]
    (tmp_path / "w.json").write_text(json.dumps(records))
    data = DataConfig(train=[DataSource(str(tmp_path / "w.json"))], num_workers=2, max_length=64)
    loader, sampler = build_train_loader(processor, data, seed=0, rank=0, world_size=1, micro_batch_size=4,
                                         global_batch_size=4)
    it = iter(loader)
    batches = [next(it) for _ in range(4)]
    assert sampler.steps_per_epoch == 3
    assert all(b["input_ids"].shape[0] == 4 for b in batches)
    assert sorted(i for b in batches[:3] for i in b["sample_ids"]) == sorted(r["id"] for r in records)


def test_missing_data_file_is_named(tmp_path):
    with pytest.raises(DataError, match="nothere.json: file not found"):
        RecordSource(Path(tmp_path / "nothere.json"))
