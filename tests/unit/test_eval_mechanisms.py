"""The mechanism measurements against brute force: the transition KL against one full forward per off-path
token, the IVA weight share against eager ``output_attentions``."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import answer_starts, write_tiny_model

from aligntI.config import AttentionConfig
from aligntI.data.dataset import model_inputs
from aligntI.eval.mechanisms import divergences, held_out_loader, teacher_focus
from aligntI.hooks.attention import install
from aligntI.models.loading import load_model, load_processor
from aligntI.tasks.digitgrid import write_tokenizer
from aligntI.tasks.gridread import GridReadOptions, cell_token_mask, write_gridread

SAMPLES = 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("mech")
    # 2x2 digits at 32 px: 16 vision tokens with patch 8, one cell = 4 of them
    write_gridread(root / "data", GridReadOptions(grid=2, upscale=2, mix={"cell": 1, "row": 1},
                                                  train_size=30, val_size=0, test_size=SAMPLES), progress=False)
    write_tokenizer(root / "data")
    teacher = write_tiny_model(root / "teacher", root / "data" / "tokenizer")
    student = write_tiny_model(root / "student", root / "data" / "tokenizer", hidden_size=16, num_layers=1)
    install()
    records = {r["id"]: r for r in json.loads((root / "data" / "test.json").read_text())}
    return root, teacher, student, records


def _kl(t, s):
    t, s = F.log_softmax(t.double(), -1), F.log_softmax(s.double(), -1)
    return float((t.exp() * (t - s)).sum())


def test_transition_kl_equals_a_full_forward_after_each_off_path_token(setup):
    root, t_dir, s_dir, records = setup
    processor = load_processor(str(t_dir))
    t_model, s_model = (load_model(str(d), AttentionConfig(), torch.float32).eval() for d in (t_dir, s_dir))
    size = t_model.config.get_text_config().vocab_size
    loader = held_out_loader(processor, str(root / "data" / "test.json"), SAMPLES, batch_size=2)
    # Every token but the ground truth and the image placeholder is drawn: the mean is over all of them.
    got = divergences(t_model, s_model, loader, records, candidates=size - 2, never=(processor.image_token_id,))
    gt_sum = tr_sum = positions = 0.0
    with torch.no_grad():
        for batch in loader:
            inputs = model_inputs(batch)
            for b in range(len(batch["sample_ids"])):
                pixels = inputs["pixel_values"][b : b + 1]
                ids = inputs["input_ids"][b][inputs["attention_mask"][b].bool()]  # right padding
                labels = batch["labels"][b][: len(ids)]
                for t in range(len(ids) - 1):
                    if labels[t + 1] == -100:
                        continue
                    t_full = t_model(input_ids=ids[None], pixel_values=pixels).logits[0, t]
                    s_full = s_model(input_ids=ids[None], pixel_values=pixels).logits[0, t]
                    gt_sum += _kl(t_full, s_full)
                    others = [v for v in range(size) if v not in (int(labels[t + 1]), processor.image_token_id)]
                    seqs = torch.stack([torch.cat([ids[: t + 1], torch.tensor([v])]) for v in others])
                    t_next = t_model(input_ids=seqs, pixel_values=pixels.expand(len(others), -1, -1, -1)).logits[:, -1]
                    s_next = s_model(input_ids=seqs, pixel_values=pixels.expand(len(others), -1, -1, -1)).logits[:, -1]
                    tr_sum += sum(_kl(a, c) for a, c in zip(t_next, s_next)) / len(others)
                    positions += 1
    assert got["all"]["positions"] == positions
    assert got["all"]["gt_kl"] == pytest.approx(gt_sum / positions, rel=1e-4)
    assert got["all"]["transition_kl"] == pytest.approx(tr_sum / positions, rel=1e-4)
    same = divergences(t_model, t_model, loader, records, candidates=4, never=(processor.image_token_id,))
    assert same["all"]["gt_kl"] == pytest.approx(0, abs=1e-6) and same["all"]["transition_kl"] == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("queries", ["instruction", "answer_start"])
def test_iva_weight_share_equals_eager_attention_on_the_relevant_cells(setup, queries):
    root, t_dir, _, records = setup
    processor = load_processor(str(t_dir))
    model = load_model(str(t_dir), AttentionConfig("eager", "sdpa"), torch.float32).eval()
    loader = held_out_loader(processor, str(root / "data" / "test.json"), SAMPLES, batch_size=2)
    got = teacher_focus(model, loader, records, grid=2, iva_layer=1, queries=queries)
    shares, token_shares = [], []
    with torch.no_grad():
        for batch in loader:
            att = model(**model_inputs(batch), output_attentions=True).attentions[1]  # [B, H, L, L]
            for b, sid in enumerate(batch["sample_ids"]):
                vis, labels = batch["vision_mask"][b], batch["labels"][b].tolist()
                if queries == "instruction":
                    rows = batch["instruction_mask"][b].nonzero().squeeze(-1).tolist()
                else:  # the one position whose logits predict the answer's first token
                    rows = answer_starts(labels)
                focus = att[b][:, rows][:, :, vis].mean((0, 1))
                focus = focus / focus.sum()
                relevant = torch.from_numpy(cell_token_mask(records[sid]["cells"], 2, 4))
                shares.append(float(focus[relevant].sum()))
                token_shares.append(float(relevant.float().mean()))
    assert got["relevant"]["all"]["n"] == SAMPLES
    assert got["relevant"]["all"]["weight_share"] == pytest.approx(sum(shares) / SAMPLES, rel=1e-4)
    assert got["relevant"]["all"]["token_share"] == pytest.approx(sum(token_shares) / SAMPLES, rel=1e-6)
    assert len(got["irs"]) == 2
