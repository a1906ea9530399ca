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

import torch
from _embedded import add_arguments, load

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
    add_arguments(parser, 20, "CounterFact cases edited one after another", "MEMIT",
                  "a method whose edit spreads over a layer window")
    args = parser.parse_args(argv)
    setup = load(args)
    spec, hp, model, tok, cases = setup.spec, setup.hp, setup.model, setup.tok, setup.cases

    import mose_easyedit.keys as keys_module
    from mose_easyedit.keys import context_templates
    from mose_easyedit.stats import second_moments

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
