"""Training: the loop, optimizers and schedules, checkpoints, metrics; `main` is `lmtool-train`."""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from lmtool.config import ConfigError, register_configs

register_configs()

log = logging.getLogger("lmtool")


@hydra.main(config_path="pkg://lmtool.conf", config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from lmtool.data import DatasetNotFoundError
    from lmtool.train.checkpoint import CheckpointError
    from lmtool.train.loop import TrainingDiverged, train

    run_dir = HydraConfig.get().runtime.output_dir
    try:
        results = train(cfg, run_dir)
    except (ConfigError, DatasetNotFoundError, CheckpointError, TrainingDiverged) as err:
        log.error("error: %s", err)
        sys.exit(f"lmtool-train: {err}")
    if "test" in results:
        metric = "bpc" if "bpc" in results["test"] else "ppl"
        print(
            f"valid {metric} {results['valid'][metric]:.3f} | test {metric} {results['test'][metric]:.3f} "
            f"| run dir {run_dir}"
        )


def main() -> None:
    """Console script `lmtool-train`."""
    _hydra_main()
