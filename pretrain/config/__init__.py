"""Run configuration: one dataclass per section, loaded from YAML, overridden by ``--section.key=value``.

Config is inert typed data (sections.py). Nothing here builds runtime objects and nothing reads a global config:
``build()`` functions elsewhere take the section they need. loading.py reads YAML and overrides with type checks;
validation.py checks values that need no world size (ParallelDims checks the rest).
"""

from pretrain.config.loading import dump, from_dict, load, parse_override, to_yaml
from pretrain.config.sections import (CheckpointConfig, Config, DataConfig, DataSource, FtConfig,
                                      MetricsConfig, ModelConfig, OptimConfig, ParallelConfig, PrometheusConfig,
                                      RunConfig, TrainConfig)
from pretrain.config.validation import validate, validate_local

__all__ = ["CheckpointConfig", "Config", "DataConfig", "DataSource", "FtConfig", "MetricsConfig",
           "ModelConfig", "OptimConfig", "ParallelConfig", "PrometheusConfig", "RunConfig", "TrainConfig", "dump",
           "from_dict", "load", "parse_override", "to_yaml", "validate", "validate_local"]
