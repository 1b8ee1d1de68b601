"""Training: the loop, optimizers and schedules, checkpoints, metrics; `main` is `lmtool-train`."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from lmtool.config import ConfigError, register_configs

register_configs()

log = logging.getLogger("lmtool")


@hydra.main(config_path="pkg://lmtool.conf", config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    """One training job: in this process, a torchrun rank, or a task of a submitit (SLURM) job."""
    # imported here, not at the top: this package's __init__ runs before any of its modules is imported
    # (lmtool.train.checkpoint, say), and pulling the whole loop in at that point would make every such import
    # load the trainer and risk import cycles through it
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from lmtool.data import DatasetNotFoundError
    from lmtool.train import distributed
    from lmtool.train.checkpoint import CheckpointError
    from lmtool.train.loop import TrainingDiverged, train
    from lmtool.train.rundir import RunDirInUse

    hydra_cfg = HydraConfig.get()
    run_dir = hydra_cfg.runtime.output_dir
    if hydra_cfg.mode == RunMode.MULTIRUN and cfg.logger.group is None:
        cfg.logger.group = Path(hydra_cfg.sweep.dir).name  # the wandb runs of one sweep in one group
    topology = distributed.init_distributed()  # started already under torchrun (main); here in submitit jobs
    if not topology.is_main:
        distributed.quiet_logging()
    try:
        results = train(cfg, run_dir, topology)
    except (ConfigError, DatasetNotFoundError, CheckpointError, TrainingDiverged, RunDirInUse) as err:
        log.error("error: %s", err)
        sys.exit(f"lmtool-train: {err}")
    finally:
        distributed.shutdown_distributed()
    if "test" in results and topology.is_main:
        metric = "bpc" if "bpc" in results["test"] else "ppl"
        print(
            f"valid {metric} {results['valid'][metric]:.3f} | test {metric} {results['test'][metric]:.3f} "
            f"| run dir {run_dir}"
        )


def main() -> None:
    """Console script `lmtool-train` (also `python -m lmtool.train` and `torchrun -m lmtool.train`)."""
    from lmtool.train import distributed  # inside, as in _hydra_main: this package's __init__ stays light

    if distributed.detect_topology().launcher == "torchrun":
        # before Hydra, so that rank 0 can share its run directory (distributed.SharedRunDir)
        distributed.refuse_multirun(sys.argv[1:])
        distributed.init_distributed()
    _hydra_main()
