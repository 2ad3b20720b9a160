"""Every recipe under recipes/paper/ resolves and dry-runs against the real model shapes (config files only,
written here: no weights), and the recipes chain: each stage reads what the one before it writes, starting
from what the assemble recipe writes."""

import re
from pathlib import Path

import pytest
from conftest import REPO
from transformers import LlavaConfig, Qwen2Config, Qwen3Config, SiglipVisionConfig

from aligntI.cli import AssembleRecipe
from aligntI.config import load_recipe
from aligntI.eval.recipe import load_eval_recipe
from aligntI.plan import format_plan, make_plan
from aligntI.yamlconf import load

PAPER = REPO / "recipes" / "paper"
ASSEMBLE = PAPER / "assemble.yaml"  # the starting models (aligntI assemble --config), not a training recipe
RECIPES = sorted(p for p in PAPER.rglob("*.yaml") if not p.name.startswith("_") and p != ASSEMBLE)

# The published shapes (config.json of each checkpoint on the hub).
SIGLIP_SO400M_384 = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                         image_size=384, patch_size=14)
LLMS = {
    "qwen2.5-0.5b": (Qwen2Config, dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                       num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                       tie_word_embeddings=True)),
    "qwen2.5-1.5b": (Qwen2Config, dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                       num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                                       tie_word_embeddings=True)),
    "qwen2.5-7b": (Qwen2Config, dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                     num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                     tie_word_embeddings=False)),
    "qwen3-0.6b": (Qwen3Config, dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                                     num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                                     vocab_size=151936, tie_word_embeddings=True)),
    "qwen3-1.7b": (Qwen3Config, dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                                     num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                                     vocab_size=151936, tie_word_embeddings=True)),
    "qwen3-8b": (Qwen3Config, dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                                   num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                   vocab_size=151936, tie_word_embeddings=False)),
}
# Samples per epoch of each stage's dataset (as the paper reports them), so that the plan shows real step counts.
SAMPLES = {"LLaVA-Pretrain": 558_128, "LLaVA-Instruct": 665_298, "ShareGPT4V": 1_246_901,
           "MobileVLM_V2_FT_Mix2M": 2_400_000}


def llava_config(name: str) -> LlavaConfig:
    cls, text = LLMS[name]
    image_token_id = text["vocab_size"] - 1
    return LlavaConfig(vision_config=SiglipVisionConfig(**SIGLIP_SO400M_384), text_config=cls(**text),
                       image_token_id=image_token_id, vision_feature_layer=-1,
                       vision_feature_select_strategy="full", tie_word_embeddings=text["tie_word_embeddings"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """What `aligntI assemble` and each training stage leave where the next stage looks: config.json only."""
    root = tmp_path_factory.mktemp("runs")
    for name in LLMS:
        dirs = [root / "init" / name]
        if name in ("qwen2.5-7b", "qwen3-8b"):
            dirs += [root / "teachers" / name / "pretrain" / "final", root / "teachers" / name / "instruct" / "final"]
        else:
            dirs += [root / "students" / name / "stage1" / "final"]
        for d in dirs:
            llava_config(name).save_pretrained(d)
    return root


def test_every_table_has_its_recipes():
    names = {str(p.relative_to(PAPER)) for p in RECIPES}
    for student in ("qwen2.5-0.5b", "qwen2.5-1.5b", "qwen3-0.6b", "qwen3-1.7b"):
        assert {f"students/{student}/{row}.yaml" for row in ("stage1", "sft", "vanilla_kd", "align_ti")} <= names
    for teacher in ("qwen2.5-7b", "qwen3-8b"):
        assert {f"teachers/{teacher}/pretrain.yaml", f"teachers/{teacher}/instruct.yaml"} <= names
    ablations = {n for n in names if n.startswith("ablations/")}
    assert {f"ablations/candidates/d{d}.yaml" for d in (1, 2, 8)} <= ablations
    assert {"ablations/components/iva.yaml", "ablations/components/tpa.yaml", "ablations/cost/vanilla_kd_1.5_epochs.yaml",
            "ablations/source/teacher.yaml", "ablations/source/gt_bigram.yaml", "ablations/iva_weights/uniform.yaml",
            "ablations/layer/layer_0.yaml"} <= ablations


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(PAPER)))
def test_paper_recipe_dry_runs_on_8_gpus(recipe, runs):
    overrides = [f"vars.runs={runs}"]
    cfg = load_recipe(recipe, overrides)
    dataset = Path(cfg.data.train[0].path).parent.name
    plan = make_plan(recipe, overrides, world_size=8, train_samples=SAMPLES[dataset])
    text = format_plan(plan)
    assert plan.fits, text  # every shipped recipe fits 80 GB GPUs by the estimate
    assert "global 128" in text or "global 256" in text
    steps = int(cfg.train.epochs * (SAMPLES[dataset] // cfg.train.global_batch_size))
    assert f"{steps:,} optimizer steps" in text, text
    # The stages chain: the model a recipe starts from is what an earlier stage exports (or assemble writes).
    assert (Path(cfg.model.path) / "config.json").is_file()
    if cfg.teacher is not None:
        assert cfg.teacher.path.endswith("/instruct/final")
        assert plan.teacher is not None


def readme_assemble_loop() -> list[str]:
    """The LLMs of the assemble loop in recipes/README.md."""
    text = (REPO / "recipes" / "README.md").read_text()
    loop = re.search(r"^for llm in (.+); do\n  aligntI assemble --config recipes/paper/assemble\.yaml "
                     r"vars\.llm=\$llm vars\.name=\$\(echo \$llm \| tr A-Z a-z\)\n", text, flags=re.MULTILINE)
    assert loop, "recipes/README.md: the assemble loop"
    return loop.group(1).split()


def test_the_assemble_recipe_writes_where_every_first_stage_starts(runs):
    firsts = {p.parent.name: p for p in RECIPES if p.name in ("stage1.yaml", "pretrain.yaml")}
    llms = readme_assemble_loop()
    assert sorted(llm.lower() for llm in llms) == sorted(firsts) == sorted(LLMS)
    for llm in llms:
        name = llm.lower()  # the loop's `tr A-Z a-z`
        cfg = load(ASSEMBLE, [f"vars.runs={runs}", "vars.models=/hub", f"vars.llm={llm}", f"vars.name={name}"],
                   AssembleRecipe)
        assert (cfg.vision, cfg.llm) == ("/hub/siglip-so400m-patch14-384", f"/hub/{llm}")
        assert cfg.out == load_recipe(firsts[name], [f"vars.runs={runs}"]).model.path == str(runs / "init" / name)


def test_the_evaluation_of_a_row_reads_its_run_dir(runs):
    """recipes/README.md evaluates an ablation with vars.student and vars.row: its model is the row's final/."""
    ablation = PAPER / "ablations" / "candidates" / "d2.yaml"
    run_dir = load_recipe(ablation, [f"vars.runs={runs}"]).run_dir
    model = load_eval_recipe(REPO / "recipes" / "eval" / "paper_benchmarks.yaml", [
        f"vars.runs={runs}", "vars.student=qwen2.5-0.5b", "vars.row=ablations/candidates/d2"]).model
    assert model == f"{run_dir}/final"
    readme = (REPO / "recipes" / "README.md").read_text()
    assert "vars.student=qwen2.5-0.5b \\\n  vars.row=ablations/candidates/d2" in readme
