"""Training and fine-tuning of the cascade (docs/method.md sections 4-5).

`train_run(load_config(path), run_dir)` trains both stages and exports a model package;
`finetune_run(model, config, run_dir)` starts from an existing package. Run with
`cascadeseg train CONFIG`, or `torchrun --nproc_per_node N -m CascadeSegLib.train CONFIG` for DDP.
"""

from .config import RunConfig, StageConfig, TrainSettings, load_config, parse_config
from .run_folder import export_run
from .trainer import train_run

__all__ = ["RunConfig", "StageConfig", "TrainSettings", "load_config", "parse_config", "train_run", "export_run"]
