"""recipes/benchmarks/flops.py: its counts against FLOPs worked out by hand from the shapes, and its replay of a
step's passes on meta models against the same passes run for real."""

import contextlib
import importlib.util
import sys

import pytest
import torch
from conftest import REPO
from test_hooks_attention import batch_for, write_mixed
from transformers import Qwen2Config, Qwen2ForCausalLM

from aligntI.config import AttentionConfig
from aligntI.data.dataset import model_inputs
from aligntI.hooks import attention as capture
from aligntI.hooks.transitions import CandidateBatch, JointPass, PrefixCache
from aligntI.losses.tpa import scored_rows
from aligntI.models.loading import load_model, set_trainable


@pytest.fixture(scope="module")
def flops():
    path = REPO / "recipes" / "benchmarks" / "flops.py"
    spec = importlib.util.spec_from_file_location("bench_flops", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look the module up while it executes
    spec.loader.exec_module(module)
    return module


def linear_weights(model) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_text_model_counts_two_flops_per_weight_per_token_plus_dense_attention(flops, device):
    cfg = Qwen2Config(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=96, attn_implementation="sdpa")
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg)
    batch, length, head_dim = 3, 11, cfg.hidden_size // cfg.num_attention_heads
    ids = torch.zeros((batch, length), dtype=torch.long, device=device)
    tokens, weights = batch * length, linear_weights(model)
    # Q·Kᵀ and P·V over every (query, key) pair of every head: the kernel's dense blocks.
    attention = cfg.num_hidden_layers * batch * cfg.num_attention_heads * length * length * head_dim
    sdpa = flops.FusedSDPA() if device == "meta" else contextlib.nullcontext()
    out = {}

    def step():
        with sdpa:
            logits = model(input_ids=ids).logits
            out["forward"] = c.get_total_flops()
            logits.sum().backward()

    with flops.counter() as c:
        step()
    assert out["forward"] == 2 * tokens * weights + 4 * attention
    # Backward: the input and the weight gradient of every matmul (embeddings train, so all inputs need one);
    # the fused kernel's backward recomputes Q·Kᵀ, then four blocks.
    assert c.get_total_flops() - out["forward"] == 4 * tokens * weights + 10 * attention


def test_replay_on_meta_counts_what_the_real_passes_count(flops, tmp_path, digitgrid, tiny_model):
    """A TPA student's passes (ground truth with its prefix record, candidates, one backward), real and on meta;
    the candidate pass also against its shape: d·|R| query rows, each against L prefix keys and R candidates."""
    capture.install()
    batch = batch_for(tiny_model, write_mixed(tmp_path, digitgrid), "right")
    model = load_model(tiny_model, AttentionConfig("sdpa", "sdpa")).train()
    set_trainable(model, ["projector", "llm"])
    rows = scored_rows(batch["labels"])
    d = flops.D
    candidates = torch.zeros((int(rows.sum()), d), dtype=torch.long)
    layout = CandidateBatch(rows, candidates, batch["attention_mask"], batch["position_ids"])
    real = {}

    def passes():
        prefix = PrefixCache(model)
        gt = model(**model_inputs(batch), logits_to_keep=rows, use_cache=False, prefix_cache=prefix).logits
        real["gt"] = c.get_total_flops()
        cand = model(**layout.model_inputs(prefix)).logits
        real["candidates"] = c.get_total_flops() - real["gt"]
        (gt.sum() + cand.sum()).backward()

    with flops.counter() as c:
        passes()
    real["total"] = c.get_total_flops()

    trace = [flops.Pass("student", "gt", True, "response", False),
             flops.Pass("student", "candidates", True, "response", False)]
    meta = flops.replay(trace, {"student": flops.meta_model_from_dir(tiny_model, ["projector", "llm"])}, batch,
                        rows, {"student": None})
    assert [p.flops for p in meta["passes"]] == [real["gt"], real["candidates"]]
    assert meta["student"] == real["total"]

    text = model.config.text_config
    width, length = layout.input_ids.shape[1], batch["input_ids"].shape[1]
    head_dim = text.hidden_size // text.num_attention_heads
    decoder = linear_weights(model.model.language_model)
    attention = text.num_hidden_layers * batch["input_ids"].shape[0] * d * text.num_attention_heads * width * \
        (length + width) * head_dim
    kept = candidates.numel()
    assert real["candidates"] == 2 * layout.input_ids.numel() * decoder + 4 * attention + \
        2 * kept * text.hidden_size * text.vocab_size


def test_replay_on_meta_counts_what_the_real_joint_pass_counts(flops, tmp_path, digitgrid, tiny_model):
    """One forward over ground truth and candidates with a graph, then backward: real and on meta."""
    capture.install()
    batch = batch_for(tiny_model, write_mixed(tmp_path, digitgrid), "left")
    model = load_model(tiny_model, AttentionConfig("sdpa", "sdpa")).train()
    set_trainable(model, ["projector", "llm"])
    rows = scored_rows(batch["labels"])
    layout = CandidateBatch(rows, torch.zeros((int(rows.sum()), flops.D), dtype=torch.long), batch["attention_mask"],
                            batch["position_ids"])
    joint = JointPass(model, layout, model_inputs(batch), rows)
    with flops.counter() as c:
        model(**joint.inputs).logits.sum().backward()
    meta = flops.replay([flops.Pass("student", "joint", True, "response", False)],
                        {"student": flops.meta_model_from_dir(tiny_model, ["projector", "llm"])}, batch, rows,
                        {"student": None})
    assert meta["student"] == c.get_total_flops()


def test_gpu_check_names_the_pinned_wheels_of_what_is_missing(monkeypatch, capsys):
    path = REPO / "recipes" / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("bench_gpu_check", path)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    pinned = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().splitlines()
                  if "==" in line and not line.startswith("#"))
    monkeypatch.setattr(gpu_check, "NEEDED", {"torch": "torch", "not_installed_a": "deepspeed",
                                              "not_installed_b": "hjson"})
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.check_imports()
    assert exit_info.value.code == 2
    out = capsys.readouterr().out
    assert f"pip wheel --no-deps -w .whl deepspeed=={pinned['deepspeed']}" in out  # no wheel on PyPI: built
    assert f"-d .whl hjson=={pinned['hjson']}" in out
    assert "torch==" not in out
