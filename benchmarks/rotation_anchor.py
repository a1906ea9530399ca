"""How far the paper-side rotation turns, and what an anchor to the identity would trade for it (a probe).

Edits the first ``--n`` CounterFact cases sequentially with the output side (``hparams/MOSE/smollm2-135m.yaml``
unless ``--hparams``) and, at every layer of every edit, takes the cross moment the rule solves,
M = G + V (W K)ᵀ with G = W (λC + γ K_p K_pᵀ) Wᵀ. For each anchor μ of ``--anchors`` it prints the rotation
R_μ = polar(M + μ · (tr G / d) · I), the closed-form solution when μ·(tr G/d)·‖R − I‖_F² is added to the
objective (μ = 0 is the paper's rule), averaged over layers and edits:

* ‖R_μ − I‖_F, how far the layer's output space turns;
* the fit error ‖R_μ W K − V‖ / ‖V − W K‖, the share of the request left undelivered;
* the generic change tr((R_μ − I) W C Wᵀ (R_μ − I)ᵀ) / tr(W C Wᵀ), how far generic keys' outputs move.

The edits themselves are made with μ = 0 (the YAML's rule), so every row sees the same sequence of operands.

    python benchmarks/rotation_anchor.py --n 10
"""
from __future__ import annotations

import argparse

import torch
from _embedded import add_arguments, load


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, 10, "CounterFact cases edited in sequence", "MOSE", "an output-side method")
    parser.add_argument("--anchors", type=float, nargs="+", default=[0.0, 0.1, 0.3, 1.0, 3.0, 10.0])
    args = parser.parse_args(argv)
    setup = load(args)
    import mose_easyedit.methods.mose as output_side
    from mose_easyedit.rules import polar_factor

    operands = []
    solve = output_side.procrustes_rotation

    def recording(W, C, K, V, lam, **kwargs):
        operands.append((W.double(), C.double().to(W.device), K.double(), V.double(),
                         kwargs["preservation"].double()))
        return solve(W, C, K, V, lam, **kwargs)

    output_side.procrustes_rotation = recording
    try:
        for case in setup.cases:
            setup.spec.apply(setup.model, setup.tok, [case], setup.hp)
    finally:
        output_side.procrustes_rotation = solve
    totals = {mu: [0.0, 0.0, 0.0] for mu in args.anchors}
    for W, C, K, V, G in operands:
        eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
        outputs, generic = W @ K, W @ C @ W.T
        for mu in args.anchors:
            R = polar_factor(G + mu * float(torch.trace(G)) / G.shape[0] * eye + V @ outputs.T, method="svd")
            totals[mu][0] += float((R - eye).norm())
            totals[mu][1] += float((R @ outputs - V).norm() / (V - outputs).norm())
            totals[mu][2] += float(torch.trace((R - eye) @ generic @ (R - eye).T) / torch.trace(generic))
    count = len(operands)
    print(f"{len(setup.cases)} edits, {count} layer solves, {args.method} ({args.hparams or 'shipped YAML'})")
    print("| anchor μ | ‖R − I‖_F | fit error | generic change |")
    print("|---|---|---|---|")
    for mu, (distance, fit, moved) in totals.items():
        print(f"| {mu:g} | {distance / count:.3f} | {fit / count:.3f} | {moved / count:.2e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
