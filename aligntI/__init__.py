"""aligntI: Align-TI knowledge distillation for LLaVA-style multimodal LLMs on DeepSpeed ZeRO-3."""

__version__ = "0.1.0"
