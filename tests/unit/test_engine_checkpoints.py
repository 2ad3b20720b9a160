"""Checkpoint bookkeeping: an interrupted save never replaces the last good checkpoint."""

from aligntI.engine import latest_complete_checkpoint, prune_checkpoints


def make(root, tag, complete=True):
    (root / tag).mkdir(parents=True)
    (root / tag / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        (root / tag / "COMPLETE").write_text("ok\n")


def test_interrupted_save_is_never_resumed_from(tmp_path):
    assert latest_complete_checkpoint(tmp_path) is None
    make(tmp_path, "step_00000008")
    (tmp_path / "latest").write_text("step_00000008\n")
    make(tmp_path, "step_00000016", complete=False)  # the job died while writing step 16
    assert latest_complete_checkpoint(tmp_path) == "step_00000008"


def test_latest_pointer_to_an_incomplete_or_missing_tag_falls_back(tmp_path):
    make(tmp_path, "step_00000008")
    make(tmp_path, "step_00000016")
    make(tmp_path, "step_00000024", complete=False)
    (tmp_path / "latest").write_text("step_00000024\n")
    assert latest_complete_checkpoint(tmp_path) == "step_00000016"
    (tmp_path / "latest").write_text("step_00000099\n")
    assert latest_complete_checkpoint(tmp_path) == "step_00000016"


def test_prune_keeps_the_newest_complete_and_never_the_resume_point(tmp_path):
    for step in (8, 16, 24, 32):
        make(tmp_path, f"step_{step:08d}")
    make(tmp_path, "step_00000004", complete=False)  # an old crashed save
    make(tmp_path, "step_00000040", complete=False)  # a save in progress or crashed after the latest
    (tmp_path / "latest").write_text("step_00000032\n")
    prune_checkpoints(tmp_path, keep_last=2)
    left = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert left == ["step_00000024", "step_00000032", "step_00000040"]
    assert latest_complete_checkpoint(tmp_path) == "step_00000032"
