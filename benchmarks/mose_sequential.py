"""MOSE single-sequential editing on the embedded model: seconds per edit and retention.

Edits the first ``--n`` CounterFact cases one after another, then reports, per configuration:
median / mean seconds per edit with the keys / targets / update split, the mean number of Adam steps of the
target optimisation per edit (what the targets cost, whatever the machine), how many targets are still reproduced
after the last edit (every target token the teacher-forced argmax), reliability / generalization / locality
(EasyEdit's convention, locality against the unedited model), and the largest relative
change of ‖W‖_F and κ₂ over the edited matrices. ``--protect both`` runs with and without protection of earlier
edits (``protect_edits``) so the default can be chosen from a measurement.

    python benchmarks/mose_sequential.py --n 10 --threads 1
    python benchmarks/mose_sequential.py --n 60 --protect both
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml
from _embedded import DEFAULT_DATA

logger = logging.getLogger("benchmarks.mose_sequential")


def run(model, tok, cases, hp) -> dict:
    import mose_easyedit as me
    from mose_easyedit.evaluation import cache_locality_reference, evaluate_requests, summarize, token_accuracy

    reference = cache_locality_reference(model, tok, cases, progress=False)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    me.reset_session(model)
    seconds = []
    try:
        for i, case in enumerate(cases):
            start = time.perf_counter()
            me.apply_mose_to_model(model, tok, [case], hp)
            seconds.append(time.perf_counter() - start)
            logger.info("edit %d/%d: %.2f s", i + 1, len(cases), seconds[-1])
        history = me.edit_history(model)
        accuracy = token_accuracy(model, tok, [c["prompt"] for c in cases], [c["target_new"] for c in cases],
                                  progress=False)
        metrics = summarize(evaluate_requests(model, tok, cases, reference, progress=False))
        drift_norm, drift_kappa = 0.0, 0.0
        for name, p in model.named_parameters():
            if not torch.equal(p, original[name]):
                w0, w1 = original[name].double(), p.detach().double()
                s0, s1 = torch.linalg.svdvals(w0), torch.linalg.svdvals(w1)
                drift_norm = max(drift_norm, abs(float(w1.norm() / w0.norm()) - 1))
                drift_kappa = max(drift_kappa, abs(float((s1[0] / s1[-1]) / (s0[0] / s0[-1])) - 1))
    finally:
        with torch.no_grad():
            for name, value in original.items():
                model.get_parameter(name).copy_(value)
        me.reset_session(model)
    stages = {k: statistics.median(h["seconds"][k] for h in history) for k in ("keys", "targets", "update")}
    return {
        "median_s": statistics.median(seconds), "mean_s": statistics.fmean(seconds), **stages,
        "steps": statistics.fmean(sum(h["target_steps"]) for h in history),
        "retained": sum(a == 1.0 for a in accuracy), "n": len(cases),
        "reliability": metrics["reliability"], "generalization": metrics.get("generalization", float("nan")),
        "locality": metrics.get("locality", float("nan")), "norm_drift": drift_norm, "kappa_drift": drift_kappa,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10, help="number of sequential edits")
    parser.add_argument("--start", type=int, default=0, help="first CounterFact case")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder holding counterfact/ and text_corpus/")
    parser.add_argument("--corpus", default=None, help="statistics corpus (default: the data folder's WikiText)")
    parser.add_argument("--mom2-n-samples", type=int, default=200)
    parser.add_argument("--hparams", default="smollm2-135m")
    parser.add_argument("--protect", choices=("on", "off", "both"), default="on")
    parser.add_argument("--lambda", dest="lam", type=float, nargs="*", default=None, help="λ values to sweep")
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=YAML",
                        help="hparams overrides, e.g. --set v_lr=1.0 'context_template_length_params=[[10, 2]]'")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)

    from mose_easyedit import MOSEHyperParams, load_default_model
    from mose_easyedit.data import load_counterfact

    cases = load_counterfact(args.data / "counterfact" / "counterfact-edit.json", limit=args.n, start=args.start)
    model, tok = load_default_model()
    base = MOSEHyperParams.from_hparams(args.hparams)
    overrides = {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected KEY=VALUE")
        overrides[key] = yaml.safe_load(value)
    corpus = args.corpus or str(args.data / "text_corpus" / "wikitext-2-raw.test.raw")
    rows = []
    for protect in ((True, False) if args.protect == "both" else (args.protect == "on",)):
        for lam in (args.lam or [base.mose_lambda]):
            hp = MOSEHyperParams.from_dict({**base.to_dict(), "mom2_dataset": corpus,
                                            "mom2_n_samples": args.mom2_n_samples, "protect_edits": protect,
                                            "mose_lambda": lam, **overrides})
            result = run(model, tok, cases, hp)
            rows.append((protect, lam, result))
    print(f"MOSE single-sequential, {args.n} CounterFact edits from case {args.start}, SmolLM2-135M, "
          f"{torch.get_num_threads()} thread(s), torch {torch.__version__}"
          + (f", overrides {overrides}" if overrides else ""))
    print("| protect | λ | retained after last edit | reliability | generalization | locality | median s/edit | "
          "keys s | targets s | target steps | update s | max ‖W‖ drift | max κ₂ drift |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for protect, lam, r in rows:
        print(f"| {'on' if protect else 'off'} | {lam:g} | {r['retained']}/{r['n']} | {r['reliability']:.3f} | "
              f"{r['generalization']:.3f} | {r['locality']:.3f} | "
              f"{r['median_s']:.2f} | {r['keys']:.2f} | {r['targets']:.2f} | {r['steps']:.1f} | {r['update']:.2f} | "
              f"{r['norm_drift']:.1e} | {r['kappa_drift']:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
