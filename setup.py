from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="aligntI",
    version="0.1.0",
    description="Align-TI: distilling multimodal LLMs via token interactions, with DeepSpeed ZeRO-3 recipes",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["aligntI", "aligntI.*"]),
    package_data={"aligntI.data": ["templates/*.jinja"]},
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.17,<0.20",
        "transformers>=5.0,<6",
        "accelerate>=1.1",  # HfDeepSpeedConfig: sharded from_pretrained under ZeRO-3
        "tokenizers>=0.21",
        "sentencepiece",
        "protobuf",  # sentencepiece-based tokenizers convert through it in transformers 5
        "pyyaml",
        "pillow",
        "numpy",
        "tqdm",
        "matplotlib",  # loss curves and IRS charts are written as PNG
        "scikit-learn>=1.3",  # the CPU example's handwritten digits ship with it
    ],
    extras_require={
        "gpu": ["flash-attn>=2.6"],
        "logging": ["tensorboard>=2.14", "wandb>=0.19"],  # logging.tensorboard / logging.wandb
        "dev": ["pytest>=8", "ruff>=0.6", "tensorboard>=2.14", "wandb>=0.19"],
    },
    entry_points={"console_scripts": ["aligntI=aligntI.cli:main"]},
)
