"""Train from a recipe YAML: supervised fine-tuning, or Align-TI distillation when the recipe has a ``teacher:``.

    deepspeed --num_gpus 8 recipes/train.py --config recipes/<...>.yaml [dotted.key=value ...]
    torchrun --nproc_per_node 8 recipes/train.py --config ...
    python recipes/train.py --config ...                # one process
    deepspeed recipes/train.py --config ... --dry-run   # print the plan (as `aligntI plan`) and exit

Read top to bottom: parse the command line, load the recipe, build the data, the student engine and, to
distill, the teacher engine; then the step loop; then export and evaluation. SFT and Align-TI differ only in
the objective the loop calls per micro-batch (aligntI/training/objective.py). Every rank runs this file.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoConfig

from aligntI import engine
from aligntI.config import Batching, RecipeConfig, load_recipe, resolve_batching
from aligntI.data.loader import build_encoder, build_train_loader
from aligntI.errors import run_reporting_errors
from aligntI.eval.generation import evaluate_exact_match, load_eval_items
from aligntI.hooks import attention as capture
from aligntI.models.compat import check_compatible
from aligntI.models.loading import load_model, load_processor, param_groups, set_trainable
from aligntI.training import resume, state
from aligntI.training.interrupts import Interrupts
from aligntI.training.metrics import MetricsLog, plot_loss_curve
from aligntI.training.objective import DistillObjective, SFTObjective
from aligntI.training.schedule import cosine_with_warmup, warmup_steps_for
from aligntI.training.trackers import open_trackers


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="recipe YAML")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan (as `aligntI plan`) and exit: no weights, no process group, no run dir")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    return parser.parse_args(argv)


def say(dist: engine.DistInfo, msg: str) -> None:
    """A line from rank 0 that leaves the progress bar intact."""
    if dist.is_main:
        tqdm.write(f"[aligntI] {msg}")


@dataclass
class Run:
    """Everything the step loop needs, built by :func:`build`."""

    cfg: RecipeConfig
    dist: engine.DistInfo
    batching: Batching
    processor: object
    loader: object
    student: engine.StudentEngine
    objective: SFTObjective | DistillObjective
    start_step: int
    total_steps: int
    data_counts: state.DataCounts
    eval_items: list | None
    metrics: MetricsLog | None  # rank 0 only

    def log(self, msg: str) -> None:
        say(self.dist, msg)

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)


def build(cfg: RecipeConfig, overrides: list[str]) -> Run:
    """Start-up, cheapest checks first: a mismatched teacher or a bad record fails before any weight loads."""
    distill = cfg.teacher is not None
    if distill:
        capture.install()  # before any model loads: transformers looks the attention backends up at load time
        shared = check_compatible(
            load_processor(cfg.teacher.path), load_processor(cfg.model.path),
            AutoConfig.from_pretrained(cfg.teacher.path), AutoConfig.from_pretrained(cfg.model.path),
            cfg.teacher.path, cfg.model.path, cfg.data.chat_template,
        )
    dist = engine.init_distributed()
    batching = resolve_batching(cfg.train, dist.world_size)
    ds_config = engine.build_ds_config(cfg.engine, batching)
    run_dir, ckpt_dir = Path(cfg.run_dir), Path(cfg.run_dir) / "checkpoints"
    # A restart is checked against the recipe its checkpoint was trained under; the run folder is written only
    # once every check has passed (after the checkpoint has loaded).
    point = state.resume_point(ckpt_dir, cfg.resume)
    verdict = None
    if point.tag is not None and point.recipe is not None:
        verdict = resume.check_restart(point.recipe, resume.comparable(cfg, ds_config), cfg.accept_changes,
                                       ckpt_dir / point.tag)
    if state.resharded(point, dist.world_size, ds_config):  # written on another number of ranks (a requeue)
        ds_config = engine.universal_loading(ds_config)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)  # an unusable run_dir fails now, not after the models load
    state.seed_everything(cfg.seed + dist.rank)
    ev = cfg.eval  # a bad evaluation file fails now, not after training
    eval_items = None if ev is None else load_eval_items(ev.data, ev.images, ev.category_key, ev.max_samples,
                                                         cfg.data.allow_images_outside)
    processor = load_processor(cfg.model.path)

    # Data: indexed and checked here; the order is fixed by (seed, epoch), so resuming needs only the step.
    start_step = point.step
    per_rank_step = batching.micro_batch_size * batching.gradient_accumulation_steps
    loader, sampler = build_train_loader(
        processor, cfg.data, seed=cfg.seed, rank=dist.rank, world_size=dist.world_size,
        micro_batch_size=batching.micro_batch_size, global_batch_size=batching.global_batch_size,
        start_sample=start_step * per_rank_step,
    )
    total_steps = cfg.train.total_steps(sampler.steps_per_epoch)

    # The student engine: AdamW, cosine schedule with warm-up, ZeRO as the DeepSpeed JSON says.
    dtype = torch.bfloat16 if ds_config["bf16"]["enabled"] else torch.float32
    with engine.sharded_loading(ds_config):  # under ZeRO-3 the weights load already partitioned
        model = load_model(cfg.model.path, cfg.model.attn_implementation, dtype)
    trainable = set_trainable(model, cfg.model.trainable)
    if cfg.model.activation_checkpointing:
        model.activation_checkpointing_enable()
    model.config.use_cache = False
    warmup = warmup_steps_for(total_steps, cfg.optim.warmup_ratio)
    student = engine.StudentEngine(model, param_groups(model, cfg.optim), cfg.optim, ds_config,
                                   cosine_with_warmup(total_steps, warmup, cfg.optim.min_lr_ratio))
    data_counts = state.DataCounts()
    if point.tag is not None:
        data_counts = state.restore(student, ckpt_dir, point, cfg.model.path, dist)
    # Every check has passed: the run folder is written from here on.
    if dist.is_main:
        resume.record_start(run_dir, cfg, {
            "world_size": dist.world_size, "gradient_accumulation_steps": batching.gradient_accumulation_steps,
            "overrides": overrides, "deepspeed": ds_config,
        }, verdict, point.step, None if point.tag is None else ckpt_dir / point.tag)
    engine.barrier()
    metrics = None
    if dist.is_main:
        metrics = MetricsLog(run_dir / "metrics.jsonl", start_step, open_trackers(cfg.logging, run_dir, start_step))
    log = partial(say, dist)
    if point.tag is not None:
        log(f"resumed from {ckpt_dir / point.tag} at step {start_step}"
            + ("" if point.recipe is not None else " (a checkpoint without its recipe: not compared)"))
        for line in resume.describe(verdict, point, total_steps, cfg.optim):
            log(line)
    log(f"world {dist.world_size} | micro {batching.micro_batch_size} x accum "
        f"{batching.gradient_accumulation_steps} x ranks = global {batching.global_batch_size} | "
        f"{total_steps} steps ({sampler.steps_per_epoch}/epoch) | trainable "
        f"{ {k: v for k, v in trainable.items() if v} } | bf16 {ds_config['bf16']['enabled']}")

    accumulation = batching.gradient_accumulation_steps
    if not distill:
        objective = SFTObjective(student, dist, accumulation, log)
    else:
        # The teacher engine: frozen, no optimizer, placed by teacher.placement (aligntI.engine.teacher_ds_config).
        log(f"teacher/student vocabulary: {shared.note}")
        placement = engine.teacher_placement(ds_config, cfg.teacher.placement)
        teacher_cfg = engine.teacher_ds_config(ds_config, placement)
        dtype = torch.bfloat16 if teacher_cfg["bf16"]["enabled"] else torch.float32
        with engine.sharded_loading(teacher_cfg):
            model = load_model(cfg.teacher.path, cfg.teacher.attn_implementation, dtype)
        teacher = engine.TeacherEngine(model, teacher_cfg)
        log(f"teacher {cfg.teacher.path}: ZeRO stage {teacher_cfg['zero_optimization']['stage']}, "
            f"placement {placement}, no optimizer, eval mode")
        objective = DistillObjective(cfg, teacher, student, processor, shared, dist, accumulation,
                                     resumed=start_step > 0, log=log)
    return Run(cfg, dist, batching, processor, loader, student, objective, start_step, total_steps, data_counts,
               eval_items, metrics)


def train_step(run: Run, micro: list[dict], step: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """One optimizer step over this rank's micro-batches: the loss sums (on the device) and the global counts."""
    plan = run.objective.plan(micro, step)  # global normalisers first: every term is a global-batch mean
    sums: dict[str, torch.Tensor] = {}
    for mb, draws in zip(micro, plan.draws):
        with run.objective.loss(mb, draws, plan.counts) as out:
            run.student.backward(out.loss)
        run.student.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
        for name, value in out.sums.items():
            sums[name] = sums[name] + value if name in sums else value
    return sums, plan.counts


def train(run: Run, interrupts: Interrupts) -> str:
    """The remaining steps. Returns ``finished``, or ``stopped`` (``run_dir/stop_request``) or ``interrupted``
    (SIGINT/SIGTERM, :mod:`aligntI.training.interrupts`) after checkpointing the step every rank finished."""
    cfg, dist, student = run.cfg, run.dist, run.student
    ckpt_dir, stop_request = run.run_dir / "checkpoints", run.run_dir / state.STOP_REQUEST

    def save(step: int) -> Path:
        path = state.save(student, ckpt_dir, step, run.data_counts, run.batching, dist.rank, cfg.train.keep_last,
                          resume.comparable(cfg, student.ds_config), run.total_steps)
        run.log(f"checkpoint {path}")
        return path

    batches = iter(run.loader)
    student.train()
    on_gpu = dist.device.type == "cuda"
    bar = tqdm(total=run.total_steps, initial=run.start_step, desc="train", disable=not dist.is_main,
               dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 30.0)  # files: a line per 30 s
    for step in range(run.start_step + 1, run.total_steps + 1):
        t0 = time.perf_counter()
        micro = [next(batches) for _ in range(run.batching.gradient_accumulation_steps)]
        sums, counts = train_step(run, micro, step)
        for mb in micro:
            run.data_counts.add(mb, dist.rank)
        seen_tokens = sum(int(mb["attention_mask"].sum()) for mb in micro)
        names = sorted(sums)
        local = torch.stack([sums[k].double() for k in names]).tolist() if names else []  # one host sync
        # Stop requests and signals ride on the step's one reduction, so every rank stops after the same step.
        totals = engine.all_reduce_sum(
            local + [seen_tokens, float(stop_request.exists()), float(interrupts.received is not None)], dist.device)
        interrupted, stop = totals.pop() > 0, totals.pop() > 0
        elapsed = time.perf_counter() - t0
        record = {
            "step": step,
            **run.objective.summarise(dict(zip(names, totals[:-1])), counts),
            "lr": student.lrs(),
            "grad_norm": student.grad_norm(),
            "tokens_per_s": totals[-1] / elapsed,
            **counts,
            "step_time_s": elapsed,
        }
        logged = step % cfg.train.log_every == 0 or step == run.total_steps
        if on_gpu and logged:  # rank 0's peak since the previous logged step, to compare with `aligntI plan`
            record["peak_memory_gib"] = torch.cuda.max_memory_allocated(dist.device) / 2**30
            torch.cuda.reset_peak_memory_stats(dist.device)
        if dist.is_main:
            if logged:
                run.metrics.write(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{next(iter(record['lr'].values())):.2e}",
                            refresh=False)  # let mininterval decide: log files get a line per 30 s
        if interrupted:
            bar.close()
            path = save(step)
            why = interrupts.name or "a signal to another rank"
            run.log(f"{why}: stopped after step {step}, checkpoint {path}; the same command resumes")
            return "interrupted"
        if stop and step < run.total_steps:
            bar.close()
            save(step)
            if dist.is_main:
                stop_request.unlink(missing_ok=True)
            run.log(f"stopped on request ({stop_request}) after step {step}; the same command resumes")
            return "stopped"
        if cfg.train.save_every and step % cfg.train.save_every == 0 and step < run.total_steps:
            save(step)
    bar.close()
    if run.start_step < run.total_steps:  # a finished run resumed again has nothing new to save
        save(run.total_steps)
    if dist.is_main:  # a request that came after the last step is answered by the end itself
        stop_request.unlink(missing_ok=True)
    return "finished"


def finish(run: Run) -> dict | None:
    """HF export to ``run_dir/final``, the loss curve, and the recipe's evaluation (greedy, sharded over ranks)."""
    run.objective.finish()
    run.log(run.data_counts.report(run.dist))
    final = run.run_dir / "final"
    run.student.export_hf(final, run.processor, run.dist.rank)
    run.log(f"exported HF model to {final}")
    if run.dist.is_main:
        plot_loss_curve(run.run_dir / "metrics.jsonl", run.run_dir / "loss_curve.png", run.objective.LOSS_TERMS)
    scores = None
    if run.cfg.eval is not None:
        ev = run.cfg.eval
        run.student.eval()
        scores = evaluate_exact_match(
            run.student.module, run.processor, build_encoder(run.processor, run.cfg.data), run.eval_items,
            batch_size=ev.batch_size, max_new_tokens=ev.max_new_tokens, device=run.dist.device,
            rank=run.dist.rank, world_size=run.dist.world_size, out_dir=run.run_dir / "eval",
            name=Path(ev.data).stem, title=str(run.run_dir),
        )
        if run.metrics is not None:
            run.metrics.write_scores(f"eval/{Path(ev.data).stem}", scores, run.total_steps)
    engine.barrier()
    return scores


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def command() -> int:
        if args.dry_run:
            from aligntI.plan import print_plan

            return print_plan(args.config, args.overrides)
        interrupts = Interrupts()
        with interrupts.installed():  # SIGINT/SIGTERM: the loop checkpoints and stops; elsewhere one line
            run = build(load_recipe(args.config, args.overrides), args.overrides)
            with interrupts.deferred():
                outcome = train(run, interrupts)
            interrupts.outside = f"after the last checkpoint of {run.run_dir}: the same command resumes from it"
            if outcome == "finished":
                finish(run)
            if run.metrics is not None:
                run.metrics.close()
            engine.destroy()
        return 128 + (interrupts.received or signal.SIGINT) if outcome == "interrupted" else 0

    return run_reporting_errors(command)


if __name__ == "__main__":
    sys.exit(main())
