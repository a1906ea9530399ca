"""Console logging for the package's commands: our records at the chosen level, third-party libraries at WARNING."""
from __future__ import annotations

import logging
import os
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Libraries whose INFO records ("absl: Using default tokenizer.", HTTP and font-cache chatter) are noise to a user.
THIRD_PARTY = ("absl", "transformers", "huggingface_hub", "httpx", "urllib3", "filelock", "matplotlib", "fsspec",
               "datasets", "torch", "peft", "hydra", "PIL", "joblib")
VERBOSE_ENV = "MOSE_EASYEDIT_THIRD_PARTY_LOGS"


def setup_logging(level: str | int = logging.INFO, third_party: str | int | None = None) -> None:
    """Log to stderr at ``level``; third-party loggers at ``third_party`` (default WARNING, or the level named by
    ``$MOSE_EASYEDIT_THIRD_PARTY_LOGS``, e.g. INFO to see them)."""
    if isinstance(level, str):
        level = level.upper()
    logging.basicConfig(level=level, stream=sys.stderr, force=True, format=FORMAT)
    quiet = third_party or os.environ.get(VERBOSE_ENV, "WARNING")
    for name in THIRD_PARTY:
        logging.getLogger(name).setLevel(quiet.upper() if isinstance(quiet, str) else quiet)
