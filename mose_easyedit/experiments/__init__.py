"""Sequential-editing experiments (paper §6): Tables 1–3 and Figures 2–4 from one command.

    python -m mose_easyedit.experiments method=MOSE model=smollm2-135m data=counterfact num_edits=100 batch_size=1
    python -m mose_easyedit.experiments.compare runs/MOSE-... runs/AlphaEdit-... --out runs/compare

The configuration is a Hydra tree (``conf/``: ``config.yaml`` and the groups ``method/``, ``model/``, ``data/``);
:func:`run` executes (or resumes) one run and :func:`compose_config` builds a config from override strings.
See ``docs/experiments.md``.
"""
from .config import ExperimentError, compose_config
from .runner import SequentialRun, run
from .setup import build_hparams, load_requests

__all__ = ["ExperimentError", "SequentialRun", "build_hparams", "compose_config", "load_requests", "run"]
