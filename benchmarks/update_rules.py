"""Cost of the update rules in ``mose_easyedit.rules`` at LLM-like sizes, and accuracy of MOSE's polar routes.

For each hidden size d (weight W is d×p with p = 4d) and each batch size n, it runs a short sequence of
small MOSE edits (``--repeats`` steps, W ← R W after each) and measures, per step, the median seconds of:

* building MOSE's cross moment M = W (lam·C) Wᵀ + V (W K)ᵀ from scratch (O(d·p²)),
* propagating its key-space part instead, R (W C Wᵀ) Rᵀ (O(d³), what a sequential caller could do),
* the polar factor of M by ``svd``, ``eigh``, ``newton_schulz`` cold, and ``newton_schulz`` warm-started at
  the previous step's rotation (identity at the first step), with the Newton–Schulz iteration counts,
* ``memit_delta`` (direct solve, and with C's Cholesky factor computed once per run), ``alphaedit_delta``
  (float32, as AlphaEdit) and ``alphaedit_carried_delta`` (the carried inverse, grown by Woodbury after each
  step: the path the AlphaEdit method takes) for the same keys and residuals,

and the largest |R_method − R_svd| entry over the steps, and of the carried AlphaEdit update relative to the
float32 solve.

The synthetic problem: W Gaussian with rows scaled log-uniformly from 1 down to ``--output-spread``
(default 0.1: κ(M) ≈ 1e4 and ~29 Newton–Schulz iterations, close to SmolLM2's down_proj at lam = 10 with C
from wikitext, which gave κ(M) ≈ 2–3e4 and 29–30 iterations); C = H diag(s) H with one Householder
reflector H and s log-spaced in [1e-4, 1], so AlphaEdit's projector onto s < 2e-2 is known exactly and no
p×p eigen-decomposition is needed; keys Gaussian; targets V = W K + a residual half as large as W K.
Progress goes to the log (stderr); stdout is only the final markdown table.

Example: ``python benchmarks/update_rules.py --sizes 576 2048 --repeats 3``
"""
from __future__ import annotations

import argparse
import logging
import math
import statistics
import time

import torch

from mose_easyedit import rules

logger = logging.getLogger("benchmarks.update_rules")

NULL_SPACE_THRESHOLD = 2e-2
MEMIT_LAMBDA = 15000.0
ALPHAEDIT_L2 = 10.0


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[576, 2048, 4096], help="hidden sizes d")
    parser.add_argument("--n-keys", type=int, nargs="+", default=[1, 10], help="edits per batch n")
    parser.add_argument("--key-ratio", type=float, default=4, help="p = key_ratio · d (LLaMA: 3.5)")
    parser.add_argument("--repeats", type=int, default=3, help="sequential edit steps timed per (d, n)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lam", type=float, default=10.0, help="MOSE's lambda")
    parser.add_argument("--output-spread", type=float, default=0.1,
                        help="smallest/largest row scale of W (controls the condition number of M)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, function, *args, **kwargs):
    synchronize(device)
    start = time.perf_counter()
    result = function(*args, **kwargs)
    synchronize(device)
    return result, time.perf_counter() - start


def householder_spectral_pair(spectrum: torch.Tensor, mask: torch.Tensor, generator: torch.Generator):
    """C = H diag(spectrum) H and P = H diag(mask) H for one random reflector H = I − 2 u uᵀ, in O(p²)."""
    size = spectrum.numel()
    unit = torch.randn(size, generator=generator, dtype=torch.float64).to(spectrum.device)
    unit = unit / unit.norm()

    def reflect(diagonal: torch.Tensor) -> torch.Tensor:
        scaled = diagonal * unit
        matrix = torch.diag(diagonal)
        matrix -= 2.0 * (torch.outer(unit, scaled) + torch.outer(scaled, unit))
        matrix += 4.0 * float(unit @ scaled) * torch.outer(unit, unit)
        return matrix

    return reflect(spectrum), reflect(mask.to(torch.float64))


def benchmark_size(out_dim: int, n_keys: int, args, device: torch.device) -> dict:
    in_dim = int(round(args.key_ratio * out_dim))
    generator = torch.Generator().manual_seed(args.seed + out_dim)

    def gaussian(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(device)

    row_scale = torch.logspace(0.0, math.log10(args.output_spread), out_dim, dtype=torch.float64).to(device)
    W = row_scale[:, None] * gaussian(out_dim, in_dim) / math.sqrt(in_dim)
    spectrum = torch.logspace(-4.0, 0.0, in_dim, dtype=torch.float64).to(device)
    C, P = householder_spectral_pair(spectrum, spectrum < NULL_SPACE_THRESHOLD, generator)
    factor = rules.cholesky_factor(C)
    key_scale = math.sqrt(float(spectrum.sum()) / in_dim)
    prior_moment = torch.zeros(in_dim, in_dim, dtype=torch.float64, device=device)
    inverse = rules.alphaedit_inverse(prior_moment, P, ALPHAEDIT_L2)
    previous_rotation = torch.eye(out_dim, dtype=torch.float64, device=device)
    output_moment = None

    seconds: dict[str, list[float]] = {key: [] for key in (
        "build", "propagate", "svd", "eigh", "ns_cold", "ns_warm", "memit", "memit_factor", "alphaedit",
        "alphaedit_carried", "alphaedit_grow")}
    deviation = {"eigh": 0.0, "ns_cold": 0.0, "ns_warm": 0.0, "alphaedit_carried": 0.0}
    iterations = {"ns_cold": [], "ns_warm": []}
    conditions = []
    for step in range(args.repeats):
        K = key_scale * gaussian(in_dim, n_keys)
        outputs = W @ K
        V = outputs + 0.5 * outputs.norm(dim=0) / math.sqrt(out_dim) * gaussian(out_dim, n_keys)

        M, elapsed = timed(device, rules.procrustes_cross_moment, W, C, K, V, args.lam)
        seconds["build"].append(elapsed)
        if output_moment is not None:  # the key-space part after W ← R W, without touching C
            output_moment, elapsed = timed(device, lambda: previous_rotation @ output_moment
                                           @ previous_rotation.T)
            seconds["propagate"].append(elapsed)
            rebuilt = M - V @ outputs.T
            logger.debug("propagated vs rebuilt key-space part: relative deviation %.1e",
                         float((output_moment - rebuilt).norm() / rebuilt.norm()))
        else:
            output_moment = args.lam * (W @ C) @ W.T
        singular_values = torch.linalg.svdvals(M)
        conditions.append(float(singular_values[0] / singular_values[-1]))

        reference, elapsed = timed(device, rules.polar_factor, M, "svd")
        seconds["svd"].append(elapsed)
        rotation, elapsed = timed(device, rules.polar_factor, M, "eigh")
        seconds["eigh"].append(elapsed)
        deviation["eigh"] = max(deviation["eigh"], float((rotation - reference).abs().max()))
        for label, init in (("ns_cold", None), ("ns_warm", previous_rotation)):
            (rotation, count), elapsed = timed(device, rules.polar_factor_newton_schulz, M, init=init)
            seconds[label].append(elapsed)
            iterations[label].append(count)
            deviation[label] = max(deviation[label], float((rotation - reference).abs().max()))

        residual = V - outputs
        _, elapsed = timed(device, rules.memit_delta, residual, K, C, MEMIT_LAMBDA)
        seconds["memit"].append(elapsed)
        # C's Cholesky factor is computed once per run (not timed here), then each edit solves in O(p²n)
        _, elapsed = timed(device, rules.memit_delta, residual, K, C, MEMIT_LAMBDA, factor)
        seconds["memit_factor"].append(elapsed)
        solved, elapsed = timed(device, rules.alphaedit_delta, residual, K, P, prior_moment, ALPHAEDIT_L2)
        seconds["alphaedit"].append(elapsed)
        carried, elapsed = timed(device, rules.alphaedit_carried_delta, residual, K, P, inverse)
        seconds["alphaedit_carried"].append(elapsed)
        deviation["alphaedit_carried"] = max(deviation["alphaedit_carried"],
                                             float((carried - solved).norm() / solved.norm()))
        prior_moment = rules.alphaedit_grow_moment(prior_moment, K)
        inverse, elapsed = timed(device, rules.alphaedit_grow_inverse, inverse, K, P)
        seconds["alphaedit_grow"].append(elapsed)

        W = reference @ W
        previous_rotation = reference
        logger.info("d=%d n=%d step %d/%d: svd %.2fs, eigh %.2fs, NS %.2fs (%d it), memit %.2fs, "
                    "alphaedit %.2fs",
                    out_dim, n_keys, step + 1, args.repeats, seconds["svd"][-1], seconds["eigh"][-1],
                    seconds["ns_cold"][-1], iterations["ns_cold"][-1], seconds["memit"][-1],
                    seconds["alphaedit"][-1])
    return {
        "d": out_dim, "p": in_dim, "n": n_keys,
        "median": {key: (statistics.median(values) if values else float("nan"))
                   for key, values in seconds.items()},
        "iterations": {key: statistics.median(values) for key, values in iterations.items()},
        "deviation": deviation,
        "condition": statistics.median(conditions),
    }


def markdown_table(rows: list[dict]) -> str:
    header = ("| d | p | n | κ(M) | build M | propagate WCWᵀ | svd | eigh | NS cold (it) | NS warm (it) "
              "| memit | memit, cached factor | alphaedit | alphaedit, carried inverse (+ grow) "
              "| max dev eigh | max dev NS cold | max dev NS warm | rel. dev carried |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        med, its, dev = row["median"], row["iterations"], row["deviation"]
        lines.append(
            f"| {row['d']} | {row['p']} | {row['n']} | {row['condition']:.1e} | {med['build']:.3f} "
            f"| {med['propagate']:.3f} | {med['svd']:.3f} | {med['eigh']:.3f} "
            f"| {med['ns_cold']:.3f} ({its['ns_cold']:.0f}) | {med['ns_warm']:.3f} ({its['ns_warm']:.0f}) "
            f"| {med['memit']:.3f} | {med['memit_factor']:.4f} | {med['alphaedit']:.3f} "
            f"| {med['alphaedit_carried']:.4f} (+ {med['alphaedit_grow']:.4f}) "
            f"| {dev['eigh']:.1e} | {dev['ns_cold']:.1e} | {dev['ns_warm']:.1e} "
            f"| {dev['alphaedit_carried']:.1e} |"
        )
    return "\n".join(lines)


def main() -> None:
    args = parse_arguments()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.repeats < 2:
        raise SystemExit("--repeats must be >= 2 (step 1 has no rotation to propagate or warm-start from)")
    rows = []
    for out_dim in args.sizes:
        for n_keys in args.n_keys:
            rows.append(benchmark_size(out_dim, n_keys, args, device))
    print(f"Median seconds per step over {args.repeats} sequential edits; device {device}, "
          f"{args.threads} thread(s), lam {args.lam}, p = {args.key_ratio}·d.\n")
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
