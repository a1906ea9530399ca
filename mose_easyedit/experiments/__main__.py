"""Command line: ``python -m mose_easyedit.experiments key=value ...`` (Hydra; ``--help`` lists the config)."""
from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from ..logs import setup_logging
from .checkpoint import CorruptFileError
from .runner import ExperimentError, register_resolvers, run

logger = logging.getLogger("mose_easyedit.experiments")


@hydra.main(config_path="conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    setup_logging(str(cfg.log_level))
    try:
        run(cfg)
    except (ExperimentError, CorruptFileError) as exc:
        logger.error("%s", exc)
        sys.exit(2)


if __name__ == "__main__":
    register_resolvers()
    main()
