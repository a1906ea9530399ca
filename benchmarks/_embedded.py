"""Set-up shared by the benchmark scripts that time one method on the embedded model: the common arguments,
the thread count and logging, the model, the method's shipped YAML for it and the first CounterFact cases."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"


def add_arguments(parser: argparse.ArgumentParser, n: int, n_help: str, method: str,
                  method_help: str) -> None:
    parser.add_argument("--n", type=int, default=n, help=n_help)
    parser.add_argument("--method", default=method, help=method_help)
    parser.add_argument("--hparams", type=Path, default=None,
                        help="YAML (default hparams/METHOD/smollm2-135m.yaml)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--threads", type=int, default=1)


def load(args: argparse.Namespace) -> SimpleNamespace:
    """``spec``, ``hp``, ``model``, ``tok`` and ``cases`` (the first ``args.n`` CounterFact cases)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    from mose_easyedit.data import load_counterfact
    from mose_easyedit.methods import METHODS
    from mose_easyedit.modeling import load_default_model

    if args.method not in METHODS:
        raise SystemExit(f"unknown method {args.method!r}; known: {', '.join(METHODS)}")
    spec = METHODS[args.method]
    hp = spec.hparams_cls.from_hparams(args.hparams or REPO / "hparams" / args.method / "smollm2-135m.yaml")
    model, tok = load_default_model()
    cases = load_counterfact(args.data_dir / "counterfact" / "counterfact-edit.json", limit=args.n)
    return SimpleNamespace(spec=spec, hp=hp, model=model, tok=tok, cases=cases)
