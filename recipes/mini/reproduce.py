"""The paper's component table in miniature, on the CPU example: every row over several seeds, one command.

    python recipes/mini/reproduce.py [--quick] [--task digitgrid|gridread] [--task-option KEY=VALUE ...]
                                     [--seeds N] [--steps N] [--teacher-steps N] [--ranks-per-job N] [--out DIR]
                                     [--rows KEY,KEY,...]

Run as a script, so that its folder is on ``sys.path`` and ``reproduce_report`` beside it imports.

Teacher SFT once (both cores), then each student row (SFT, vanilla KD at its best temperature, uniform visual
KD, +IVA, +TPA, Align-TI) for every seed through ``recipes/train.py``: real DeepSpeed engines, a frozen
teacher engine, the rows' own recipes under ``recipes/mini/`` with the overrides written in each job's
``job.json``. Students run side by side, one process per core, because on 2 cores two single-rank jobs
finish about 1.5x sooner than one 2-rank job at a time (``--ranks-per-job 2`` runs them as 2-rank jobs).

The vanilla-KD temperature is chosen on the validation split (mean over the first seeds), never on test.
Every finished model is then scored on the held-out test split; ``results.md``/``results.json`` hold
mean ± std per row next to the paper's numbers, ``results.png`` the bar chart, and ``attention_maps/``
the teacher's IRS-layer attention beside the student's before and after distillation.

``--rows`` trains and reports some of the rows only (a cheaper table of the differences one question needs).
A job whose run directory already holds its finished model with the same settings is not run again, so an
interrupted reproduction continues where it stopped (each run also resumes from its own checkpoints).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from reproduce_report import evaluate_model_dir, write_report
from tqdm import tqdm

from aligntI.models.builder import init_model_dir
from aligntI.tasks.digitgrid import write_digitgrid_with_tokenizer
from aligntI.tasks.gridread import GridReadOptions, parse_options, write_gridread_with_tokenizer

# The recipes name their data and DS JSON relative to the repository: the training jobs run in REPO.
REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "recipes" / "mini" / "models"
# The zero2 JSON: a student of 87K trainable parameters gains nothing from ZeRO-3's per-module gathers,
# which cost 2-4x the step on gloo; the losses are the same (the ZeRO-3 paths are what the tests run).
ENGINE = ["engine.ds_config=ds_configs/zero2.json", "data.num_workers=0"]


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    recipe: str
    paper: float | None  # the paper's component ablation: Qwen2.5-0.5B student, average of the six benchmarks
    temperatures: tuple[float, ...] = ()  # more than one: chosen on the validation split
    overrides: tuple[str, ...] = ()  # recipe overrides of this row's jobs on top of its recipe

    @property
    def needs_teacher(self) -> bool:
        return self.key != "sft"


METHODS = (
    Method("sft", "Student SFT", "recipes/mini/student_sft.yaml", 64.3),
    Method("vanilla_kd", "Vanilla KD", "recipes/mini/vanilla_kd.yaml", 65.0, temperatures=(1.0, 2.0, 4.0)),
    Method("visual_kd_uniform", "Uniform visual KD (LLaVA-KD style)", "recipes/mini/visual_kd_uniform.yaml", None),
    Method("iva", "+IVA", "recipes/mini/iva_only.yaml", 65.1),
    Method("tpa", "+TPA", "recipes/mini/tpa_only.yaml", 66.4),
    Method("align_ti", "Align-TI (IVA + TPA)", "recipes/mini/align_ti.yaml", 66.7),
)
# GridRead's extra row: +IVA scoring k = 4 of the 16 vision rows per sample, drawn in proportion to the teacher's
# IVA weights (each counted 1/k: an unbiased estimate of the all-row loss). 4 rows = a quarter of the vision
# tokens, four times a one-cell question's share: does the drawn estimate match scoring every row?
IVA_DRAWN = Method("iva_k", "+IVA, k rows drawn (k = 4 of 16)", "recipes/mini/iva_only.yaml", None,
                   overrides=("iva.row_budget=4", "iva.row_choice=sampled"))
# GridRead's answer-start rows: IVA's focus read from the position that predicts the answer's first token instead of
# the question's tokens (iva.queries, IRS included). On this task the teacher looks at the asked cell from there, not
# from the question (recipes/mini/gridread_focus_by_query.py): do weights that follow the cell beat uniform ones?
ANSWER_START = ("iva.queries=answer_start",)
IVA_ANSWER_START = Method("iva_as", "+IVA, answer-start focus", "recipes/mini/iva_only.yaml", None,
                          overrides=ANSWER_START)
ALIGN_TI_ANSWER_START = Method("align_ti_as", "Align-TI, answer-start focus", "recipes/mini/align_ti.yaml", None,
                               overrides=ANSWER_START)
# A vision-token KL, however weighted, distils next-token distributions at image positions, which come before the
# question: it cannot say where to look for it. iva.mode: attention aligns the student's answer-start focus itself.
# Its weight, 0.1, was chosen on the validation split (seeds 0 and 2, 400 steps: loss.iva 0.1 → 42.2% exact match,
# 0.3 → 38.4%, 1.0 → 10.5%: at 1.0 the attention term slows the read-out's learning; recipes/mini/results_gridread.md).
ATTENTION = ("iva.mode=attention", *ANSWER_START, "loss.iva=0.1")
IVA_ATTENTION = Method("iva_attn", "+IVA, attention alignment (answer-start focus)", "recipes/mini/iva_only.yaml",
                       None, overrides=ATTENTION)
ALIGN_TI_ATTENTION = Method("align_ti_attn", "Align-TI, attention alignment (answer-start focus)",
                            "recipes/mini/align_ti.yaml", None, overrides=ATTENTION)
GRIDREAD_EXTRA = (IVA_DRAWN, IVA_ANSWER_START, ALIGN_TI_ANSWER_START, IVA_ATTENTION, ALIGN_TI_ATTENTION)
# The GridRead setting the reproduction trains on, chosen on the validation split (recipes/mini/results_gridread.md):
# one vision token per cell (upscale 1: 32 px, 16 tokens) and a mix whose row, column and grid read-outs teach
# the teacher to address the grid (no where or row_sum questions). With the generator's own defaults (upscale 2,
# every category) a 1000-step teacher stays at chance on one-cell questions; with these, a 2000-step one reads
# 94% of them on validation. --task-option values replace these one by one.
GRIDREAD_DEFAULTS = ("upscale=1", "mix=cell:3,row:1,column:1,grid:2,row_sums:1")


@dataclass
class Task:
    """What a reproduction trains on: the data, the model specs, and the recipe settings that follow from it."""

    name: str
    categories: tuple[str, ...]
    max_new_tokens: int
    options: GridReadOptions | None = None  # GridRead's generator options; None: DigitGrid

    def data_dir(self, out: Path) -> Path:
        # DigitGrid's one dataset is shared with run.sh; a GridRead setting lives with its reproduction.
        return REPO / "data" / "digitgrid" if self.options is None else out / "data"

    def write_data(self, data: Path) -> None:
        if self.options is None:
            if not (data / "tokenizer").is_dir():
                write_digitgrid_with_tokenizer(data)
        else:
            write_gridread_with_tokenizer(data, self.options)

    def spec(self, role: str, out: Path) -> Path:
        """The model spec YAML of ``role`` (teacher or student), its image size the task's."""
        if self.options is None:
            return MODELS / f"{role}.yaml"
        spec = yaml.safe_load((MODELS / f"{role}_gridread.yaml").read_text())
        spec["vision"]["image_size"] = self.options.image_size
        path = out / "init" / f"{role}_spec.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(spec))
        return path

    def overrides(self, data: Path) -> list[str]:
        """Recipe overrides of every job (the recipes under recipes/mini are DigitGrid's)."""
        if self.options is None:
            return []
        # 64 image tokens + question + an answer of up to 3 * grid^2 words, with room.
        length = (self.options.image_size // 8) ** 2 + 3 * self.options.grid**2 + 32
        return [f"data.train.0.path={data / 'train.json'}", f"data.max_length={length}",
                f"eval.data={data / 'val.json'}", f"eval.max_new_tokens={self.max_new_tokens}"]


def make_task(name: str, options: list[str], quick: bool) -> Task:
    from aligntI.tasks import digitgrid, gridread

    if name == "digitgrid":
        if options:
            raise ValueError("--task-option applies to --task gridread")
        return Task("digitgrid", digitgrid.CATEGORIES, 8)
    if name != "gridread":
        raise ValueError(f"--task: expected digitgrid or gridread, got {name!r}")
    given = {o.partition("=")[0] for o in options}
    options = [o for o in GRIDREAD_DEFAULTS if o.partition("=")[0] not in given] + list(options)
    if quick and "train_size" not in given:
        options = ["train_size=8000", *options]  # the quick teacher sees a fraction of the default 30000
    opts = parse_options(options)
    # Longest answer: the grid read out (grid^2 digits and grid - 1 commas) or every pair of a where.
    return Task("gridread", tuple(c for c in gridread.CATEGORIES if opts.mix.get(c, 0) > 0),
                3 * opts.grid**2 + 2, opts)


@dataclass(frozen=True)
class Preset:
    seeds: int
    student_steps: int
    teacher_steps: int
    sweep_seeds: int  # seeds that try every vanilla-KD temperature
    heatmap_samples: int
    mechanism_samples: int = 200  # held-out questions of the mechanism measurements (GridRead)


PRESETS = {
    ("digitgrid", "default"): Preset(seeds=5, student_steps=800, teacher_steps=3000, sweep_seeds=1, heatmap_samples=8),
    ("digitgrid", "quick"): Preset(seeds=2, student_steps=200, teacher_steps=1000, sweep_seeds=1, heatmap_samples=4),
    # GridRead's sequences are 4x longer (64 image tokens, answers up to 19 words): fewer, slower steps.
    ("gridread", "default"): Preset(seeds=5, student_steps=400, teacher_steps=2000, sweep_seeds=1,
                                    heatmap_samples=7),
    ("gridread", "quick"): Preset(seeds=2, student_steps=60, teacher_steps=1000, sweep_seeds=1, heatmap_samples=7,
                                  mechanism_samples=100),
}


@dataclass
class Job:
    name: str
    run_dir: Path
    recipe: str
    overrides: list[str]
    ranks: int
    before: Callable[[], None] | None = None  # in-process preparation (e.g. the student's initial weights)
    after: Callable[[Job], None] | None = None  # called once the job has finished (may queue more jobs)
    seconds: float = 0.0

    @property
    def settings(self) -> dict:
        return {"recipe": self.recipe, "overrides": self.overrides, "ranks": self.ranks}

    def finished(self) -> bool:
        """Its HF model is exported and it was run to the end with exactly these settings."""
        record = self.recorded()
        return (self.run_dir / "final" / "config.json").is_file() and record.get("settings") == self.settings \
            and "seconds" in record

    def recorded(self) -> dict:
        """``job.json``: the settings it was started with, and its time once it has finished ({} if none)."""
        record = self.run_dir / "job.json"
        return json.loads(record.read_text()) if record.is_file() else {}

    def start_fresh_unless_same(self) -> None:
        """Keep the run directory (its checkpoints: an interrupted job resumes) only if it was started with these
        settings; another experiment's checkpoints would be resumed as if they were this one's."""
        record = self.recorded()
        if self.run_dir.exists() and record.get("settings") != self.settings:
            tqdm.write(f"[reproduce] {self.name}: {self.run_dir} holds a run with other settings; starting afresh")
            shutil.rmtree(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "job.json").write_text(json.dumps({"settings": self.settings}, indent=2) + "\n")

    def command(self) -> list[str]:
        launcher = [sys.executable]
        if self.ranks > 1:
            launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={self.ranks}"]
        return [*launcher, "recipes/train.py", "--config", self.recipe, *self.overrides]


class Scheduler:
    """Runs jobs as subprocesses, ``slots`` at a time, in queue order; a finished job may queue more."""

    def __init__(self, slots: int, threads: int, log_dir: Path):
        self.slots, self.threads, self.log_dir = slots, threads, log_dir
        self.queue: list[Job] = []
        self.failed: list[tuple[Job, Path]] = []

    def add(self, job: Job) -> None:
        self.queue.append(job)

    def run(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        running: dict[str, tuple[Job, subprocess.Popen, float]] = {}
        bar = tqdm(total=len(self.queue), desc="jobs", dynamic_ncols=True)
        while self.queue or running:
            while self.queue and len(running) < self.slots and not self.failed:
                job = self.queue.pop(0)
                if job.finished():
                    tqdm.write(f"[reproduce] {job.name}: already done in {job.run_dir}")
                    self._done(job, bar)
                    continue
                job.start_fresh_unless_same()
                if job.before is not None:
                    job.before()
                env = {**os.environ, "OMP_NUM_THREADS": str(self.threads)}
                log = open(self.log_dir / f"{job.name.replace('/', '_')}.log", "w")  # noqa: SIM115
                proc = subprocess.Popen(job.command(), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
                log.close()
                running[job.name] = (job, proc, time.monotonic())
                bar.set_postfix_str(", ".join(running))
            if not running:
                break
            time.sleep(0.5)
            for name, (job, proc, start) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[name]
                job.seconds = time.monotonic() - start
                if proc.returncode != 0:
                    self.failed.append((job, self.log_dir / f"{name.replace('/', '_')}.log"))
                    tqdm.write(f"[reproduce] {name} FAILED (exit {proc.returncode}); waiting for the running jobs")
                    continue
                (job.run_dir / "job.json").write_text(json.dumps(
                    {"settings": job.settings, "seconds": job.seconds, "ended": time.time()}, indent=2) + "\n")
                tqdm.write(f"[reproduce] {name}: done in {job.seconds / 60:.1f} min")
                self._done(job, bar)
                bar.set_postfix_str(", ".join(running))
        bar.close()
        if self.failed:
            lines = [f"  {job.name}: see {log}" for job, log in self.failed]
            raise RuntimeError("jobs failed (rerun the same command to continue):\n" + "\n".join(lines))

    def _done(self, job: Job, bar) -> None:
        bar.update(1)
        if job.after is not None:
            before = len(self.queue)
            job.after(job)
            bar.total += len(self.queue) - before
            bar.refresh()


def val_accuracy(run_dir: Path) -> float:
    return json.loads((run_dir / "eval" / "val_scores.json").read_text())["all"]["accuracy"]


@dataclass
class Reproduction:
    out: Path
    preset: Preset
    task: Task
    ranks_per_job: int = 1
    cores: int = field(default_factory=lambda: os.cpu_count() or 1)
    methods: tuple[Method, ...] = METHODS  # GridRead: METHODS + GRIDREAD_EXTRA, set by reproduce()
    runs: dict[str, list[Path]] = field(default_factory=dict)  # method key -> run dirs of the reported seeds
    temperature: float | None = None  # vanilla KD's chosen temperature
    sweep: dict[float, list[float]] = field(default_factory=dict)  # temperature -> validation accuracies

    @property
    def data(self) -> Path:
        return self.task.data_dir(self.out)

    @property
    def teacher_dir(self) -> Path:
        return self.out / "teacher"

    def student_init(self, seed: int) -> Path:
        return self.out / "init" / f"student_seed{seed}"

    def run_dir(self, method: Method, seed: int, temperature: float | None = None) -> Path:
        suffix = f"_T{temperature:g}" if temperature is not None and len(method.temperatures) > 1 else ""
        return self.out / f"{method.key}{suffix}" / f"seed{seed}"

    # -- preparation ----------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        self.task.write_data(self.data)
        teacher_init = self.out / "init" / "teacher"
        if not (teacher_init / "config.json").is_file():
            init_model_dir(self.task.spec("teacher", self.out), self.data / "tokenizer", teacher_init)

    def make_student_init(self, seed: int) -> None:
        path = self.student_init(seed)
        if not (path / "config.json").is_file():
            init_model_dir(self.task.spec("student", self.out), self.data / "tokenizer", path,
                           vision_from=self.teacher_dir / "final", seed=seed)

    # -- jobs -----------------------------------------------------------------------------------------

    def teacher_job(self) -> Job:
        cores = max(1, self.cores)
        return Job("teacher", self.teacher_dir, "recipes/mini/teacher_sft.yaml", [
            f"run_dir={self.teacher_dir}", f"model.path={self.out / 'init' / 'teacher'}",
            f"train.max_steps={self.preset.teacher_steps}", f"train.micro_batch_size={32 // min(cores, 2)}",
            *self.task.overrides(self.data), *ENGINE], ranks=min(cores, 2))

    def student_job(self, method: Method, seed: int, temperature: float | None = None) -> Job:
        run_dir = self.run_dir(method, seed, temperature)
        overrides = [
            f"run_dir={run_dir}", f"seed={seed}", f"model.path={self.student_init(seed)}",
            f"train.max_steps={self.preset.student_steps}", f"train.micro_batch_size={32 // self.ranks_per_job}",
            f"eval.data={self.data / 'val.json'}", *self.task.overrides(self.data), *ENGINE, *method.overrides,
        ]
        if method.needs_teacher:
            overrides.append(f"teacher.path={self.teacher_dir / 'final'}")
        if temperature is not None:
            overrides.append(f"kd.temperature={temperature:g}")
        name = f"{method.key}{f'_T{temperature:g}' if temperature is not None else ''}/seed{seed}"
        return Job(name, run_dir, method.recipe, overrides, ranks=self.ranks_per_job,
                   before=lambda: self.make_student_init(seed))

    def student_jobs(self, scheduler: Scheduler) -> None:
        """Every row and seed; the vanilla-KD sweep first, so its choice is known while the rest run."""
        seeds = range(self.preset.seeds)
        sweep_seeds = range(min(self.preset.sweep_seeds, self.preset.seeds))
        kd = next((m for m in self.methods if m.temperatures), None)
        sweep_jobs = [self.student_job(kd, s, t) for s in sweep_seeds for t in kd.temperatures] if kd else []
        pending = {job.name for job in sweep_jobs}

        def sweep_done(job: Job) -> None:
            pending.discard(job.name)
            if pending:
                return
            for t in kd.temperatures:
                self.sweep[t] = [val_accuracy(self.run_dir(kd, s, t)) for s in sweep_seeds]
            # Ties go to the lower temperature, the plainer method.
            self.temperature = max(kd.temperatures, key=lambda t: (statistics.mean(self.sweep[t]), -t))
            tqdm.write(f"[reproduce] vanilla KD: validation accuracy per temperature "
                       f"{ {t: round(statistics.mean(v), 1) for t, v in self.sweep.items()} } -> T={self.temperature:g}")
            self.runs[kd.key] = [self.run_dir(kd, s, self.temperature) for s in seeds]
            for s in seeds:
                if s not in sweep_seeds:
                    scheduler.queue.insert(0, self.student_job(kd, s, self.temperature))

        for job in sweep_jobs:
            job.after = sweep_done
            scheduler.add(job)
        for method in self.methods:
            if method.temperatures:
                continue
            self.runs[method.key] = [self.run_dir(method, s) for s in seeds]
            for s in seeds:
                scheduler.add(self.student_job(method, s))

    def train_all(self) -> None:
        self.prepare_data()
        logs = self.out / "logs"
        teacher = Scheduler(slots=1, threads=max(1, self.cores // 2), log_dir=logs)
        teacher.add(self.teacher_job())
        teacher.run()
        slots = max(1, self.cores // self.ranks_per_job)
        students = Scheduler(slots=slots, threads=max(1, self.cores // (slots * self.ranks_per_job)), log_dir=logs)
        self.student_jobs(students)
        students.run()

    # -- evaluation and report --------------------------------------------------------------------------

    def evaluate_all(self) -> dict:
        """Test exact match of the teacher and every reported student, in this process."""
        import torch

        torch.set_num_threads(self.cores)
        test = self.data / "test.json"
        n = self.task.max_new_tokens
        scores = {"teacher": [evaluate_model_dir(self.teacher_dir / "final", test, max_new_tokens=n)]}
        for key, dirs in tqdm(list(self.runs.items()), desc="test", dynamic_ncols=True):
            scores[key] = [evaluate_model_dir(d / "final", test, max_new_tokens=n) for d in dirs]
        return scores


def task_rows(task: str, keys: list[str] | None = None) -> tuple[Method, ...]:
    """The table's rows for ``task``, in its order; ``keys`` picks some of them (unknown keys raise)."""
    every = METHODS + (GRIDREAD_EXTRA if task == "gridread" else ())
    if keys is None:
        return every
    known = ", ".join(m.key for m in every)
    if not keys:
        raise ValueError(f"--rows: no rows given; known for {task}: {known}")
    unknown = [k for k in keys if k not in {m.key for m in every}]
    if unknown:
        raise ValueError(f"--rows: unknown rows {unknown} for {task}; known: {known}")
    return tuple(m for m in every if m.key in keys)


def reproduce(*, quick: bool = False, task: str = "digitgrid", task_options: list[str] | None = None,
              out: str | None = None, seeds: int | None = None, steps: int | None = None,
              teacher_steps: int | None = None, ranks_per_job: int = 1, rows: list[str] | None = None) -> str:
    """Train everything that is not already done, evaluate, write the report; returns results.md's text.
    ``out``: relative to the working directory (default: ``runs/mini/reproduce[_gridread][_quick]`` in the
    repository). ``rows``: the keys of the rows to train and report (default: every row of the task)."""
    the_task = make_task(task, task_options or [], quick)
    base = PRESETS[task, "quick" if quick else "default"]
    seeds = seeds or base.seeds
    preset = Preset(seeds=seeds, student_steps=steps or base.student_steps,
                    teacher_steps=teacher_steps or base.teacher_steps, sweep_seeds=min(base.sweep_seeds, seeds),
                    heatmap_samples=base.heatmap_samples, mechanism_samples=base.mechanism_samples)
    name = "reproduce" + ("_gridread" if task == "gridread" else "") + ("_quick" if quick else "")
    repro = Reproduction(out=Path(out).resolve() if out else REPO / "runs" / "mini" / name, preset=preset,
                         task=the_task, ranks_per_job=ranks_per_job,
                         methods=task_rows(task, rows))
    repro.train_all()
    start = time.monotonic()  # training time comes from the jobs' records (they may span several invocations)
    scores = repro.evaluate_all()
    text = write_report(repro, scores, minutes=(time.monotonic() - start) / 60)
    print(text, flush=True)
    print(f"[reproduce] wrote {repro.out / 'results.md'}, results.json, results.png and attention_maps/", flush=True)
    return text


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="the paper's component table in miniature on the CPU example: teacher, "
                                            "every row over seeds, results.md/png, attention heat-maps")
    p.add_argument("--quick", action="store_true",
                   help="the short preset: teacher 1000 steps, 2 seeds, 200 student steps (under 10 min)")
    p.add_argument("--task", default="digitgrid", choices=("digitgrid", "gridread"),
                   help="digitgrid (2x2 digits, 1-4-token answers) or gridread (localized questions, long answers)")
    p.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a GridRead generator option (grid, upscale, mix=cat:w,..., phrasings, row_separator, "
                        "train_size, val_size, test_size, seed); repeat for several")
    p.add_argument("--out", default=None, help="output folder (default: runs/mini/reproduce[_gridread][_quick])")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default: the preset's, 5)")
    p.add_argument("--steps", type=int, default=None,
                   help="student steps (default: the preset's, 800 for digitgrid, 400 for gridread)")
    p.add_argument("--teacher-steps", type=int, default=None,
                   help="teacher steps (default: the preset's, 3000 for digitgrid, 2000 for gridread)")
    p.add_argument("--rows", default=None, metavar="KEY,KEY,...",
                   help="train and report only these rows (e.g. sft,vanilla_kd,tpa); default: every row. The "
                        "attention study and the teacher's capture need the align_ti row")
    p.add_argument("--ranks-per-job", type=int, default=1,
                   help="ranks of each student job; cores // ranks jobs run side by side (default 1)")
    args = p.parse_args(argv)
    rows = [k for k in args.rows.split(",") if k] if args.rows is not None else None
    try:
        make_task(args.task, args.task_option, args.quick)
        task_rows(args.task, rows)
    except ValueError as err:
        p.error(str(err))  # one line, exit 2
    reproduce(quick=args.quick, task=args.task, task_options=args.task_option, out=args.out, seeds=args.seeds,
              steps=args.steps, teacher_steps=args.teacher_steps, ranks_per_job=args.ranks_per_job, rows=rows)


if __name__ == "__main__":
    main()
