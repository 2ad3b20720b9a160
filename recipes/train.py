"""Train from a recipe YAML; the one entry point for every launcher.

    deepspeed --num_gpus 8 recipes/train.py --config recipes/<...>.yaml [dotted.key=value ...]
    torchrun --nproc_per_node 8 recipes/train.py --config ...
    python recipes/train.py --config ...            # one process
    deepspeed recipes/train.py --config ... --dry-run   # print the plan (as `aligntI plan`) and exit
"""

import sys

from aligntI.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
