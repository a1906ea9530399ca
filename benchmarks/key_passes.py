"""Seconds of the keys stage per edit: MEMIT-style per-layer key passes started at the previously edited block
against whole passes from the embeddings.

Edits the first ``--n`` CounterFact cases one after another with ``--method`` on the embedded model, twice: with
resumed passes (the default code path) and with every pass run whole. Prints the keys / total seconds per edit
of both and checks that both end with bit-identical weights.

    python benchmarks/key_passes.py --n 20 --method MEMIT --threads 1
"""
from __future__ import annotations

import argparse
import copy
import logging
import statistics
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"

logger = logging.getLogger("benchmarks.key_passes")


def edit_all(model, tok, cases, spec, hp) -> tuple[list[float], list[float]]:
    from mose_easyedit.session import get_session

    keys, totals = [], []
    for case in cases:
        spec.apply(model, tok, [case], hp)
        seconds = get_session(model, spec.name).history[-1]["seconds"]
        keys.append(seconds["keys"])
        totals.append(seconds["total"])
    return keys, totals


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20, help="CounterFact cases edited one after another")
    parser.add_argument("--method", default="MEMIT", help="a method whose edit spreads over a layer window")
    parser.add_argument("--hparams", type=Path, default=None, help="YAML (default hparams/METHOD/smollm2-135m.yaml)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)

    import mose_easyedit.keys as keys_module
    from mose_easyedit.data import load_counterfact
    from mose_easyedit.keys import context_templates
    from mose_easyedit.methods import METHODS
    from mose_easyedit.modeling import load_default_model
    from mose_easyedit.stats import second_moments

    spec = METHODS[args.method]
    hp = spec.hparams_cls.from_hparams(args.hparams or REPO / "hparams" / args.method / "smollm2-135m.yaml")
    model, tok = load_default_model()
    cases = load_counterfact(args.data_dir / "counterfact" / "counterfact-edit.json", limit=args.n)
    # context templates and key statistics, cached on the model object (and copied with it)
    context_templates(model, tok, hp.context_template_length_params, hp.seed)
    second_moments(model, tok, hp.layers, hp)

    results, weights = {}, {}
    resumable = keys_module.decoder_blocks
    for mode in ("resumed", "whole"):
        edited = copy.deepcopy(model)
        keys_module.decoder_blocks = resumable if mode == "resumed" else (lambda model: None)
        try:
            results[mode] = edit_all(edited, tok, cases, spec, hp)
        finally:
            keys_module.decoder_blocks = resumable
        weights[mode] = {name: p.detach().clone() for name, p in edited.named_parameters()}
    identical = all(torch.equal(weights["resumed"][n], weights["whole"][n]) for n in weights["whole"])

    print(f"{args.method}, {args.n} single edits on {hp.model_name}, {torch.get_num_threads()} thread(s)")
    print("| key passes | keys s/edit (median) | total s/edit (median) |")
    print("|---|---|---|")
    for mode, (keys, totals) in results.items():
        print(f"| {mode} | {statistics.median(keys):.3f} | {statistics.median(totals):.2f} |")
    print(f"bit-identical weights after the last edit: {identical}")


if __name__ == "__main__":
    main()
