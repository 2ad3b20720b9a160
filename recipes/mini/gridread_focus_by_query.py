"""Where a GridRead teacher looks, layer by layer, from each set of query rows ``iva.queries`` can choose.

    python recipes/mini/gridread_focus_by_query.py [--run runs/mini/reproduce_gridread] [--split val]

For the one-cell questions of a split: the share of each layer's attention to the image that falls on the asked
cell, from the question's tokens (``instruction``, the focus α IVA uses by default) and from the position that
predicts the answer's first token (``answer_start``), against the cell's share of the vision tokens (what uniform
weights give it). Attention comes from an eager copy of the teacher (``output_attentions``), independent of the
capture the training uses. Reads the validation split by default: this is how the query rows are chosen.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from aligntI.config import AttentionConfig
from aligntI.data.dataset import model_inputs
from aligntI.eval.mechanisms import held_out_loader
from aligntI.losses.iva import focus_queries
from aligntI.models.loading import load_model, load_processor
from aligntI.tasks.gridread import cell_token_mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", default="runs/mini/reproduce_gridread", help="a GridRead reproduction's folder")
    parser.add_argument("--split", default="val", choices=["val", "test"])
    parser.add_argument("--samples", type=int, default=500)
    args = parser.parse_args()
    run = Path(args.run)
    teacher = run / "teacher" / "final"
    model = load_model(teacher, AttentionConfig("eager", "sdpa"), torch.float32).eval()
    data = run / "data" / f"{args.split}.json"
    records = {r["id"]: r for r in json.loads(data.read_text())}
    grid = json.loads((run / "data" / "gridread.json").read_text())["options"]["grid"]
    shares: dict[tuple[int, str], list[float]] = {}
    token_share = []
    for batch in held_out_loader(load_processor(teacher), str(data), args.samples, 16):
        with torch.no_grad():
            attentions = model(**model_inputs(batch), output_attentions=True, use_cache=False).attentions
        for queries in ("instruction", "answer_start"):
            rows = focus_queries(batch["instruction_mask"], batch["labels"], queries)
            for b, sample in enumerate(batch["sample_ids"]):
                record = records[sample]
                if record["category"] != "cell":
                    continue
                vision = batch["vision_mask"][b]
                cell = torch.from_numpy(cell_token_mask(record["cells"], grid, math.isqrt(int(vision.sum()))))
                if queries == "instruction":
                    token_share.append(float(cell.float().mean()))
                for layer, att in enumerate(attentions):
                    probs = att[b].mean(0)[rows[b]][:, vision].mean(0)  # heads, then query rows
                    shares.setdefault((layer, queries), []).append(float(probs[cell].sum() / probs.sum()))
    uniform = sum(token_share) / len(token_share)
    print(f"{len(token_share)} one-cell {args.split} questions; the cell's token share {uniform:.3f}")
    print(f"{'layer':<7}{'queries':<14}{'weight on the cell':>20}{'x token share':>15}")
    for (layer, queries), values in sorted(shares.items()):
        mean = sum(values) / len(values)
        print(f"{layer:<7}{queries:<14}{mean:>20.3f}{mean / uniform:>15.2f}")


if __name__ == "__main__":
    main()
