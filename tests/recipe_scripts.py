"""``recipes/train.py`` loaded as a module, for tests that call its functions in this process."""

import importlib.util
import sys
from pathlib import Path

TRAIN_PY = Path(__file__).resolve().parents[1] / "recipes" / "train.py"


def load_script(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem + "_script", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


train_script = load_script(TRAIN_PY)
