"""Seconds per stage of an input-side edit late in a long run: after ``--protected`` earlier keys per layer.

A long MOSE-input run slows down as edits accumulate (docs/benchmarks.md §7.1): every layer of the window keeps its
planes orthogonal to the keys of all earlier edits there, and orthogonalising against m keys costs an SVD of a
p × m matrix. This script gives each window layer ``--protected`` earlier keys (random, float32, as a run carries
them; the cost depends on their number, not their values), then edits ``--n`` CounterFact cases one per call
with the method's shipped YAML and prints the median seconds per stage (keys, reach: building the reach
projection, targets, update) and in all. Run it with two versions of the code to compare them side by side.

    python benchmarks/input_side_speed.py --protected 800 --n 3
"""
from __future__ import annotations

import argparse
import statistics

import torch
from _embedded import add_arguments, load


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, 3, "CounterFact cases edited, one per call", "MOSE-input", "an input-side method")
    parser.add_argument("--protected", type=int, default=800, help="earlier keys per window layer")
    args = parser.parse_args(argv)
    setup = load(args)
    from mose_easyedit import edit_history
    from mose_easyedit.methods.mose_shared import MOSEState
    from mose_easyedit.modeling import read_weight
    from mose_easyedit.session import get_session

    hp = setup.hp
    generator = torch.Generator().manual_seed(0)
    width = read_weight(setup.model, hp.rewrite_module_tmp.format(hp.layers[0])).shape[1]
    keys = {hp.rewrite_module_tmp.format(layer): torch.randn(width, args.protected, generator=generator)
            for layer in hp.layers}
    get_session(setup.model, setup.spec.name).state = MOSEState(protected_keys=keys)
    for case in setup.cases:
        setup.spec.apply(setup.model, setup.tok, [case], hp)
    history = edit_history(setup.model, setup.spec.name)
    stages = ("keys", "reach", "targets", "update", "total")
    medians = {stage: statistics.median(h["seconds"].get(stage, 0.0) for h in history) for stage in stages}
    print(f"{args.method}, {args.protected} protected keys per layer, {len(history)} edits: median seconds "
          + ", ".join(f"{stage} {value:.2f}" for stage, value in medians.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
