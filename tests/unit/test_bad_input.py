"""Bad input as a user meets it: one message naming the file (for data also the record and the sample id), exit
code 2, no traceback unless ALIGNTI_DEBUG=1.

Unit tests run the whole class of malformed files, records, images and model directories through the data and
model layers; a few real ``recipes/train.py`` runs check what reaches the terminal, two of them on 2 ranks.
"""

import io
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import REPO, launch, write_recipe
from PIL import Image
from recipe_scripts import train_script

from aligntI.cli import main
from aligntI.config import AttentionConfig, DataConfig, DataSource
from aligntI.data.dataset import LlavaDataset, check_sample, load_sample
from aligntI.data.loader import build_encoder, build_records, build_train_loader, check_records
from aligntI.data.records import DataError, MixedRecords, RecordSource
from aligntI.errors import lost_peer, report
from aligntI.models.builder import VisionSpec, build_processor
from aligntI.models.loading import ModelDirError, load_model, load_processor

ASK = [{"from": "human", "value": "<image>\nwhat top-left ?"}, {"from": "gpt", "value": "7"}]


def good(i) -> dict:
    return {"id": f"r{i}", "image": "ok.png", "conversations": ASK}


def png_bytes(seed=0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


@pytest.fixture
def folder(tmp_path):
    """A data folder with images: a good one, a truncated one (its header reads, its pixels do not), a text file
    named .png, a sub-folder, a symlink out of the folder, and a file outside it."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "ok.png").write_bytes(png_bytes())
    (data / "trunc.png").write_bytes(png_bytes()[:2000])
    (data / "text.png").write_text("not an image")
    (data / "sub.png").mkdir()
    (tmp_path / "outside.png").write_bytes(png_bytes(1))
    (data / "link.png").symlink_to(tmp_path / "outside.png")
    return data


@pytest.fixture(scope="module")
def processor(word_tokenizer):
    return build_processor(word_tokenizer, VisionSpec(), "llava_v1_compact")


def write_lines(path, lines: list) -> str:
    """A JSONL file of records (dicts) or raw lines (bytes)."""
    path.write_bytes(b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n" for x in lines))
    return str(path)


# ------------------------------------------------------------------ files that cannot be read as a whole

ARRAY = json.dumps([good(0), good(1), good(2)], indent=1)
FILE_CASES = {
    "empty.json": (b"", ["is empty"]),
    "blank.jsonl": (b"\n  \n", ["holds no records"]),
    "empty_array.json": (b"[]", ["holds no records"]),
    "object.json": (json.dumps(good(0)).encode(), ["is a JSON object, expected an array of records"]),
    "lines.json": ((json.dumps(good(0)) + "\n" + json.dumps(good(1))).encode(),
                   ["not valid JSON at line 2, column 1", "name the file .jsonl"]),
    "truncated.json": (ARRAY[: ARRAY.index('"r1"') + 10].encode(), ["record 1, sample 'r1': not valid JSON at line"]),
    "missing_comma.json": (ARRAY.replace("},\n {", "}\n {", 1).encode(),
                           ["record 1: not valid JSON at line", "Expecting ',' delimiter"]),
    "latin1.json": (ARRAY.replace('"7"', '"caf\xe9"', 1).encode("latin-1"),
                    ["record 0, sample 'r0': not valid UTF-8 at line", "save the file as UTF-8"]),
    "bom.json": (b"\xef\xbb\xbf" + ARRAY.encode(), ["UTF-8 byte-order mark"]),
    "bom.jsonl": (b"\xef\xbb\xbf" + json.dumps(good(0)).encode(), ["UTF-8 byte-order mark"]),
    "utf16.json": (ARRAY.encode("utf-16"), ["is UTF-16 or UTF-32"]),
    "records.txt": (ARRAY.encode(), ["expected a .json file"]),
}


@pytest.mark.parametrize("name", sorted(FILE_CASES))
def test_a_file_that_cannot_be_read_names_itself(tmp_path, name):
    content, fragments = FILE_CASES[name]
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        RecordSource(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and all(f in message for f in fragments), message


def test_missing_file_directory_and_image_folder_are_named(tmp_path):
    with pytest.raises(DataError, match="nothere.jsonl: file not found"):
        RecordSource(tmp_path / "nothere.jsonl")
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(DataError, match="dir.json: is a directory, not a data file"):
        RecordSource(tmp_path / "dir.json")
    write_lines(tmp_path / "d.jsonl", [good(0)])
    with pytest.raises(DataError, match=r"d.jsonl: image folder not found: .*/imgs"):
        RecordSource(tmp_path / "d.jsonl", images=tmp_path / "imgs")


# ------------------------------------------------------------------ one bad record

def conv(q="what top-left ?", a="7", image=True):
    return [{"from": "human", "value": ("<image>\n" if image else "") + q}, {"from": "gpt", "value": a}]


RECORD_CASES = {
    "not_json": (b'{"id": "x", "image": "ok.png", "conversations": [', "sample 'x': not valid JSON at column"),
    "not_utf8": ('{"id": "x", "conversations": [{"from": "human", "value": "caf\xe9"}]}'.encode("latin-1"),
                 "not valid UTF-8 at byte"),
    "not_object": (b"[1, 2]", "is a JSON array, expected an object"),
    "no_conversations": ({"id": "x", "image": "ok.png"}, "sample 'x': no 'conversations' field"),
    "conversations_not_a_list": ({"id": "x", "conversations": "hi"}, "non-empty list of turns, got a JSON string"),
    "conversations_empty": ({"id": "x", "conversations": []}, "non-empty list of turns, got an empty array"),
    "turn_not_an_object": ({"id": "x", "conversations": [["human", "q"], conv()[1]]}, "turn 0 must be an object"),
    "turn_without_value": ({"id": "x", "conversations": [{"from": "human"}, conv()[1]]}, "it has no 'value'"),
    "value_not_a_string": ({"id": "x", "image": "ok.png", "conversations": conv(a=7)},
                           "its 'value' is a JSON number 7"),
    "unknown_role": ({"id": "x", "conversations": [{"from": "user", "value": "q"}, conv()[1]]}, "unknown role 'user'"),
    "roles_out_of_order": ({"id": "x", "image": "ok.png", "conversations": conv()[::-1]}, "roles must alternate"),
    "ends_with_a_question": ({"id": "x", "image": "ok.png", "conversations": conv() + conv(image=False)[:1]},
                             "roles must alternate"),
    "empty_answer": ({"id": "x", "image": "ok.png", "conversations": conv(a="")}, "turn 1 (gpt) is empty"),
    "whitespace_answer": ({"id": "x", "image": "ok.png", "conversations": conv(a=" \n\t")}, "turn 1 (gpt) is empty"),
    "empty_question": ({"id": "x", "conversations": conv(q="  ", image=False)}, "turn 0 (human) is empty"),
    "image_in_answer": ({"id": "x", "image": "ok.png", "conversations": conv(a="<image> 7")}, "only human turns"),
    "placeholder_without_image": ({"id": "x", "conversations": conv()}, "but no 'image' field"),
    "image_without_placeholder": ({"id": "x", "image": "ok.png", "conversations": conv(image=False)},
                                  "has an image but 0 <image> placeholders"),
    "two_placeholders": ({"id": "x", "image": "ok.png", "conversations": conv(q="<image> q")},
                         "has an image but 2 <image> placeholders"),
    "image_not_a_string": ({"id": "x", "image": ["ok.png"], "conversations": conv()}, "got a JSON array"),
    "image_empty_string": ({"id": "x", "image": "", "conversations": conv()}, "'image' is an empty string"),
    "image_missing": ({"id": "x", "image": "nope.png", "conversations": conv()}, "sample 'x': image not found"),
    "image_is_a_directory": ({"id": "x", "image": "sub.png", "conversations": conv()}, "is a directory"),
    "image_not_an_image": ({"id": "x", "image": "text.png", "conversations": conv()}, "cannot decode image"),
    "image_up_and_out": ({"id": "x", "image": "../outside.png", "conversations": conv()},
                         "sample 'x': image '../outside.png' resolves to"),
    "image_absolute": ({"id": "x", "image": "/etc/hostname", "conversations": conv()},
                       "sample 'x': image '/etc/hostname' resolves to /etc/hostname, outside the image folder"),
    "image_symlink_out": ({"id": "x", "image": "link.png", "conversations": conv()},
                          "sample 'x': image 'link.png' resolves to"),
    "image_missing_outside": ({"id": "x", "image": "../nope.png", "conversations": conv()},
                              "sample 'x': image '../nope.png' resolves to"),
    "lone_surrogate": ({"id": "x", "image": "ok.png", "conversations": conv(a="\ud800")}, "unpaired surrogate"),
}


@pytest.mark.parametrize("case", sorted(RECORD_CASES))
def test_a_bad_record_names_file_record_line_and_sample(folder, case):
    record, fragment = RECORD_CASES[case]
    path = write_lines(folder / "d.jsonl", [good(0), b"", record])  # a blank line: record 1 is on line 3
    source = RecordSource(path)
    check_sample(source, 0)
    with pytest.raises(DataError) as info:
        check_sample(source, 1)
    err = info.value
    assert (err.file, err.record, err.line) == (path, 1, 3)
    assert str(err).startswith(f"{path}: record 1 (line 3)") and fragment in str(err), str(err)
    if isinstance(record, dict):
        assert err.sample_id == "x" and "sample 'x'" in str(err)


def test_a_bad_record_in_a_json_array_is_numbered_too(folder):
    path = folder / "d.json"
    path.write_text(json.dumps([good(0), good(1) | {"conversations": conv(a="")}]))
    with pytest.raises(DataError, match=r"d.json: record 1, sample 'r1': turn 1 \(gpt\) is empty"):
        check_sample(RecordSource(path), 1)


def test_what_is_allowed(folder):
    only_image = {"id": "i", "image": "ok.png", "conversations": conv(q="")}  # a question may be just the image
    system = {"id": "s", "conversations": [{"from": "system", "value": "be brief"}, *conv(image=False)]}
    source = RecordSource(write_lines(folder / "d.jsonl", [only_image, system]))
    assert check_sample(source, 0).image_path == folder / "ok.png" and check_sample(source, 1).id == "s"
    out = {"id": "o", "image": "link.png", "conversations": conv()}
    up = {"id": "u", "image": "../outside.png", "conversations": conv()}
    path = write_lines(folder / "out.jsonl", [out, up])
    records = build_records(DataConfig(train=[DataSource(path)], allow_images_outside=True), seed=0)
    assert [check_sample(records.sources[0], i).id for i in range(2)] == ["o", "u"]  # the recipe key lifts it


def test_truncated_pixels_fail_when_decoded(folder, processor):
    path = write_lines(folder / "d.jsonl", [{"id": "t", "image": "trunc.png", "conversations": conv()}])
    source = RecordSource(path)
    check_sample(source, 0)  # the header is fine: only decoding finds it
    encoder = build_encoder(processor, DataConfig(train=[DataSource(path)]))
    with pytest.raises(DataError, match=r"record 0 \(line 1\), sample 't': cannot decode image .*trunc.png: "
                                        "image file is truncated"):
        load_sample(source, 0, encoder, processor.image_processor)


# ------------------------------------------------------------------ the check before training, and the workers

def test_the_check_before_training_stops_at_the_first_bad_record(folder, capsys):
    a = write_lines(folder / "a.jsonl", [good(0), good(1) | {"conversations": conv(a="")}, good(2)])
    b = write_lines(folder / "b.jsonl", [{"id": "bad"}, good(1)])
    records = MixedRecords([RecordSource(a), RecordSource(b)], [1.0, 1.0], seed=0)
    with pytest.raises(DataError, match=r"a.jsonl: record 1 \(line 2\), sample 'r1'"):
        check_records(records, range(len(records)), "error", rank=0)

    check_records(records, range(len(records)), "skip", rank=0)
    out = capsys.readouterr().out
    assert f"{a}: 1 of 3 records are bad and are skipped when drawn" in out and f"{b}: 1 of 2 records" in out
    everything_bad = MixedRecords([RecordSource(write_lines(folder / "c.jsonl", [{"id": "x"}] * 3))], [1.0], 0)
    with pytest.raises(DataError, match=r"c.jsonl: none of its 3 records can be used \(on_bad_sample: skip\); "
                                        r"the first: record 0 \(line 1\), sample 'x': no 'conversations'"):
        check_records(everything_bad, range(3), "skip", rank=0)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_sample_that_fails_in_a_worker_arrives_whole(folder, processor, workers):
    """torch re-raises a worker's exception as a RuntimeError whose text is the worker's traceback; ours is
    handed back as a batch and raised as itself."""
    records = [good(0), good(1) | {"image": "trunc.png"}]
    data = DataConfig(train=[DataSource(write_lines(folder / "d.jsonl", records))], max_length=64,
                      num_workers=workers)
    loader, _ = build_train_loader(processor, data, seed=0, rank=0, world_size=1, micro_batch_size=2,
                                   global_batch_size=2)
    with pytest.raises(DataError) as info:
        next(iter(loader))
    assert (info.value.record, info.value.sample_id) == (1, "r1")
    assert "Traceback" not in str(info.value) and "image file is truncated" in str(info.value)

    loader, _ = build_train_loader(processor, replace(data, on_bad_sample="skip"), seed=0, rank=0, world_size=1, micro_batch_size=2,
                                   global_batch_size=2)
    batch = next(iter(loader))
    assert batch["sample_ids"] == ["r0", "r0"] and [s.kind for s in batch["skips"]] == ["bad"]


def test_skip_mode_gives_up_after_every_record_of_a_file_failed(folder, processor):
    path = write_lines(folder / "d.jsonl", [good(i) | {"image": "trunc.png"} for i in range(3)])
    data = DataConfig(train=[DataSource(path)], on_bad_sample="skip")
    dataset = LlavaDataset(build_records(data, 0), build_encoder(processor, data), processor.image_processor, "skip")
    with pytest.raises(DataError, match=r"d.jsonl: 3 consecutive records from record 1 on .* were skipped .* the last: "
                                        r"record 0 \(line 1\), sample 'r0': cannot decode image"):
        dataset[1]


# ------------------------------------------------------------------ model directories

def test_model_directory_problems_name_the_directory(tmp_path, tiny_model):
    with pytest.raises(ModelDirError, match=r"/nowhere: no such model directory"):
        load_processor(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelDirError, match=r"/empty: not an HF model directory \(no config.json\)"):
        load_processor(tmp_path / "empty")
    only_config = tmp_path / "only_config"
    only_config.mkdir()
    shutil.copy(tiny_model / "config.json", only_config)
    with pytest.raises(ModelDirError, match=r"/only_config: cannot load its processor: OSError"):
        load_processor(only_config)
    with pytest.raises(ModelDirError, match=r"/only_config: cannot load the model: OSError: .*model.safetensors"):
        load_model(only_config, AttentionConfig())
    (only_config / "config.json").write_text("{not json")
    with pytest.raises(ModelDirError, match=r"only_config/config.json: not valid JSON"):
        load_processor(only_config)
    (only_config / "config.json").write_text("[]")
    with pytest.raises(ModelDirError, match=r"only_config/config.json: expected a JSON object, got list"):
        load_processor(only_config)
    broken = shutil.copytree(tiny_model, tmp_path / "broken_tokenizer")
    (broken / "tokenizer.json").write_text('{"version": "1.0"}')
    with pytest.raises(ModelDirError, match=r"/broken_tokenizer: cannot load its processor: "):
        load_processor(broken)


# ------------------------------------------------------------------ what each rank prints

def test_cli_prints_one_line_and_the_debug_switch_adds_the_traceback(tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("# r\nmodel: {path: m\n")
    expected = f"aligntI: config error: {recipe}: not valid YAML at line 3, column 1: "
    assert train_script.main(["--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(expected) and err.endswith(" (ALIGNTI_DEBUG=1 shows the traceback)\n")
    assert err.count("\n") == 1
    monkeypatch.setenv("ALIGNTI_DEBUG", "1")
    assert train_script.main(["--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last)") and expected in err


def test_a_path_that_cannot_be_written_or_read_is_one_line(tmp_path, tiny_model, digitgrid, capsys):
    """File-system errors on a path the user gave (the run directory, a run to export) are bad input too."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, digitgrid, blocker / "run", "ds_configs/zero3_cpu.json")
    assert train_script.main(["--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert f"aligntI: file error: {blocker / 'run'}: Not a directory" in err and err.count("\n") == 1, err
    assert main(["export", "--run", str(tmp_path / "nowhere")]) == 2
    assert "aligntI: config error: --run " in capsys.readouterr().err


def test_the_data_is_checked_before_the_weights_load(tmp_path, tiny_model, digitgrid, capsys):
    """A bad record fails the run before the (for a real model, minutes-long) weight loading: here the weights
    cannot even be read, and the error is still the data's."""
    model = shutil.copytree(tiny_model, tmp_path / "model")
    (model / "model.safetensors").write_bytes(b"not weights")
    data = tmp_path / "data"
    shutil.copytree(digitgrid / "images", data / "images")
    records = json.loads((digitgrid / "train.json").read_text())[:8]
    records[3]["conversations"][1]["value"] = ""
    (data / "train.json").write_text(json.dumps(records))
    recipe = write_recipe(tmp_path / "r.yaml", model, data, tmp_path / "run", "ds_configs/zero3_cpu.json")
    assert train_script.main(["--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "aligntI: data error: " in err and "record 3" in err and "is empty" in err, err


def test_other_ranks_give_the_launcher_time_to_end_them(monkeypatch, capsys):
    waits = []
    monkeypatch.setattr("aligntI.errors.time.sleep", waits.append)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert report(DataError("f.json", "broken"), "data error: f.json: broken", 2) == 2 and waits == []
    monkeypatch.setenv("RANK", "1")
    assert report(DataError("f.json", "broken"), "data error: f.json: broken", 2) == 2 and len(waits) == 1
    assert capsys.readouterr().err.splitlines()[-1].startswith("aligntI [rank 1]: data error: f.json: broken")
    assert report(RuntimeError("lost"), "stopped: ...", 1, secondary=True) == 1 and len(waits) == 2
    monkeypatch.setenv("RANK", "0")
    assert report(RuntimeError("lost"), "stopped: ...", 1, secondary=True) == 1 and len(waits) == 3
    gloo = RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:12958. This is typically caused by ...")
    assert lost_peer(gloo) and not lost_peer(ValueError("x"))
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not lost_peer(gloo)


# ------------------------------------------------------------------ real runs of recipes/train.py

@pytest.fixture
def run_recipe(tmp_path, tiny_model, digitgrid, folder):
    """A 1-step recipe over ``records`` (in ``folder``, whose images they name); returns the finished process."""
    def run(records, launcher="python", timeout=300, **sections):
        data = write_lines(folder / "d.jsonl", records)
        sections["data"] = {"train": [{"path": data}], "num_workers": 0, **sections.get("data", {})}
        recipe = write_recipe(tmp_path / "r.yaml", tiny_model, digitgrid, tmp_path / "run",
                              str(REPO / "ds_configs" / "zero2.json"),
                              train={"max_steps": 1, "global_batch_size": 4, "micro_batch_size": 1}, **sections)
        return launch(["recipes/train.py", "--config", str(recipe)], launcher=launcher, timeout=timeout,
                      check=False), data
    return run


def data_error_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if "data error: " in line]


@pytest.mark.distributed
def test_train_py_a_bad_jsonl_line_is_one_message(run_recipe):
    proc, data = run_recipe([good(0), good(1), b'{"id": "broken", "conversations": [', good(3)])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert data_error_lines(proc) == [f"aligntI: data error: {data}: record 2 (line 3), sample 'broken': not valid "
                                      "JSON at column 36: Expecting value (ALIGNTI_DEBUG=1 shows the traceback)"]
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.mark.distributed
def test_train_py_empty_answer_with_the_debug_switch(run_recipe, monkeypatch):
    monkeypatch.setenv("ALIGNTI_DEBUG", "1")  # launch() passes the environment on
    proc, data = run_recipe([good(0), good(1) | {"conversations": conv(a=" ")}])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback (most recent call last)" in proc.stderr
    assert proc.stderr.rstrip().endswith(f"aligntI: data error: {data}: record 1 (line 2), sample 'r1': turn 1 "
                                         "(gpt) is empty: an answer needs text")


@pytest.mark.distributed
def test_train_py_truncated_image_in_a_dataloader_worker(run_recipe):
    proc, data = run_recipe([good(0) | {"image": "trunc.png"}] * 4, data={"num_workers": 1})
    assert proc.returncode == 2, proc.stderr[-3000:]
    [line] = data_error_lines(proc)
    assert f"{data}: record " in line and "sample 'r0': cannot decode image" in line and "truncated" in line
    assert "Traceback" not in proc.stderr and "DataLoader worker" not in proc.stderr


@pytest.mark.distributed
def test_train_py_missing_teacher_directory(run_recipe, tmp_path):
    proc, _ = run_recipe([good(0)], teacher={"path": str(tmp_path / "no_teacher")})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"aligntI: model error: {tmp_path / 'no_teacher'}: no such model directory" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.distributed
def test_two_ranks_an_error_every_rank_meets_is_printed_once(run_recipe):
    """The check before training finds it on every rank (torchrun): rank 0 says it, rank 1 is ended by the
    launcher while it waits. torchrun itself then exits 1 with its own summary of the failed ranks."""
    proc, data = run_recipe([good(0), good(1) | {"image": "../outside.png"}, good(2), good(3)],
                            launcher="torchrun", timeout=180)
    assert proc.returncode != 0
    [line] = data_error_lines(proc)
    assert line.startswith(f"aligntI [rank 0]: data error: {data}: record 1 (line 2), sample 'r1': image "
                           "'../outside.png' resolves to"), repr(line)
    # No traceback from any rank; torchrun prints one of its own, from its own files.
    assert f'File "{REPO / "aligntI"}' not in proc.stderr and f'File "{REPO / "recipes"}' not in proc.stderr


@pytest.mark.distributed
def test_two_ranks_an_error_one_rank_meets_ends_the_job_with_its_message(run_recipe):
    """Only decoding finds the truncated image, on the one rank that draws it (deepspeed launcher): that rank
    says so; the other, whose collective then fails, waits for the launcher, which exits 2."""
    records = [good(0), good(1), good(2) | {"image": "trunc.png"}, good(3)]
    proc, data = run_recipe(records, launcher="deepspeed", timeout=180)
    assert proc.returncode == 2, proc.stderr[-3000:]
    [line] = data_error_lines(proc)
    assert " [rank " in line and f"{data}: record 2 (line 3), sample 'r2': cannot decode image" in line
    assert "Traceback" not in proc.stderr + proc.stdout


def test_a_checkpoint_that_does_not_fit_its_model_is_one_line(tmp_path, tiny_model, monkeypatch, capsys):
    """Exporting a checkpoint whose weights are not the run's model's (its model directory was replaced)."""
    import yaml

    from aligntI.engine import export

    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000001").mkdir(parents=True)
    (run / "checkpoints" / "step_00000001" / "COMPLETE").write_text("")
    torch.save({"step": 1}, run / "checkpoints" / "step_00000001" / "trainer_state.pt")  # one without a recipe
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"path": str(tiny_model)}}))
    # What DeepSpeed's consolidation would give for another model: a weight this one does not have.
    monkeypatch.setattr(export, "consolidate_checkpoint", lambda checkpoints, tag: {"extra.weight": torch.zeros(1)})
    assert main(["export", "--run", str(run), "--tag", "step_00000001"]) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # after the weights' loading bar
    assert err.startswith("aligntI: model error: --run ") and "unexpected 1 (extra.weight)" in err, err
