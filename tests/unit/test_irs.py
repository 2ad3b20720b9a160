"""IRS: the score against a hand computation, pairing, tie-breaking, and the `aligntI irs` command."""

import json
import math

import pytest
import torch
from conftest import answer_starts, launch

from aligntI.cli import main
from aligntI.config import ConfigError
from aligntI.irs import choose_layer, format_table, irs_scores, pair_mask, saved_layer


def test_irs_matches_hand_computation():
    # layer 0 looks at the same place for every sample; layer 1 follows the sample
    focus = torch.tensor([
        [[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.5, 0.5, 0.0]],
        [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.6, 0.8, 0.0]],
    ], dtype=torch.float64)
    scores = irs_scores(focus, pair_mask(["a", "b", "c"], "any"))
    # layer 1 pair cosines: (x1,x2) 0, (x1,x3) 0.6, (x2,x3) 0.8 -> mean 1.4/3
    assert scores[0].item() == pytest.approx(0.0, abs=1e-12)
    assert scores[1].item() == pytest.approx(1 - 1.4 / 3, abs=1e-12)
    assert choose_layer(scores) == 1


def test_same_image_pairing_only_compares_questions_on_one_image():
    focus = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]])
    images = ["i1", "i1", "i2", "i2"]
    mask = pair_mask(images, "same_image")
    assert mask.sum() == 4 and not mask.diagonal().any()
    # pairs: (0,1) cos 0 and (2,3) cos 1 -> mean 0.5
    assert irs_scores(focus, mask).item() == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="no two of the 4 calibration samples share an image"):
        irs_scores(focus, pair_mask(["a", "b", "c", "d"], "same_image"))


def test_fewer_than_two_usable_samples_is_a_config_error_for_any_pairing():
    for pairing in ("any", "same_image"):
        with pytest.raises(ConfigError, match="1 calibration samples have an image and instruction tokens"):
            pair_mask(["a"], pairing)


def test_ties_go_to_the_shallower_layer():
    assert choose_layer(torch.tensor([0.1, 0.4, 0.4, 0.2], dtype=torch.float64)) == 1
    assert "1  0.4000  <- IVA layer" in format_table([0.1, 0.4, 0.4, 0.2], 1)


@pytest.mark.distributed
def test_irs_command(tmp_path, tiny_model, digitgrid):
    out = tmp_path / "irs"
    proc = launch(["-m", "aligntI.cli", "irs", "--model", str(tiny_model), "--data", str(digitgrid / "test.json"),
                   "--samples", "24", "--chat-template", "llava_v1_compact", "--batch-size", "5",
                   "--out", str(out)], launcher="torchrun")
    report = json.loads((out / "irs.json").read_text())
    assert report["samples"] == 24 and report["pairs"] == 24 * 23 // 2 and len(report["irs"]) == 2
    assert all(0 <= s <= 1 for s in report["irs"]) and not any(math.isnan(s) for s in report["irs"])
    assert report["chosen_layer"] == max(range(2), key=lambda i: (report["irs"][i], -i))
    assert report["queries"] == "instruction"
    assert f"Chosen IVA layer: {report['chosen_layer']}" in proc.stdout and "layer  IRS" in proc.stdout
    assert (out / "irs.png").stat().st_size > 1000
    # the same samples in one process give the same scores (the 2-rank run gathered every sample once)
    launch(["-m", "aligntI.cli", "irs", "--model", str(tiny_model), "--data", str(digitgrid / "test.json"),
            "--samples", "24", "--chat-template", "llava_v1_compact", "--out", str(tmp_path / "one")],
           launcher="python")
    single = json.loads((tmp_path / "one" / "irs.json").read_text())
    assert single["irs"] == pytest.approx(report["irs"], abs=1e-6)


def test_same_image_pairing_without_pairs_is_a_config_error(tmp_path, tiny_model, digitgrid, capsys):
    """DigitGrid draws a new image per question: pairing same_image finds no pairs, which the user must change."""
    assert main(["irs", "--model", str(tiny_model), "--data", str(digitgrid / "test.json"), "--samples", "6",
                 "--pairing", "same_image", "--chat-template", "llava_v1_compact", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "aligntI: config error: irs.pairing: same_image, but no two of the 6 calibration samples share" in err


def test_calibration_sample_is_seeded_spans_the_source_and_is_equal_per_rank():
    from aligntI.data.loader import sample_share

    shares = [sample_share(1000, 100, seed=3, rank=r, world_size=4) for r in range(4)]
    chosen = [i for share in shares for i in share]
    assert [len(s) for s in shares] == [25] * 4 and len(set(chosen)) == 100
    assert max(chosen) > 500  # drawn over the whole file, not its first records
    assert shares == [sample_share(1000, 100, seed=3, rank=r, world_size=4) for r in range(4)]
    assert set(chosen) != {i for r in range(4) for i in sample_share(1000, 100, seed=4, rank=r, world_size=4)}
    # Fewer records than asked, not divisible by the world size: every rank still gets the same count.
    small = [sample_share(10, 256, seed=0, rank=r, world_size=4) for r in range(4)]
    assert [len(s) for s in small] == [2] * 4 and len({i for s in small for i in s}) == 8
    with pytest.raises(ValueError, match="3 records"):
        sample_share(3, 256, seed=0, rank=0, world_size=4)


def test_calibration_loader_gives_every_rank_the_same_number_of_batches(tmp_path, tiny_model, digitgrid):
    from aligntI.config import DataConfig, DataSource
    from aligntI.data.loader import build_sequential_loader
    from aligntI.models.loading import load_processor

    records = json.loads((digitgrid / "train.json").read_text())[:10]
    path = tmp_path / "calib.json"
    path.write_text(json.dumps(records))
    processor = load_processor(tiny_model)
    data = DataConfig(train=[DataSource(str(path), images=str(digitgrid))], chat_template="llava_v1_compact",
                      num_workers=0)
    per_rank = [[sid for batch in build_sequential_loader(processor, data, batch_size=2, sample=256, seed=0,
                                                          rank=r, world_size=4) for sid in batch["sample_ids"]]
                for r in range(4)]
    assert [len(ids) for ids in per_rank] == [2] * 4
    assert len({sid for ids in per_rank for sid in ids}) == 8


def test_irs_focus_from_the_answer_start_rows_is_eager_attention_from_there(tiny_model, digitgrid):
    """``queries: answer_start``: every layer's focus is the attention, as eager attention gives it, from the one
    position whose logits predict the answer's first token, renormalised over the image."""
    from aligntI.config import AttentionConfig, DataConfig, DataSource
    from aligntI.data.dataset import model_inputs
    from aligntI.data.loader import build_sequential_loader
    from aligntI.hooks.attention import install
    from aligntI.irs import collect_focus
    from aligntI.models.loading import load_model, load_processor

    install()
    processor = load_processor(str(tiny_model))
    data = DataConfig(train=[DataSource(str(digitgrid / "test.json"), max_samples=6)], num_workers=0)
    loader = build_sequential_loader(processor, data, batch_size=3)
    model = load_model(str(tiny_model), AttentionConfig("sdpa", "sdpa"), torch.float32).eval()
    focus, _, left_out = collect_focus(model, model, loader, "cpu", torch.float32, show_progress=False,
                                       queries="answer_start")
    eager = load_model(str(tiny_model), AttentionConfig("eager", "eager"), torch.float32).eval()
    oracle = []
    with torch.no_grad():
        for batch in loader:
            attentions = eager(**model_inputs(batch), output_attentions=True, use_cache=False).attentions
            for b, labels in enumerate(batch["labels"].tolist()):
                (start,) = answer_starts(labels)
                vis = batch["vision_mask"][b]
                rows = torch.stack([a[b].mean(0)[start][vis] for a in attentions])
                oracle.append(rows / rows.sum(-1, keepdim=True))
    assert left_out == 0
    torch.testing.assert_close(focus, torch.stack(oracle, dim=1).to(focus.dtype), atol=1e-5, rtol=1e-4)


def test_a_saved_layer_is_reused_only_for_its_teacher_and_query_rows(tmp_path):
    report = tmp_path / "irs.json"
    assert saved_layer(report, "/models/teacher", "instruction") is None  # none yet
    report.write_text(json.dumps({"model": "/models/teacher", "queries": "answer_start", "chosen_layer": 5}))
    assert saved_layer(report, "/models/teacher", "answer_start") == 5
    assert saved_layer(report, "/models/other_teacher", "answer_start") is None
    assert saved_layer(report, "/models/teacher", "instruction") is None
    report.write_text(json.dumps({"model": "/models/teacher", "chosen_layer": 3}))  # written before queries existed
    assert saved_layer(report, "/models/teacher", "instruction") == 3
