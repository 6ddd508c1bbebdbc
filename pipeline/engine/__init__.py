"""The training engine on DeepSpeed: `Trainer(model, loss_fn, data, train_cfg, ds_cfg, run_dir).fit(resume)`.

It knows nothing about video: it takes a module, a loss function, a resumable data iterable and the `train` and
`deepspeed` config sections. See trainer.py for the contract of `loss_fn` and `data`, checkpoint.py for the layout
and guarantees of checkpoints.
"""
from pipeline.engine.checkpoint import CorruptCheckpoint, model_state_dict
from pipeline.engine.trainer import DataExhausted, FitSummary, NonFiniteLoss, Trainer

__all__ = ["Trainer", "FitSummary", "NonFiniteLoss", "DataExhausted", "CorruptCheckpoint", "model_state_dict"]
