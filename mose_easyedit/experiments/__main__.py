"""Command line: ``python -m mose_easyedit.experiments key=value ...`` (Hydra; ``--help`` lists the config)."""
from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from ..logs import setup_logging
from .checkpoint import CorruptFileError
from .config import CONF_DIR, ExperimentError, register_resolvers
from .runner import run

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


CONFIG_GROUPS = ("method", "model", "data")


def unknown_group_choice(argv: list[str]) -> str | None:
    """One line naming the first ``method=`` / ``model=`` / ``data=`` choice (comma lists of a multirun included)
    that has no config, and the known ones; None when every choice exists. Hydra's own message for it is a
    screenful."""
    for argument in argv:
        key, sep, value = argument.partition("=")
        if not sep or key.lstrip("+~") not in CONFIG_GROUPS:
            continue
        group = key.lstrip("+~")
        known = sorted(path.stem for path in (CONF_DIR / group).glob("*.yaml"))
        for choice in value.split(","):
            if choice.strip() not in known:
                return f"{group}={choice.strip()}: no such {group}; known: {', '.join(known)}"
    return None


if __name__ == "__main__":
    register_resolvers()
    problem = unknown_group_choice(sys.argv[1:])
    if problem:
        setup_logging()
        logger.error("%s", problem)
        sys.exit(2)
    main()
