"""Every LLaVA-class pair runs every loss term: {SigLIP, CLIP} towers x {Qwen2, Qwen3, Llama} decoders.

Per pair, a tiny teacher and a narrower student (sharing its tower) from the model builder; each run goes through
``recipes/train.py``'s code path in one process with a ZeRO-3 engine and must log a finite value of every term
it turns on, every step. The variants together cover SFT, the five KD divergences, IVA's weighted KL (teacher
attention, top-ratio, uniform) and attention mode, TPA from each candidate source and weighting, and Align-TI.
"""

import json

import pytest
import torch
from conftest import launch, write_recipe
from recipe_scripts import train_script
from test_hooks_attention import batch_for, write_mixed
from test_hooks_transitions import candidate_pass, rows_and_candidates, separate_candidate_logits
from test_models_assemble import IMAGE, VISION, qwen_tokenizer
from transformers import AutoTokenizer, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from aligntI.cli import main
from aligntI.config import AttentionConfig
from aligntI.data.dataset import model_inputs
from aligntI.hooks import attention as capture
from aligntI.hooks.transitions import PrefixCache
from aligntI.models.builder import TextSpec, TinyModelSpec, VisionSpec, write_model_dir
from aligntI.models.loading import load_model

TOWERS = ("siglip", "clip")
FAMILIES = ("qwen2", "qwen3", "llama")
PAIRS = [(tower, family) for tower in TOWERS for family in FAMILIES]

# (name, recipe sections); loss weights not named are 1.
VARIANTS = [
    ("align_ti", dict(kd={"divergence": "forward_kl"}, iva={"layer": "auto"},
                      tpa={"source": "student", "candidates": 3})),
    ("reverse_kl_iva_attention_tpa_teacher", dict(kd={"divergence": "reverse_kl"}, iva={"mode": "attention"},
                                                  tpa={"source": "teacher", "weighting": "student_prob"})),
    ("jsd_iva_uniform_tpa_bigram", dict(kd={"divergence": "jsd"}, iva={"weights": "uniform"},
                                        tpa={"source": "gt_bigram", "max_positions": 2})),
    ("skew_kl_iva_top_ratio", dict(kd={"divergence": "skew_kl"}, iva={"top_ratio": 0.5}, loss={"tpa": 0.0})),
    ("tvd", dict(kd={"divergence": "tvd", "temperature": 2.0}, loss={"iva": 0.0, "tpa": 0.0})),
]


@pytest.fixture(scope="module")
def pair_models(digitgrid, tmp_path_factory):
    """``(tower, family) -> (teacher dir, student dir)``."""
    root = tmp_path_factory.mktemp("pairs")
    tokenizer = AutoTokenizer.from_pretrained(digitgrid / "tokenizer")
    models = {}
    for tower, family in PAIRS:
        vision = VisionSpec(family=tower, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                            image_size=32, patch_size=8)
        teacher = TinyModelSpec(text=TextSpec(family=family, hidden_size=32, num_layers=3, num_heads=4,
                                              num_kv_heads=2, intermediate_size=64), vision=vision)
        student = TinyModelSpec(text=TextSpec(family=family, hidden_size=16, num_layers=2, num_heads=4,
                                              num_kv_heads=2, intermediate_size=32), vision=vision, seed=1)
        t_dir = write_model_dir(root / f"{tower}_{family}_teacher", teacher, tokenizer)
        s_dir = write_model_dir(root / f"{tower}_{family}_student", student, tokenizer, vision_from=t_dir)
        models[tower, family] = (t_dir, s_dir)
    return models


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def pair_recipe(tmp_path, name, teacher, student, digitgrid, ds_config, sections):
    distill = {"teacher": {"path": str(teacher)}, "irs": {"samples": 8},
               "iva": {"layer": 1, **sections.get("iva", {})},
               "loss": {"sft": 1.0, "kd": 1.0, "iva": 1.0, "tpa": 1.0, **sections.get("loss", {})}}
    rest = {k: v for k, v in sections.items() if k not in ("iva", "loss")}
    return write_recipe(tmp_path / f"{name}.yaml", student, digitgrid, tmp_path / name, ds_config,
                        train={"max_steps": 2, "global_batch_size": 4, "micro_batch_size": 2, "save_every": 0},
                        **distill, **rest)


@pytest.mark.parametrize(("tower", "family"), PAIRS)
def test_every_term_on_every_pair(tower, family, pair_models, digitgrid, tmp_path, zero3_partitioned):
    teacher, student = pair_models[tower, family]
    sft = write_recipe(tmp_path / "sft.yaml", student, digitgrid, tmp_path / "sft", zero3_partitioned,
                       train={"max_steps": 2, "global_batch_size": 4, "micro_batch_size": 2, "save_every": 0})
    assert train_script.main(["--config", str(sft)]) == 0
    assert all(m["loss"] == m["loss"] and m["loss"] > 0 for m in read_metrics(tmp_path / "sft"))
    for name, sections in VARIANTS:
        recipe = pair_recipe(tmp_path, name, teacher, student, digitgrid, zero3_partitioned, sections)
        assert train_script.main(["--config", str(recipe)]) == 0, name
        weights = {"sft": 1.0, "kd": 1.0, "iva": 1.0, "tpa": 1.0, **sections.get("loss", {})}
        terms = [term for term, weight in weights.items() if weight > 0]
        metrics = read_metrics(tmp_path / name)
        assert [m["step"] for m in metrics] == [1, 2], name
        for m in metrics:
            values = [m[term] for term in terms]
            assert all(torch.isfinite(torch.tensor(v)) and v >= 0 for v in values), (name, m)
            assert m["loss"] == pytest.approx(sum(weights[t] * m[t] for t in terms), rel=1e-6), (name, m)
            assert sum(m[t] for t in terms if t != "sft") > 0, (name, m)  # the distillation terms do something
        if name == "align_ti":
            assert json.loads((tmp_path / name / "irs.json").read_text())["chosen_layer"] in range(3)


@pytest.mark.parametrize(("tower", "family"), PAIRS)
def test_tpa_keywords_reach_only_the_text_decoder(tower, family, pair_models, digitgrid, tmp_path):
    """The vision tower's attention gets the forward's keywords too; only the text decoder records and reads,
    and the candidate logits still equal separate forwards of prefix + candidate."""
    capture.install()
    teacher, _ = pair_models[tower, family]
    model = load_model(teacher, AttentionConfig("sdpa", "sdpa")).eval()
    batch = batch_for(teacher, write_mixed(tmp_path, digitgrid), "left")
    prefix = PrefixCache(model)
    with torch.no_grad():
        model(**model_inputs(batch), use_cache=False, prefix_cache=prefix)
    assert sorted(prefix.layers) == list(range(len(capture.decoder_layers(model))))
    rows, candidates = rows_and_candidates(batch, 3, model.config.text_config.vocab_size)
    with torch.no_grad():
        _, per_candidate = candidate_pass(model, batch, rows, candidates)
        oracle = separate_candidate_logits(model, batch, rows, candidates)
    torch.testing.assert_close(per_candidate, oracle, atol=2e-5, rtol=0)


def test_clip_llama_align_ti_zero3_two_ranks(pair_models, digitgrid, tmp_path, zero3_partitioned):
    teacher, student = pair_models["clip", "llama"]
    recipe = pair_recipe(tmp_path, "clip_llama", teacher, student, digitgrid, zero3_partitioned,
                         dict(iva={"layer": "auto"}, tpa={"candidates": 2}))
    launch(["recipes/train.py", "--config", str(recipe), "train.max_steps=3"], launcher="torchrun")
    metrics = read_metrics(tmp_path / "clip_llama")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert all(torch.isfinite(torch.tensor(m[t])) and m[t] > 0 for t in ("sft", "kd", "iva", "tpa")), m
        assert m["tpa_positions"] > 0


def write_llama(path, hidden_size: int, num_layers: int, seed: int):
    """A tiny pretrained-style Llama causal LM with a byte-level tokenizer (no ``<image>``: assemble adds it)."""
    tokenizer = qwen_tokenizer()
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer) + 3, hidden_size=hidden_size,
                                 num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                                 intermediate_size=2 * hidden_size, eos_token_id=tokenizer.eos_token_id,
                                 tie_word_embeddings=False)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_assembled_clip_llama_pair_runs_align_ti(digitgrid, tmp_path, zero3_partitioned):
    """``aligntI assemble``'s CLIP layout (penultimate layer, CLS dropped) with a Llama decoder, both models."""
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(**VISION)).save_pretrained(tmp_path / "clip")
    CLIPImageProcessorPil(size={"shortest_edge": IMAGE},
                          crop_size={"height": IMAGE, "width": IMAGE}).save_pretrained(tmp_path / "clip")
    models = {}
    for role, (hidden, layers) in {"teacher": (32, 3), "student": (16, 2)}.items():
        llm = write_llama(tmp_path / f"llama_{role}", hidden, layers, seed=len(models))
        models[role] = tmp_path / role
        assert main(["assemble", "--vision", str(tmp_path / "clip"), "--llm", str(llm), "--out", str(models[role]),
                     "--dtype", "float32", "--chat-template", "llava_v1_compact"]) == 0
    config = json.loads((models["teacher"] / "config.json").read_text())
    assert (config["vision_feature_layer"], config["vision_feature_select_strategy"]) == (-2, "default")
    recipe = pair_recipe(tmp_path, "assembled", models["teacher"], models["student"], digitgrid, zero3_partitioned,
                         dict(iva={"layer": "auto"}, data={"max_length": 160}))
    assert train_script.main(["--config", str(recipe)]) == 0
    for m in read_metrics(tmp_path / "assembled"):
        assert all(torch.isfinite(torch.tensor(m[t])) and m[t] > 0 for t in ("sft", "kd", "iva", "tpa")), m
