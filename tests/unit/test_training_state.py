"""Checkpoint contents beyond the engine's: a checkpoint's model against the one a restart builds."""

import pytest
import torch

from aligntI.config import ConfigError
from aligntI.training.state import ResumePoint, check_shapes, param_shapes


def point_of(model, model_path: str) -> ResumePoint:
    return ResumePoint("step_00000005", 5, {"param_shapes": param_shapes(model),
                                            "recipe": {"model": {"path": model_path}}})


def test_param_shapes_records_every_parameter():
    assert param_shapes(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))) == {
        "0.weight": [3, 4], "0.bias": [3], "1.weight": [3], "1.bias": [3]}


def test_a_checkpoint_of_the_same_shapes_fits():
    check_shapes(point_of(torch.nn.Linear(4, 3), "/m/a"), torch.nn.Linear(4, 3), "/m/b", "ckpt")


def test_a_checkpoint_of_another_model_is_one_message_naming_both():
    with pytest.raises(ConfigError) as err:
        check_shapes(point_of(torch.nn.Linear(4, 3), "/models/narrow"), torch.nn.Linear(8, 3), "/models/wide",
                     "/run/checkpoints/step_00000005")
    assert str(err.value) == (
        "resume: /run/checkpoints/step_00000005 holds a model trained from /models/narrow that does not fit "
        "model.path /models/wide: weight is [3, 4] there and [3, 8] here (1 parameters of other shapes, 0 missing "
        "here, 0 not in the checkpoint). Ways on: a new run_dir, or resume: never to start over")
    with pytest.raises(ConfigError, match=r"bias is only there \(0 parameters of other shapes, 1 missing here"):
        check_shapes(point_of(torch.nn.Linear(4, 3), "/a"), torch.nn.Linear(4, 3, bias=False), "/b", "ckpt")
