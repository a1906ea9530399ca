"""Command line: ``python -m mose_easyedit.experiments key=value ...`` (Hydra; ``--help`` lists the config)."""
from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from ..logs import setup_logging
from .checkpoint import CorruptFileError
from .runner import ExperimentError, register_resolvers, run

logger = logging.getLogger("mose_easyedit.experiments")


@hydra.main(config_path="conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    setup_logging(str(cfg.log_level))
    # hydra.run.dir defaults to output_dir; a hydra.run.dir=... (or a multirun job's sweep folder) is where the run
    # goes, so both spellings name the run directory
    with open_dict(cfg):
        cfg.output_dir = HydraConfig.get().runtime.output_dir
    try:
        run(cfg)
    except (ExperimentError, CorruptFileError) as exc:
        logger.error("%s", exc)
        sys.exit(2)


if __name__ == "__main__":
    register_resolvers()
    main()
