"""Supervised fine-tuning of a LLaVA-style model on DeepSpeed: the loop every distillation recipe extends.

Per optimizer step: fetch the step's micro-batches, count their response tokens over all ranks, run
forward/backward per micro-batch with the loss sum scaled to the global-batch token mean, step.
Checkpoints every ``train.save_every`` steps; ``resume: auto`` restarts from the newest complete one with
the same data order, RNG and schedule. A file ``run_dir/stop_request`` (what slurm/*.sh write when SLURM warns
of preemption or the time limit) makes every rank checkpoint after the current step and stop; the same command
resumes. At the end: HF export, loss curve, optional evaluation.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from aligntI import engine as ds
from aligntI.config import ConfigError, RecipeConfig, dump_yaml, resolve_batching
from aligntI.data.dataset import model_inputs
from aligntI.data.loader import build_encoder, build_train_loader
from aligntI.eval.generation import evaluate_exact_match, load_eval_items
from aligntI.losses.sft import response_ce_sum
from aligntI.models.loading import load_model, load_processor, param_groups, set_trainable
from aligntI.training.accounting import micro_loss_scale
from aligntI.training.metrics import MetricsLog, plot_loss_curve
from aligntI.training.schedule import cosine_with_warmup, warmup_steps_for
from aligntI.training.trackers import open_trackers


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


STOP_REQUEST = "stop_request"


class SFTRecipe:
    LOSS_TERMS = ("loss",)  # what loss_curve.png plots

    def __init__(self, cfg: RecipeConfig, overrides: list[str] | None = None):
        self.cfg = cfg
        self.overrides = overrides or []
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        cfg = self.cfg
        self.dist = ds.init_distributed()
        self.batching = resolve_batching(cfg.train, self.dist.world_size)
        self.ds_config = ds.build_ds_config(cfg.engine, self.batching)
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_yaml(cfg, self.run_dir / "config.yaml", extra={
                "world_size": self.dist.world_size,
                "gradient_accumulation_steps": self.batching.gradient_accumulation_steps,
                "overrides": self.overrides,
                "deepspeed": self.ds_config,
            })
        ds.barrier()
        seed_everything(cfg.seed + self.dist.rank)
        ev = cfg.eval  # a bad evaluation file fails now, not after training
        self.eval_items = None if ev is None else load_eval_items(
            ev.data, ev.images, ev.category_key, ev.max_samples, cfg.data.allow_images_outside)

        self.processor = load_processor(cfg.model.path)

        # The data order is fixed by (seed, epoch): resuming needs only the step we restart from.
        self.start_step = 0
        resume_tag = ds.latest_complete_checkpoint(self.ckpt_dir) if cfg.resume == "auto" else None
        if resume_tag is not None:
            saved = torch.load(self.ckpt_dir / resume_tag / "trainer_state.pt", weights_only=False)
            now = {"world_size": self.dist.world_size, "global_batch_size": self.batching.global_batch_size}
            if saved["layout"] != now:
                raise ConfigError(
                    f"resume: {self.ckpt_dir / resume_tag} was written with {saved['layout']}, this run has {now}; "
                    "an exact resume needs the same world size and global batch (or set resume: never)"
                )
            self.start_step = saved["step"]
        per_rank_step = self.batching.micro_batch_size * self.batching.gradient_accumulation_steps
        self.loader, sampler = build_train_loader(
            self.processor, cfg.data, seed=cfg.seed, rank=self.dist.rank, world_size=self.dist.world_size,
            micro_batch_size=self.batching.micro_batch_size, global_batch_size=self.batching.global_batch_size,
            start_sample=self.start_step * per_rank_step,
        )
        self.steps_per_epoch = sampler.steps_per_epoch
        # The weights load after the data check (in the loader): a bad record fails before minutes of loading.
        dtype = torch.bfloat16 if self.ds_config["bf16"]["enabled"] else torch.float32
        with ds.sharded_loading(self.ds_config):
            model = load_model(cfg.model.path, cfg.model.attn_implementation, dtype)
        self.trainable = set_trainable(model, cfg.model.trainable)
        if cfg.model.activation_checkpointing:
            model.activation_checkpointing_enable()
        model.config.use_cache = False
        self.total_steps = cfg.train.total_steps(self.steps_per_epoch)
        warmup = warmup_steps_for(self.total_steps, cfg.optim.warmup_ratio)
        self.student = ds.StudentEngine(
            model, param_groups(model, cfg.optim), cfg.optim, self.ds_config,
            cosine_with_warmup(self.total_steps, warmup, cfg.optim.min_lr_ratio),
        )
        self.skips = {"bad": 0, "too_long": 0}
        self.truncated = 0
        if resume_tag is not None:
            self._resume(resume_tag)
        self.metrics = (MetricsLog(self.run_dir / "metrics.jsonl", self.start_step,
                                   open_trackers(cfg.logging, self.run_dir, self.start_step))
                        if self.dist.is_main else None)
        self.log(f"world {self.dist.world_size} | micro {self.batching.micro_batch_size} x accum "
                 f"{self.batching.gradient_accumulation_steps} x ranks = global {self.batching.global_batch_size} | "
                 f"{self.total_steps} steps ({self.steps_per_epoch}/epoch) | trainable "
                 f"{ {k: v for k, v in self.trainable.items() if v} } | bf16 {self.ds_config['bf16']['enabled']}")

    def _resume(self, tag: str) -> None:
        self.student.load_checkpoint(self.ckpt_dir, tag)
        mine = torch.load(self.ckpt_dir / tag / f"rank{self.dist.rank}_state.pt", weights_only=False)
        self.skips, self.truncated = mine["skips"], mine["truncated"]
        set_rng_state(mine["rng"])
        self.log(f"resumed from {self.ckpt_dir / tag} at step {self.start_step}")

    # ------------------------------------------------------------------ train

    def train(self) -> bool:
        """Run the remaining steps; False when a stop request ended the run early (after a checkpoint)."""
        stop_request = self.run_dir / STOP_REQUEST
        batches = iter(self.loader)
        accum = self.batching.gradient_accumulation_steps
        self.student.train()
        bar = tqdm(total=self.total_steps, initial=self.start_step, desc="train", disable=not self.dist.is_main,
                   dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 30.0)  # files: a line per 30 s
        for step in range(self.start_step, self.total_steps):
            t0 = time.perf_counter()
            micro = [next(batches) for _ in range(accum)]
            counts = self.global_counts(micro, step + 1)
            sums: dict[str, torch.Tensor] = {}
            seen_tokens = 0
            for mb in micro:
                for name, value in self.micro_step(mb, counts).items():
                    sums[name] = sums[name] + value if name in sums else value  # stays on the device
                seen_tokens += int(mb["attention_mask"].sum())
                self._count(mb)
            names = sorted(sums)
            local = torch.stack([sums[k].double() for k in names]).tolist() if names else []  # one host sync
            # The stop request rides on the step's one reduction, so every rank sees the same answer.
            totals = ds.all_reduce_sum(local + [seen_tokens, float(stop_request.exists())], self.dist.device)
            stop = totals.pop() > 0
            elapsed = time.perf_counter() - t0
            record = {
                "step": step + 1,
                **self.summarise(dict(zip(names, totals[:-1])), counts),
                "lr": self.student.lrs(),
                "grad_norm": self.student.grad_norm(),
                "tokens_per_s": totals[-1] / elapsed,
                **counts,
                "step_time_s": elapsed,
            }
            if self.dist.is_main:
                if (step + 1) % self.cfg.train.log_every == 0 or step + 1 == self.total_steps:
                    self.metrics.write(record)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{next(iter(record['lr'].values())):.2e}",
                                refresh=False)  # let mininterval decide: log files get a line per 30 s
            save_every = self.cfg.train.save_every
            if stop and step + 1 < self.total_steps:
                bar.close()
                self.save_checkpoint(step + 1)
                if self.dist.is_main:
                    stop_request.unlink(missing_ok=True)
                self.log(f"stopped on request ({stop_request}) after step {step + 1}; the same command resumes")
                return False
            if save_every and (step + 1) % save_every == 0 and step + 1 < self.total_steps:
                self.save_checkpoint(step + 1)
        bar.close()
        if self.start_step < self.total_steps:  # a finished run resumed again has nothing new to save
            self.save_checkpoint(self.total_steps)
        if self.dist.is_main:  # a request that came after the last step is answered by the end itself
            stop_request.unlink(missing_ok=True)
        return True

    # The three methods a distillation recipe overrides.

    def global_counts(self, micro: list[dict], step: int) -> dict[str, float]:
        """Normalisers of the step's loss terms over the whole global batch (all micro-batches, all ranks)."""
        local = sum(float((mb["labels"][:, 1:] != -100).sum()) for mb in micro)
        tokens = ds.all_reduce_sum([local], self.dist.device)[0]
        if tokens == 0:
            self.log(f"step {step}: no response tokens in the whole global batch; loss is 0 for this step")
        return {"response_tokens": tokens}

    def micro_step(self, mb: dict, counts: dict[str, float]) -> dict[str, torch.Tensor]:
        """Forward and backward of one micro-batch; returns its detached loss sums."""
        scale = micro_loss_scale(counts["response_tokens"], self.dist.world_size,
                                 self.batching.gradient_accumulation_steps)
        out = self.student(**self._to_device(model_inputs(mb)), use_cache=False)
        ce_sum, _ = response_ce_sum(out.logits, mb["labels"].to(self.dist.device))
        self.student.backward(ce_sum * scale)
        self.student.step()
        return {"sft": ce_sum.detach()}

    def summarise(self, totals: dict[str, float], counts: dict[str, float]) -> dict[str, float]:
        return {"loss": totals["sft"] / max(counts["response_tokens"], 1.0)}

    def _to_device(self, inputs: dict) -> dict:
        dtype = self.student.module.dtype
        out = {k: v.to(self.dist.device) for k, v in inputs.items()}
        out["pixel_values"] = out["pixel_values"].to(dtype)
        return out

    def _count(self, mb: dict) -> None:
        for skip in mb["skips"]:
            self.skips[skip.kind] += 1
            if self.skips[skip.kind] <= 5:
                print(f"[rank {self.dist.rank}] skipped ({skip.kind}): {skip.message}", flush=True)
        self.truncated += mb["truncated"]

    def save_checkpoint(self, step: int) -> None:
        tag = f"step_{step:08d}"
        # Per rank: its RNG and what its data workers skipped; rank 0 adds the step and the batch layout.
        files = {f"rank{self.dist.rank}_state.pt": {"rng": rng_state(), "skips": self.skips,
                                                     "truncated": self.truncated}}
        if self.dist.is_main:
            files["trainer_state.pt"] = {
                "step": step,
                "layout": {"world_size": self.dist.world_size, "global_batch_size": self.batching.global_batch_size},
            }
        self.student.save_checkpoint(self.ckpt_dir, tag, files, self.dist.rank)
        if self.dist.is_main:
            ds.prune_checkpoints(self.ckpt_dir, self.cfg.train.keep_last)
        self.log(f"checkpoint {self.ckpt_dir / tag}")

    # ------------------------------------------------------------------ finish

    def finish(self) -> dict | None:
        skipped = ds.all_reduce_sum([self.skips["bad"], self.skips["too_long"], self.truncated], self.dist.device)
        self.log(f"data: {int(skipped[0])} bad samples skipped, {int(skipped[1])} too long skipped, "
                 f"{int(skipped[2])} truncated (all ranks, whole run)")
        final = self.run_dir / "final"
        self.student.export_hf(final, self.processor, self.dist.rank)
        self.log(f"exported HF model to {final}")
        if self.dist.is_main:
            plot_loss_curve(self.run_dir / "metrics.jsonl", self.run_dir / "loss_curve.png", self.LOSS_TERMS)
        scores = self.evaluate() if self.cfg.eval is not None else None
        ds.barrier()
        return scores

    def evaluate(self) -> dict | None:
        """Greedy generation on the held-out file with the sharded engine; scores on rank 0."""
        ev = self.cfg.eval
        self.student.eval()
        return evaluate_exact_match(
            self.student.module, self.processor, build_encoder(self.processor, self.cfg.data), self.eval_items,
            batch_size=ev.batch_size, max_new_tokens=ev.max_new_tokens, device=self.dist.device,
            rank=self.dist.rank, world_size=self.dist.world_size, out_dir=self.run_dir / "eval",
            name=Path(ev.data).stem, title=str(self.run_dir),
        )

    def log(self, msg: str) -> None:
        if self.dist.is_main:
            tqdm.write(f"[aligntI] {msg}")

    @classmethod
    def run(cls, cfg: RecipeConfig, overrides: list[str] | None = None) -> dict | None:
        recipe = cls(cfg, overrides)
        recipe.setup()
        scores = recipe.finish() if recipe.train() else None
        if recipe.metrics is not None:
            recipe.metrics.close()
        ds.destroy()
        return scores


