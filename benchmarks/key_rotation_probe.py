"""What the key-space Procrustes rotation turns besides the edit key, and what an anchor to the identity or a
heavier weight on earlier keys would trade for it (a probe of ``MOSE-input-procrustes``).

Edits the first ``--n`` CounterFact cases sequentially with ``hparams/MOSE-input-procrustes/smollm2-135m.yaml``
(unless ``--hparams``) and, at every layer of every edit, re-solves the rule's problem with the weight λ on generic
keys, the anchor μ and the weight γ on earlier keys of ``--lambdas`` × ``--anchors`` × ``--gammas``:
Q = polar(λC + γ K_p K_pᵀ + K* Kᵀ + μ·(tr C / p)·I), the closed form when μ·(tr C/p)·‖Q − I‖_F² is added to the
objective (μ = 0 and the YAML's λ and γ are the rule). Averaged
over layers and edits it prints:

* ‖Q − I‖_F, how far the layer's key space turns;
* the fit error ‖W Q K − V‖ / ‖V − W K‖, the share of the request left undelivered;
* the generic change tr((Q − I) C (Q − I)ᵀ) / tr C, how far generic keys move;
* the earlier-key change ‖W (Q − I) K_p‖ / ‖W K_p‖ over the keys of the earlier edits of the layer (how far their
  outputs move: what erodes earlier facts).

The edits themselves are made with the YAML's rule, so every row sees the same sequence of operands.

    python benchmarks/key_rotation_probe.py --n 5
"""
from __future__ import annotations

import argparse

import torch
from _embedded import add_arguments, load


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, 5, "CounterFact cases edited in sequence", "MOSE-input-procrustes",
                  "a method with the key-space Procrustes rule")
    parser.add_argument("--anchors", type=float, nargs="+", default=[0.0, 0.01, 0.1, 1.0])
    parser.add_argument("--gammas", type=float, nargs="+", default=None, help="weights on earlier keys "
                        "(default: the YAML's protect_weight)")
    parser.add_argument("--lambdas", type=float, nargs="+", default=None, help="weights on generic keys "
                        "(default: the YAML's mose_lambda)")
    args = parser.parse_args(argv)
    setup = load(args)
    from mose_easyedit.methods.mose_input_procrustes import target_keys
    from mose_easyedit.rules import polar_factor

    engine = setup.spec.engine
    rule = engine.rule
    operands = []

    def recording(batch, ops, state, hp):
        operands.append((batch.W, batch.K, batch.residual, ops.C.double().to(batch.W.device),
                         state.earlier_keys(batch.module, batch.K)))
        return rule(batch, ops, state, hp)

    engine.rule = staticmethod(recording)
    try:
        for case in setup.cases:
            setup.spec.apply(setup.model, setup.tok, [case], setup.hp)
    finally:
        engine.rule = staticmethod(rule)
    hp = setup.hp
    gammas = args.gammas if args.gammas is not None else [hp.protect_weight]
    lambdas = args.lambdas if args.lambdas is not None else [hp.mose_lambda]
    grid = [(lam, mu, gamma) for lam in lambdas for gamma in gammas for mu in args.anchors]
    totals = {key: [0.0, 0.0, 0.0, 0.0, 0] for key in grid}
    for W, K, residual, C, earlier in operands:
        p = C.shape[0]
        eye = torch.eye(p, dtype=C.dtype, device=C.device)
        K_star, _ = target_keys(W, K, residual, C, hp.key_ridge)
        scale = float(torch.trace(C)) / p
        for lam, mu, gamma in grid:
            M = lam * C + K_star @ K.T + mu * scale * eye
            if earlier.shape[1]:
                M = M + gamma * earlier @ earlier.T
            Q = polar_factor(M, "svd")
            turn = Q - eye
            row = totals[(lam, mu, gamma)]
            row[0] += float(turn.norm())
            row[1] += float((W @ turn @ K - residual).norm() / residual.norm())
            row[2] += float(torch.trace(turn @ C @ turn.T) / torch.trace(C))
            if earlier.shape[1]:
                row[3] += float((W @ turn @ earlier).norm() / (W @ earlier).norm())
                row[4] += 1
    count = len(operands)
    print(f"{len(setup.cases)} edits, {count} layer solves, {args.method} ({args.hparams or 'shipped YAML'})")
    print("| λ | anchor μ | γ | ‖Q − I‖_F | fit error | generic change | earlier-key change |")
    print("|---|---|---|---|---|---|---|")
    for (lam, mu, gamma), (distance, fit, moved, earlier_moved, with_earlier) in totals.items():
        earlier_text = f"{earlier_moved / with_earlier:.3f}" if with_earlier else "–"
        print(f"| {lam:g} | {mu:g} | {gamma:g} | {distance / count:.3f} | {fit / count:.3f} | {moved / count:.2e} | "
              f"{earlier_text} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
