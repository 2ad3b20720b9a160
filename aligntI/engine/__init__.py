"""The DeepSpeed boundary: the only package of aligntI that imports deepspeed (always lazily, inside functions,
so importing it is cheap).

One module per concern; the public names are re-exported here (``from aligntI import engine as ds``):

* :mod:`.dist`: distributed start-up and collectives;
* :mod:`.ds_config`: the student's DeepSpeed config from its JSON, the teacher's derived from it;
* :mod:`.student`: the training engine (backward/step, checkpoint save and load);
* :mod:`.teacher`: forward-only engines (the frozen teacher, ZeRO-3 evaluation) and parameter gathering;
* :mod:`.checkpoints`: which checkpoints are complete, pruning, offline consolidation, atomic writes;
* :mod:`.export`: export to an HF model directory, ZeRO-3-safe at the end of training or from a checkpoint.
"""

from aligntI.engine.checkpoints import consolidate_checkpoint, latest_complete_checkpoint, prune_checkpoints
from aligntI.engine.dist import (
    DistInfo,
    accelerator_name,
    all_reduce_sum,
    barrier,
    communicated_bytes,
    destroy,
    init_distributed,
)
from aligntI.engine.ds_config import (
    build_ds_config,
    sharded_loading,
    teacher_ds_config,
    teacher_placement,
    use_bf16,
)
from aligntI.engine.export import export_checkpoint, export_hf
from aligntI.engine.student import StudentEngine, universal_loading
from aligntI.engine.teacher import TeacherEngine, gathered_parameters, inference_engine

__all__ = [
    "DistInfo", "init_distributed", "accelerator_name", "all_reduce_sum", "barrier", "destroy", "communicated_bytes",
    "use_bf16", "build_ds_config", "teacher_ds_config", "teacher_placement", "sharded_loading",
    "StudentEngine", "universal_loading",
    "TeacherEngine", "inference_engine", "gathered_parameters",
    "latest_complete_checkpoint", "prune_checkpoints", "consolidate_checkpoint",
    "export_hf", "export_checkpoint",
]
