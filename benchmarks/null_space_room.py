"""How much room the input side has: the null space of the generic keys per layer, and what a run used of it.

For every layer of ``--layers`` prints the dimension of the null space of C (eigenvalues below each
``--thresholds``) and the share of the generic keys' energy it carries (tr of C on it / tr C), from the statistics
the YAML of ``--method`` names. With run folders (``RUN_DIR ...``, from ``python -m mose_easyedit.experiments``) it
adds per run how many edit keys each layer protects after the last edit (one per request that edited it) and the
free dimension left, n_l − m_l, at the YAML's own threshold: a plane needs a free direction, so an input-side layer
with none left cannot take another edit.

    python benchmarks/null_space_room.py --method MOSE-input --layers 1-21 runs/long/runs/MOSE-input-single
"""
from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import torch
from _embedded import add_arguments, load


def layer_range(text: str) -> list[int]:
    low, _, high = text.partition("-")
    return list(range(int(low), int(high or low) + 1))


def edits_per_layer(run: Path, layer_of: dict[str, int]) -> Counter:
    from mose_easyedit.data import json_lines

    counts: Counter = Counter()
    for _, row in json_lines(run / "results.jsonl", complete_only=True):
        requests = row.get("method", {}).get("num_requests", 1)
        for module in row.get("modules", []):
            if module in layer_of:
                counts[layer_of[module]] += requests
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, 0, "unused", "MOSE-input", "whose YAML names the statistics and the threshold")
    parser.add_argument("--layers", type=layer_range, default=layer_range("1-21"), help="e.g. 1-21")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[1e-2, 2e-2, 5e-2])
    parser.add_argument("runs", type=Path, nargs="*", help="run folders whose protected keys to count")
    args = parser.parse_args(argv)
    setup = load(args)
    from mose_easyedit.stats import second_moments

    moments = second_moments(setup.model, setup.tok, args.layers, setup.hp)
    own = getattr(setup.hp, "nullspace_threshold", args.thresholds[0])
    layer_of = {setup.hp.rewrite_module_tmp.format(layer): layer for layer in args.layers}
    used = {run.name: edits_per_layer(run, layer_of) for run in args.runs}
    header = ["layer"] + [f"dim / energy < {t:g}" for t in args.thresholds]
    header += [f"{name}: keys / free < {own:g}" for name in used]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for layer in args.layers:
        eigenvalues = torch.linalg.eigvalsh(moments[layer].double())
        total = float(eigenvalues.sum())
        cells = [str(layer)]
        for threshold in args.thresholds:
            below = eigenvalues < threshold
            cells.append(f"{int(below.sum())} / {float(eigenvalues[below].sum()) / total:.3f}")
        dimension = int((eigenvalues < own).sum())
        cells += [f"{counts[layer]} / {max(0, dimension - counts[layer])}" for counts in used.values()]
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
