"""Where do the models look? Instruction→vision attention maps of a teacher and its students, as pictures.

For a few fixed samples, each model's focus α (the attention of one decoder layer from the
instruction tokens to the vision tokens, averaged over heads and instruction positions, renormalised over
the vision tokens) is reshaped to the vision encoder's patch grid and drawn over the image the model saw.
The teacher is read at its IVA layer (an explicit layer or the ``chosen_layer`` of an ``irs.json``), each
student by default at the same relative depth, the layer distillation aligns with ``iva.mode: attention``.

Outputs of :func:`write_attention_maps`: one PNG per sample, ``overview.png`` with every sample as a row,
and ``attention_maps.json`` with each model's grid of weights per sample and, per student, its cosine
similarity, L1 and total-variation distance to the teacher's map (per sample and averaged), so "did the
student learn where to look?" gets a number as well as a picture.
"""

from __future__ import annotations

import json
import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from aligntI.data.formatting import IMAGE_PLACEHOLDER, to_messages
from aligntI.data.records import RecordSource

# Layout of the pictures, in inches at DPI dots per inch: one panel per column (the image, then each
# model) and a colour bar per row. Binary-exact sizes so the PNG size in pixels is exactly predictable.
PANEL_INCHES = 2.25
ROW_INCHES = 3.0
COLORBAR_INCHES = 0.75
DPI = 100
METRICS = ("cosine", "l1", "tv")


@dataclass
class AttentionMaps:
    """What :func:`compute_attention_maps` returns.

    ``maps[name]`` is ``[N, g, g]`` (each map sums to 1 over its ``g×g`` vision tokens, row-major patch order);
    ``views`` ``[N, H, W, 3]`` in [0, 1] is the teacher processor's image as the model saw it (after resizing
    and cropping), the background of the pictures; ``similarity[student][metric]`` has one value per sample.
    """

    models: dict[str, str]
    layers: dict[str, int]
    num_layers: dict[str, int]
    teacher: str | None
    samples: list[dict]
    maps: dict[str, torch.Tensor]
    views: torch.Tensor
    similarity: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    predictions: dict[str, dict[str, str]] = field(default_factory=dict)
    layer_source: str = ""
    queries: str = "instruction"  # the maps' query rows (iva.queries)

    def summary(self) -> dict[str, dict[str, float]]:
        """Per student, each metric averaged over the samples."""
        return {name: {m: sum(v) / len(v) for m, v in per.items()} for name, per in self.similarity.items()}

    def report(self) -> dict:
        """The JSON-serialisable content of ``attention_maps.json``."""
        grids = {name: list(m.shape[1:]) for name, m in self.maps.items()}
        samples = []
        for i, s in enumerate(self.samples):
            entry = {**s, "maps": {name: m[i].tolist() for name, m in self.maps.items()}}
            if self.similarity:
                entry["vs_teacher"] = {name: {m: v[i] for m, v in per.items()}
                                       for name, per in self.similarity.items()}
            preds = {name: p[s["id"]] for name, p in self.predictions.items() if s["id"] in p}
            if preds:
                entry["predictions"] = preds
            samples.append(entry)
        return {
            "teacher": self.teacher,
            "models": {name: {"path": path, "layer": self.layers[name], "num_layers": self.num_layers[name],
                              "grid": grids[name]} for name, path in self.models.items()},
            "teacher_layer_from": self.layer_source,
            "queries": self.queries,
            "metrics": {"cosine": "cosine similarity of the student's and the teacher's maps (1: same shape)",
                        "l1": "sum of absolute differences (0..2)",
                        "tv": "total-variation distance, L1 / 2 (0: identical, 1: disjoint)"},
            "summary": self.summary(),
            "samples": samples,
        }


# ----------------------------------------------------------------------------------------------- layers


def num_text_layers(model_dir: str | Path) -> int:
    """Decoder layers of a model directory's language model (from its config; no weights loaded)."""
    from transformers import AutoConfig

    if not Path(model_dir, "config.json").is_file():
        raise FileNotFoundError(f"no HF model directory at {model_dir} (config.json missing)")
    return AutoConfig.from_pretrained(str(model_dir)).get_text_config().num_hidden_layers


def irs_layer(path: str | Path, teacher_layers: int | None = None) -> int:
    """``chosen_layer`` of an ``irs.json`` (``aligntI irs`` or a distillation run with ``iva.layer: auto``).

    ``path`` is the file or the folder holding it (a run directory). With ``teacher_layers``, the file must
    score that many layers, so an IRS of another model is not silently applied to this teacher.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "irs.json"
    if not path.is_file():
        raise FileNotFoundError(f"no irs.json at {path}")
    report = json.loads(path.read_text())
    if not isinstance(report, dict) or not isinstance(report.get("chosen_layer"), int):
        raise ValueError(f"{path}: no integer 'chosen_layer' (not an irs.json written by aligntI?)")
    scored = len(report.get("irs", []))
    if teacher_layers is not None and scored and scored != teacher_layers:
        raise ValueError(f"{path} scores {scored} layers (model {report.get('model')!r}) but the teacher has "
                         f"{teacher_layers}: it was computed for another model")
    return report["chosen_layer"]


def check_layer(name: str, layer: int, n_layers: int) -> int:
    if not isinstance(layer, int) or not 0 <= layer < n_layers:
        raise ValueError(f"{name}: layer {layer} is out of range; the model has {n_layers} decoder layers "
                         f"(0..{n_layers - 1})")
    return layer


def resolve_layers(models: dict[str, str | Path], teacher: str, teacher_layer: int | None = None,
                   irs: str | Path | None = None, student_layer: int | None = None) -> tuple[dict[str, int], str]:
    """The layer to read per model, and where the teacher's came from.

    The teacher's: ``teacher_layer``, else the ``chosen_layer`` of ``irs``. Every other model's:
    ``student_layer`` if given, else the layer at the teacher layer's relative depth (as distillation picks
    ``iva.student_layer``). Out-of-range layers raise ``ValueError`` naming the model.
    """
    from aligntI.hooks.modules import relative_depth_layer

    if teacher not in models:
        raise ValueError(f"teacher {teacher!r} is not one of the models {list(models)}")
    if (teacher_layer is None) == (irs is None):
        raise ValueError("give exactly one of the teacher's layer and an irs.json to read it from")
    counts = {name: num_text_layers(path) for name, path in models.items()}
    if teacher_layer is None:
        teacher_layer, source = irs_layer(irs, counts[teacher]), str(irs)
    else:
        source = "given"
    layers = {teacher: check_layer(teacher, teacher_layer, counts[teacher])}
    for name in models:
        if name != teacher:
            layer = student_layer if student_layer is not None else \
                relative_depth_layer(teacher_layer, counts[teacher], counts[name])
            layers[name] = check_layer(name, layer, counts[name])
    return {name: layers[name] for name in models}, source


# ------------------------------------------------------------------------------------------------- maps


def to_grid(weights: torch.Tensor) -> torch.Tensor:
    """``[..., V]`` vision-token weights → ``[..., g, g]`` in row-major patch order; ``V`` must be ``g²``."""
    n = weights.shape[-1]
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(f"{n} vision tokens per image do not form a square patch grid (e.g. a CLS token kept "
                         "by vision_feature_select_strategy 'full', or a non-square image size); cannot draw "
                         "them as a map")
    return weights.reshape(*weights.shape[:-1], g, g)


def read_samples(data: str | Path, images: str | Path | None, indices: list[int]) -> list[dict]:
    """Index, id, image name, question (the user turns' text) and reference (the last answer) of each record."""
    source = RecordSource(data, images)
    out = []
    for i in indices:
        if not 0 <= i < len(source):
            raise ValueError(f"sample {i} is out of range: {data} has {len(source)} records")
        record = source.get(i)
        messages, _ = to_messages(record["conversations"])
        question = " / ".join(" ".join(m["content"].replace(IMAGE_PLACEHOLDER, " ").split())
                              for m in messages if m["role"] == "user")
        out.append({"index": i, "id": str(record.get("id", f"#{i}")), "image": record.get("image"),
                    "question": question, "reference": messages[-1]["content"]})
    return out


def _view(pixel_values: torch.Tensor, image_processor) -> torch.Tensor:
    """``[N, 3, H, W]`` processor output → ``[N, H, W, 3]`` in [0, 1] (undo the normalisation)."""
    x = pixel_values.float()
    if getattr(image_processor, "do_normalize", True):
        mean = torch.tensor(image_processor.image_mean, dtype=x.dtype)[None, :, None, None]
        std = torch.tensor(image_processor.image_std, dtype=x.dtype)[None, :, None, None]
        x = x * std + mean
    if not getattr(image_processor, "do_rescale", True):
        x = x / 255
    return x.clamp(0, 1).permute(0, 2, 3, 1)


def model_focus(model_dir: str | Path, layer: int, data: str | Path, images: str | Path | None,
                indices: list[int], *, chat_template: str | None = None, batch_size: int = 16,
                attn: str = "sdpa", dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                max_length: int = 4096, queries: str = "instruction") -> tuple[torch.Tensor, torch.Tensor]:
    """One model's focus of ``layer`` on records ``indices`` of ``data``: (``[N, V]`` maps, ``[N, H, W, 3]`` views).

    ``queries``: the focus's query rows, as a recipe's ``iva.queries`` names them. A plain forward (no
    generation, no KV cache) over the whole conversation: the query rows come before the answer's tokens, so
    causal attention makes their rows the same as with the prompt alone.
    """
    from aligntI.config import AttentionConfig, DataConfig, DataSource
    from aligntI.data.dataset import LlavaDataset, model_inputs
    from aligntI.data.loader import build_collator, build_encoder, build_records
    from aligntI.hooks.attention import AttentionCapture, install
    from aligntI.losses.iva import focus_queries, instruction_to_vision_focus
    from aligntI.models.loading import load_model, load_processor

    install()
    processor = load_processor(model_dir)
    cfg = DataConfig(train=[DataSource(str(data), images=None if images is None else str(images))],
                     chat_template=chat_template, max_length=max_length, num_workers=0)
    encoder = build_encoder(processor, cfg)
    dataset = LlavaDataset(build_records(cfg, seed=0), encoder, processor.image_processor, "error")
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size,
                                         shuffle=False, collate_fn=build_collator(processor, encoder, "right"))
    model = load_model(model_dir, AttentionConfig(attn, "sdpa"), dtype).to(device).eval()
    focus, views = [], []
    for batch in loader:
        if batch["skips"]:  # a too-long sample would be replaced by the next record: the wrong picture
            raise ValueError(f"{model_dir}: {batch['skips'][0].message} (raise max_length)")
        rows = focus_queries(batch["instruction_mask"], batch["labels"], queries)
        for sid, has_vision, has_rows in zip(batch["sample_ids"], batch["vision_mask"].any(-1).tolist(),
                                             rows.any(-1).tolist()):
            if not (has_vision and has_rows):
                raise ValueError(f"{data}: sample {sid!r} has no image or no {queries} rows after its image: "
                                 "there is no attention to the image to draw")
        n_vis = batch["vision_mask"].sum(-1)
        if (n_vis != n_vis[0]).any():
            raise ValueError(f"{data}: samples with more than one image are not supported ({n_vis.tolist()} "
                             "vision tokens)")
        inputs = {k: v.to(device) for k, v in model_inputs(batch).items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        masks = [m.to(device) for m in (rows, batch["vision_mask"], batch["attention_mask"])]
        with AttentionCapture(model, [layer], *masks) as cap, torch.no_grad():
            model(**inputs, logits_to_keep=1, use_cache=False)
        focus.append(instruction_to_vision_focus(cap[layer], cap.inst_valid.to(device),
                                                 cap.vis_valid.to(device)).float().cpu())
        views.append(_view(batch["pixel_values"], processor.image_processor))
    del model
    return torch.cat(focus), torch.cat(views)


def compare(teacher: torch.Tensor, student: torch.Tensor) -> dict[str, list[float]]:
    """Per sample of ``[N, ...]`` maps: cosine similarity, L1 and total-variation distance (L1 / 2)."""
    t, s = teacher.flatten(1).double(), student.flatten(1).double()
    if t.shape != s.shape:
        raise ValueError(f"cannot compare maps of different grids: teacher {tuple(teacher.shape[1:])}, "
                         f"student {tuple(student.shape[1:])}")
    l1 = (t - s).abs().sum(-1)
    return {"cosine": F.cosine_similarity(t, s, dim=-1).tolist(), "l1": l1.tolist(), "tv": (l1 / 2).tolist()}


def compute_attention_maps(models: dict[str, str | Path], data: str | Path, indices: list[int],
                           layers: dict[str, int], *, teacher: str | None = None,
                           images: str | Path | None = None, chat_template: str | None = None,
                           batch_size: int = 16, attn: str = "sdpa", dtype: torch.dtype = torch.float32,
                           device: str | torch.device = "cpu", max_length: int = 4096,
                           predictions: dict[str, dict[str, str]] | None = None,
                           layer_source: str = "", queries: str = "instruction") -> AttentionMaps:
    """Each model's focus map (from the ``queries`` rows to the image) on records ``indices`` of ``data``, and
    the comparisons.

    ``models``: name → HF model directory, loaded one at a time; ``layers``: name → decoder layer (see
    :func:`resolve_layers`). ``teacher`` (default: the first model) is the reference every other model is
    compared with. ``predictions`` (name → sample id → answer) is optional and only annotates the output.
    """
    if not indices:
        raise ValueError("no samples chosen")
    missing = [name for name in models if name not in layers]
    if missing:
        raise ValueError(f"no layer given for {missing}")
    teacher = teacher if teacher is not None else next(iter(models))
    if teacher not in models:
        raise ValueError(f"teacher {teacher!r} is not one of the models {list(models)}")
    counts = {name: num_text_layers(path) for name, path in models.items()}
    for name in models:
        check_layer(name, layers[name], counts[name])
    samples = read_samples(data, images, indices)
    maps, views = {}, None
    # The teacher first: its processor's images are the pictures' background.
    for name in [teacher] + [n for n in models if n != teacher]:
        focus, seen = model_focus(models[name], layers[name], data, images, indices, chat_template=chat_template,
                                  batch_size=batch_size, attn=attn, dtype=dtype, device=device,
                                  max_length=max_length, queries=queries)
        try:
            maps[name] = to_grid(focus)
        except ValueError as err:
            raise ValueError(f"{name} ({models[name]}): {err}") from None
        views = seen if views is None else views
    similarity = {name: compare(maps[teacher], maps[name]) for name in models if name != teacher}
    return AttentionMaps(models={n: str(p) for n, p in models.items()}, layers=dict(layers), num_layers=counts,
                         teacher=teacher, samples=samples, maps={n: maps[n] for n in models}, views=views,
                         similarity=similarity, predictions=dict(predictions or {}), layer_source=layer_source,
                         queries=queries)


# --------------------------------------------------------------------------------------------- pictures


def figure_pixels(rows: int, models: int) -> tuple[int, int]:
    """(width, height) in pixels of a picture with ``rows`` samples and ``models`` map columns."""
    return (round(((1 + models) * PANEL_INCHES + COLORBAR_INCHES) * DPI), round(rows * ROW_INCHES * DPI))


def _upsample(grid: torch.Tensor, height: int, width: int) -> torch.Tensor:
    # Enough pixels for a smooth picture of a small image (DigitGrid's is 32x32).
    scale = max(1, math.ceil(128 / min(height, width)))
    return F.interpolate(grid[None, None].float(), size=(height * scale, width * scale), mode="bilinear",
                         align_corners=False)[0, 0]


def _draw(result: AttentionMaps, rows: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result.models)
    width, height = figure_pixels(len(rows), len(names))
    fig = plt.figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    fig_w, fig_h = width / DPI, height / DPI
    margin, side = 0.125, PANEL_INCHES - 0.25  # square panel; the rest of the row holds its title
    for r, i in enumerate(rows):
        bottom = fig_h - (r + 1) * ROW_INCHES + margin
        sample = result.samples[i]
        view = result.views[i].numpy()
        h, w = view.shape[:2]
        extent = (0, w, h, 0)
        # One colour scale per row, so the models' maps of a sample are comparable.
        vmax = max(float(result.maps[n][i].max()) for n in names) or 1.0
        for c in range(1 + len(names)):
            ax = fig.add_axes(((c * PANEL_INCHES + margin) / fig_w, bottom / fig_h, side / fig_w, side / fig_h))
            ax.imshow(view, extent=extent, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                question = textwrap.shorten(sample["question"], 60)
                lines = [f"#{sample['index']} {textwrap.shorten(sample['id'], 24)}", *textwrap.wrap(question, 30)]
                lines.append(f"ref: {textwrap.shorten(sample['reference'], 30)}")
                ax.set_title("\n".join(lines), fontsize=8)
                continue
            name = names[c - 1]
            im = ax.imshow(_upsample(result.maps[name][i], h, w).numpy(), extent=extent, cmap="inferno",
                           alpha=0.6, vmin=0.0, vmax=vmax, interpolation="bilinear")
            title = f"{name} (layer {result.layers[name]})"
            if name in result.similarity:
                sim = result.similarity[name]
                title += f"\ncos {sim['cosine'][i]:.2f}  TV {sim['tv'][i]:.2f}"
            elif name == result.teacher:
                title += "\nteacher"
            answer = result.predictions.get(name, {}).get(sample["id"])
            if answer is not None:
                title += f"\nsays: {textwrap.shorten(answer, 28)}"
            ax.set_title(title, fontsize=8)
        cax = fig.add_axes((((1 + len(names)) * PANEL_INCHES + 0.1) / fig_w, bottom / fig_h, 0.15 / fig_w,
                            side / fig_h))
        bar = fig.colorbar(im, cax=cax)
        bar.ax.tick_params(labelsize=6)
        bar.set_label("share of vision attention", fontsize=6)
    # No bbox_inches="tight": the PNG keeps the exact size of figure_pixels.
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def write_attention_maps(result: AttentionMaps, out_dir: str | Path) -> dict[str, Path | list[Path]]:
    """``attention_maps.json``, one ``sample_<index>.png`` per sample and ``overview.png`` under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = out / "attention_maps.json"
    report.write_text(json.dumps(result.report(), indent=1) + "\n")
    pictures = []
    for i, sample in enumerate(result.samples):
        pictures.append(out / f"sample_{sample['index']:06d}.png")
        _draw(result, [i], pictures[-1])
    _draw(result, list(range(len(result.samples))), out / "overview.png")
    return {"json": report, "samples": pictures, "overview": out / "overview.png"}


def read_predictions(path: str | Path) -> dict[str, str]:
    """sample id → prediction from an ``aligntI eval`` ``*_predictions.jsonl`` (or a JSON list of such rows)."""
    text = Path(path).read_text()
    rows = json.loads(text) if text.lstrip().startswith("[") else \
        [json.loads(line) for line in text.splitlines() if line.strip()]
    return {str(r["id"]): str(r["prediction"]) for r in rows}


def format_summary(result: AttentionMaps) -> str:
    """A small table: each student's mean cosine / TV to the teacher's map."""
    lines = [f"{'model':<16}{'layer':>6}{'cosine':>9}{'TV':>7}"]
    summary = result.summary()
    for name in result.models:
        if name in summary:
            s = summary[name]
            lines.append(f"{name:<16}{result.layers[name]:>6}{s['cosine']:>9.3f}{s['tv']:>7.3f}")
        else:
            lines.append(f"{name:<16}{result.layers[name]:>6}{'(teacher)':>16}")
    return "\n".join(lines)
