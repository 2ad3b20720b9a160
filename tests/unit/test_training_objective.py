"""TPA's draws inside the distillation recipe: random streams, and candidates only among real tokens."""

import pytest
import torch
from conftest import write_recipe
from recipe_scripts import train_script
from test_hooks_attention import batch_for, write_mixed
from transformers import AutoTokenizer

from aligntI.config import load_recipe
from aligntI.data.dataset import model_inputs
from aligntI.losses.tpa import scored_rows, tpa_seeds
from aligntI.models.builder import TextSpec, TinyModelSpec, VisionSpec, write_model_dir
from aligntI.training.objective import TPADraws


def test_position_and_candidate_streams_are_independent_and_reproducible():
    positions, candidates = tpa_seeds(0, 7, 1, 3)
    assert positions != candidates
    assert (positions, candidates) == tpa_seeds(0, 7, 1, 3)
    assert len({tpa_seeds(0, step, micro, rank) for step in range(3) for micro in range(2) for rank in range(2)}) == 12
    # On the CPU one seed means one stream: the candidates' Gumbel noise must not replay the positions' keys.
    a = torch.rand(64, generator=torch.Generator().manual_seed(positions))
    b = torch.rand(64, generator=torch.Generator().manual_seed(candidates))
    assert not torch.equal(a, b) and abs(torch.corrcoef(torch.stack([a, b]))[0, 1]) < 0.5


@pytest.fixture(scope="module")
def padded_pair(digitgrid, tmp_path_factory):
    """Teacher and student whose embeddings have padding rows past the tokenizer's ids, as Qwen2.5's do."""
    root = tmp_path_factory.mktemp("padded")
    tokenizer = AutoTokenizer.from_pretrained(digitgrid / "tokenizer")
    vision = VisionSpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    spec = TinyModelSpec(text=TextSpec(hidden_size=32, num_layers=2, intermediate_size=64), vision=vision,
                         vocab_multiple=64)
    teacher = write_model_dir(root / "teacher", spec, tokenizer)
    student = write_model_dir(root / "student", spec, tokenizer, vision_from=teacher)
    return teacher, student, len(tokenizer)


@pytest.mark.parametrize("source", ["student", "teacher", "gt_bigram"])
def test_candidates_are_never_embedding_padding_rows(source, padded_pair, digitgrid, tmp_path, zero3_partitioned):
    teacher, student, n_tokens = padded_pair
    recipe_path = write_recipe(tmp_path / "r.yaml", student, digitgrid, tmp_path / "run", zero3_partitioned,
                               teacher={"path": str(teacher)}, loss={"iva": 0.0},
                               tpa={"source": source, "candidates": 4})
    objective = train_script.build(load_recipe(recipe_path), []).objective
    assert objective.shared.size % 64 == 0 and objective.shared.token_ids == n_tokens < objective.shared.size
    batch = batch_for(student, write_mixed(tmp_path, digitgrid), "right")
    rows = scored_rows(batch["labels"])
    targets = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)[rows]
    logits = torch.zeros(int(rows.sum()), objective.shared.size)
    logits[:, n_tokens:] = 30.0  # the padding rows are by far the likeliest "tokens"
    candidates, weights = objective.candidates(TPADraws(rows, 5), model_inputs(batch), rows, targets, logits, logits)
    assert candidates.shape == (int(rows.sum()), 4)
    assert int(candidates.max()) < n_tokens
    assert torch.allclose(weights.sum(-1), torch.ones(1))
