"""The checks that need one NVIDIA GPU, in one script that needs no network (a few minutes on an H100/H200).

    python recipes/benchmarks/gpu_check.py [--peak-tflops 989] [--steps 6] [--variants ...] [--out runs/gpu_check]
    python recipes/benchmarks/gpu_check.py --dry-run     # the same checks on the CPU at tiny sizes, fp32

1. Imports: every package the checks import, found or not; for what is missing it prints the pinned versions
   (constraints.txt) and the commands that bring them as wheels, and exits 2 before any work.
2. Attention capture in bf16 (``aligntI.hooks.attention.AttentionCapture``, SDPA) on a small random LLaVA
   against the same model's eager ``output_attentions`` probabilities.
3. TPA's candidate pass in bf16 (``PrefixCache`` + ``CandidateBatch``) and the joint pass (``JointPass``)
   against a separate forward of each checked candidate after its ground-truth prefix.
4. A short Align-TI run at Qwen2.5-1.5B (teacher) / Qwen2.5-0.5B (student) widths, random weights, a
   SigLIP-so400m-wide tower (729 image tokens) and synthetic ~930-token samples, through recipes/train.py's own
   ``build`` + ``train_step`` with ZeRO-3 engines, each variant in its own process: vanilla_kd, iva, tpa,
   align_ti, tpa_paper. Per variant: the fastest step after the first, peak memory
   (``torch.cuda.max_memory_allocated``) and FLOP utilisation: the step's FLOPs (flops.py's count of the first
   step, teacher and student) / step time / ``--peak-tflops`` (dense bf16; H100/H200 SXM: 989).

Exits non-zero with a line saying what failed when a check fails; writes ``--out``/gpu_check.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RUN_VARIANTS = ("vanilla_kd", "iva", "tpa", "align_ti", "tpa_paper")
# Top-level module -> its distribution on PyPI: what the checks import, directly or through aligntI/DeepSpeed.
NEEDED = {
    "torch": "torch", "transformers": "transformers", "tokenizers": "tokenizers", "safetensors": "safetensors",
    "accelerate": "accelerate", "deepspeed": "deepspeed", "hjson": "hjson", "pydantic": "pydantic",
    "pydantic_core": "pydantic_core", "annotated_types": "annotated-types", "typing_inspection": "typing-inspection",
    "einops": "einops", "msgpack": "msgpack", "ninja": "ninja", "psutil": "psutil", "cpuinfo": "py-cpuinfo",
    "packaging": "packaging", "numpy": "numpy", "yaml": "PyYAML", "PIL": "pillow", "tqdm": "tqdm",
    "matplotlib": "matplotlib", "sklearn": "scikit-learn",
}
SDIST_ONLY = {"deepspeed"}  # PyPI has no wheel: build one (pure Python) where pip works


def say(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def fail(msg: str) -> None:
    sys.exit(f"[gpu_check] FAILED: {msg}")


# ---------------------------------------------------------------------------------------------- 1. imports

def pins() -> dict[str, str]:
    out = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            out[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    return out


def check_imports() -> None:
    missing = [dist for module, dist in NEEDED.items() if importlib.util.find_spec(module) is None]
    if not missing:
        import torch
        import transformers

        pinned = pins().get("transformers")
        say(f"imports: all found; torch {torch.__version__}, transformers {transformers.__version__}"
            + ("" if transformers.__version__ == pinned else f" (the tests pass with {pinned}: carry that wheel "
               "if a check fails on this one)"))
        return
    versions = pins()
    spec = [f"{d}=={versions.get(re.sub(r'[-_.]+', '-', d).lower(), '?')}" for d in missing]
    built = [s for s, d in zip(spec, missing) if d in SDIST_ONLY]
    fetched = [s for s, d in zip(spec, missing) if d not in SDIST_ONLY]
    lines = [f"missing packages: {' '.join(spec)}",
             "bring them as wheels: on a machine with pip and PyPI, in the repository root (Python 3.12, x86-64):",
             "  echo /.whl/ >> .git/info/exclude"]
    if built:
        lines.append(f"  python3 -m pip wheel --no-deps -w .whl {' '.join(built)}   # sdist only: a pure-Python wheel")
    if fetched:
        lines.append("  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "
                     "--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "
                     f"-d .whl {' '.join(fetched)}")
    lines += ["then on the GPU machine, before this script:",
              "  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && "
              "export PYTHONPATH=/tmp/site:$PYTHONPATH"]
    print("\n".join(lines), flush=True)
    sys.exit(2)


# ---------------------------------------------------------------------------------------------- 2.-3. kernels

def small_model(device, dtype, dry_run: bool):
    """A small random LLaVA (SigLIP + Qwen2, GQA) from aligntI's builder, and a batch of mixed lengths."""

    from flops import Vocabulary, synthetic_batch

    from aligntI.hooks import attention as capture
    from aligntI.models.builder import TextSpec, TinyModelSpec, VisionSpec, build_model

    capture.install()
    text = TextSpec("qwen2", 64, 2, 4, 2, 128) if dry_run else TextSpec("qwen2", 512, 4, 8, 2, 1024)
    vision = VisionSpec("siglip", 32, 1, 2, 64, 32, 8) if dry_run else VisionSpec("siglip", 256, 2, 4, 512, 224, 14)
    vocab = Vocabulary(512)
    spec = TinyModelSpec(text, vision)
    model = build_model(spec, vocab).to(device, dtype).eval()
    tokens = (vision.image_size // vision.patch_size) ** 2
    batch = synthetic_batch(tokens, 12, (5, 9, 3), vision.image_size, vocab, pixels_device="cpu")
    inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "position_ids")}
    inputs["pixel_values"] = batch["pixel_values"].to(device, dtype)
    return model, spec, vocab, batch, inputs


def check_capture(model, batch, inputs, tol: float) -> float:
    import copy

    import torch

    from aligntI.hooks.attention import AttentionCapture, padded_positions

    layer = 1
    masks = [batch[k].to(inputs["input_ids"].device) for k in ("instruction_mask", "vision_mask", "attention_mask")]
    with torch.no_grad(), AttentionCapture(model, [layer], *masks) as cap:
        model(**inputs, use_cache=False)
    got = cap[layer]
    eager = copy.deepcopy(model)
    eager.set_attn_implementation({"text_config": "eager"})
    with torch.no_grad():
        full = eager(**inputs, output_attentions=True, use_cache=False).attentions[layer].float()
    inst_idx, inst_valid = (t.to(full.device) for t in padded_positions(masks[0].bool()))
    vis_idx, vis_valid = (t.to(full.device) for t in padded_positions(masks[1].bool()))
    rows = full.gather(2, inst_idx[:, None, :, None].expand(-1, full.shape[1], -1, full.shape[3]))
    ref = rows.gather(3, vis_idx[:, None, None, :].expand(-1, full.shape[1], rows.shape[2], -1))
    ref = ref * (inst_valid[:, None, :, None] & vis_valid[:, None, None, :])
    err = float((got - ref).abs().max())
    say(f"attention capture ({model.dtype}, sdpa) vs eager output_attentions: max abs error {err:.2e} "
        f"(tolerance {tol:.0e}; probabilities up to {float(ref.max()):.3f})")
    if err > tol:
        fail(f"attention capture differs from eager output_attentions by {err:.3e} > {tol:.0e}")
    return err


def check_candidates(model, vocab, batch, inputs, tol: float, checked: int = 8) -> dict:
    """Candidate and joint passes vs separate forwards of prefix + candidate; error relative to the logits' scale."""
    import torch

    from aligntI.hooks.transitions import CandidateBatch, JointPass, PrefixCache
    from aligntI.losses.tpa import scored_rows

    device, d = inputs["input_ids"].device, 3
    rows = scored_rows(batch["labels"])
    generator = torch.Generator().manual_seed(0)
    candidates = torch.randint(vocab.image_token_id + 1, len(vocab), (int(rows.sum()), d), generator=generator)
    with torch.no_grad():
        prefix = PrefixCache(model)
        plain = model(**inputs, logits_to_keep=rows.to(device), use_cache=False, prefix_cache=prefix).logits
        layout = CandidateBatch(rows, candidates.to(device), inputs["attention_mask"], inputs["position_ids"])
        cand = layout.in_candidate_order(model(**layout.model_inputs(prefix)).logits)
        joint = JointPass(model, layout, inputs, rows.to(device))
        joint_gt, joint_cand = joint.split(model(**joint.inputs).logits)
        picks = random.Random(0).sample(range(candidates.numel()), min(checked, candidates.numel()))
        positions = rows.nonzero().tolist()
        oracle = []
        for i in picks:
            (b, t), v = positions[i // d], int(candidates.flatten()[i])
            ids = inputs["input_ids"][b:b + 1, : t + 2].clone()
            ids[0, t + 1] = v
            oracle.append(model(input_ids=ids, attention_mask=inputs["attention_mask"][b:b + 1, : t + 2],
                                position_ids=inputs["position_ids"][b:b + 1, : t + 2],
                                pixel_values=inputs["pixel_values"][b:b + 1], use_cache=False).logits[0, -1])
        oracle = torch.stack(oracle).float()
    scale = float(oracle.abs().max())
    errors = {f"candidate pass vs separate forwards ({len(picks)} candidates)":
              float((cand[picks].float() - oracle).abs().max()) / scale,
              f"joint pass's candidates vs separate forwards ({len(picks)} candidates)":
              float((joint_cand[picks].float() - oracle).abs().max()) / scale,
              "joint pass's ground truth vs the plain pass": float((joint_gt.float() - plain.float()).abs().max()) / scale}
    for name, err in errors.items():
        say(f"TPA {name} ({model.dtype}): max abs error {err:.2e} of the logits' scale {scale:.2f} "
            f"(tolerance {tol:.0e})")
    bad = {k: v for k, v in errors.items() if v > tol}
    if bad:
        fail(f"TPA passes differ from separate forwards: {bad} > {tol:.0e}")
    return errors


# ---------------------------------------------------------------------------------------------- 4. Align-TI run

def write_run_models(root: Path, dry_run: bool) -> None:
    """Data and tokenizer (distill_cost's paper shape: 729 image tokens, 64 + 128 words), then the two models."""
    import yaml
    from distill_cost import write_paper_shape_data

    from aligntI.models.builder import init_model_dir

    if (root / "student" / "config.json").is_file():
        return
    tokenizer, _, _ = write_paper_shape_data(root)
    vision = {"family": "siglip", "hidden_size": 1152, "num_layers": 27, "num_heads": 16, "intermediate_size": 4304,
              "image_size": 216, "patch_size": 8}  # SigLIP-so400m widths; 27 x 27 = 729 image tokens as at 384/14
    texts = {"teacher": {"hidden_size": 1536, "num_layers": 28, "num_heads": 12, "num_kv_heads": 2,
                         "intermediate_size": 8960},
             "student": {"hidden_size": 896, "num_layers": 24, "num_heads": 14, "num_kv_heads": 2,
                         "intermediate_size": 4864}}
    vocab_multiple = 151936  # Qwen2.5's LM-head rows: its cost is the real one
    if dry_run:
        vision = {**vision, "hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}
        texts = {"teacher": {"hidden_size": 64, "num_layers": 3, "num_heads": 4, "num_kv_heads": 2,
                             "intermediate_size": 128},
                 "student": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                             "intermediate_size": 64}}
        vocab_multiple = 1
    for name in ("teacher", "student"):
        spec = root / f"{name}_gpu_check.yaml"
        spec.write_text(yaml.safe_dump({"text": {"family": "qwen2", **texts[name]}, "vision": vision,
                                        "chat_template": "llava_v1_compact", "vocab_multiple": vocab_multiple}))
        say(f"writing the random {name} ({texts[name]['hidden_size']} wide, {texts[name]['num_layers']} layers)")
        init_model_dir(spec, tokenizer, root / name, vision_from=root / "teacher" if name == "student" else None)


def run_variant(variant: str, root: Path, ds_config: str, steps: int) -> dict:
    """``steps`` steps of train.py's own ``train_step``; the first under the FLOP counter, the rest timed."""
    import torch
    from distill_cost import PaperStyleTPA, load_train_script, recipe_for
    from flops import count_step

    from aligntI import engine

    train = load_train_script()
    run = train.build(recipe_for(variant, root, "paper", ds_config, steps), [])
    if variant == "tpa_paper":
        run.objective = PaperStyleTPA(run.objective)
    run.student.train()
    batches = iter(run.loader)
    accum = run.batching.gradient_accumulation_steps
    cuda = run.dist.device.type == "cuda"
    counted = count_step(train, run, [next(batches) for _ in range(accum)], 1)
    times, losses = [], []
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for step in range(2, steps + 1):
        micro = [next(batches) for _ in range(accum)]
        start = time.perf_counter()
        sums, counts = train.train_step(run, micro, step)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(run.objective.summarise({k: float(v) for k, v in sums.items()}, counts)["loss"])
    peak = torch.cuda.max_memory_allocated() if cuda else None
    engine.destroy()
    return {"variant": variant, "step_s": min(times), "peak_bytes": peak, "losses": losses,
            "teacher_flops": counted["teacher"], "student_flops": counted["student"]}


def run_all(root: Path, ds_config: str, steps: int, variants: list[str], peak_tflops: float) -> list[dict]:
    results = []
    for variant in variants:
        result = root / f"gpu_check_{variant}.json"
        env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(29500 + random.randrange(1000)), "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, __file__, "--worker", variant, "--root", str(root), "--ds-config", ds_config,
               "--steps", str(steps), "--result", str(result)]
        say(f"Align-TI run: {variant} ({steps} steps in its own process)")
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            fail(f"the {variant} run exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        r = json.loads(result.read_text())
        if not all(map(math.isfinite, r["losses"])):
            fail(f"the {variant} run's losses are not finite: {r['losses']}")
        r["wall_s"] = time.perf_counter() - start
        r["tflops_per_s"] = (r["teacher_flops"] + r["student_flops"]) / r["step_s"] / 1e12
        r["utilisation"] = r["tflops_per_s"] / peak_tflops
        results.append(r)
    return results


def report(results: list[dict], peak_tflops: float) -> list[str]:
    lines = [f"{'variant':<12}{'s/step':>9}{'peak GiB':>10}{'teacher TF':>12}{'student TF':>12}{'TFLOP/s':>9}"
             f"{'util':>7}   (util: of {peak_tflops:g} TFLOP/s)"]
    for r in results:
        peak = f"{r['peak_bytes'] / 2**30:.2f}" if r["peak_bytes"] is not None else "n/a"
        lines.append(f"{r['variant']:<12}{r['step_s']:>9.3f}{peak:>10}{r['teacher_flops'] / 1e12:>12.3f}"
                     f"{r['student_flops'] / 1e12:>12.3f}{r['tflops_per_s']:>9.1f}{100 * r['utilisation']:>6.1f}%")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="the same checks on the CPU at tiny sizes (fp32)")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="the GPU's dense bf16 peak, TFLOP/s (H100/H200 SXM: 989)")
    parser.add_argument("--steps", type=int, default=None,
                        help="steps per variant, the first counted, the rest timed (default 6; --dry-run 2)")
    parser.add_argument("--variants", nargs="+", default=list(RUN_VARIANTS), choices=RUN_VARIANTS)
    parser.add_argument("--out", default="runs/gpu_check", help="the run's models, data and gpu_check.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--ds-config", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path[:0] = [str(REPO), str(Path(__file__).resolve().parent)]  # aligntI from this checkout, distill_cost
    if args.worker:
        result = run_variant(args.worker, Path(args.root), args.ds_config, args.steps)
        Path(args.result).write_text(json.dumps(result))
        return
    args.steps = args.steps or (2 if args.dry_run else 6)
    if args.steps < 2:
        parser.error("--steps: at least 2 (the first is counted, the rest timed)")
    check_imports()
    import torch

    if args.dry_run:
        device, dtype, tols = torch.device("cpu"), torch.float32, (1e-5, 1e-4)
        ds_config = REPO / "ds_configs" / "zero3_cpu.json"
    else:
        if not torch.cuda.is_available():
            fail("no CUDA device (use --dry-run to exercise the checks on the CPU)")
        device, dtype, tols = torch.device("cuda"), torch.bfloat16, (1e-2, 3e-2)
        ds_config = REPO / "ds_configs" / "zero3.json"
        say(f"device: {torch.cuda.get_device_name()}, peak {args.peak_tflops:g} TFLOP/s bf16 (--peak-tflops)")
    torch.manual_seed(0)
    model, _, vocab, batch, inputs = small_model(device, dtype, args.dry_run)
    summary = {"capture_error": check_capture(model, batch, inputs, tols[0]),
               "tpa_errors": check_candidates(model, vocab, batch, inputs, tols[1])}
    del model
    out = Path(args.out).resolve()
    root = out / ("dry_run" if args.dry_run else "models")
    root.mkdir(parents=True, exist_ok=True)
    write_run_models(root, args.dry_run)
    results = run_all(root, str(ds_config), args.steps, args.variants, args.peak_tflops)
    print("\n".join(report(results, args.peak_tflops)), flush=True)
    summary["runs"] = results
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
    say(f"all checks passed; {out / 'gpu_check.json'}")


if __name__ == "__main__":
    main()
