"""Configuration shared by every command: the YAML reader and the training config's dataclasses.

Imports no torch beyond megatron_ext.rope's and no megatron, so any command checks its settings first.
"""

from megatron_ext.config.reader import ConfigError, apply_override, check, from_dict, read_config, read_raw
from megatron_ext.config.train import (
    CHOICES,
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    PoseConfig,
    TrainConfig,
    TrainingConfig,
    load_config,
    validate,
    validate_optimizer,
)

__all__ = ["CHOICES", "CheckpointConfig", "ConfigError", "DataConfig", "LoggingConfig", "ModelConfig",
           "OptimizerConfig", "ParallelConfig", "PoseConfig", "TrainConfig", "TrainingConfig", "apply_override",
           "check", "from_dict", "load_config", "read_config", "read_raw", "validate",
           "validate_optimizer"]
