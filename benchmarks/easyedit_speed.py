"""EasyEdit's own MEMIT or AlphaEdit against ours, through the same BaseEditor, on the same cases: seconds per edit.

Needs an EasyEdit checkout (``EASYEDIT_PATH``) in an environment where ``import easyeditor`` works (the
transformers release its ``requirements.txt`` names; ``mose_easyedit.vision_stubs`` stands in for timm and
torchvision on a CPU). The embedded model is exported once as a folder BaseEditor loads; both sides read one
set of key statistics (ours, sampled from the model, written into EasyEdit's cache format), so neither samples a
corpus. Each side edits the same CounterFact cases (``counterfact-edit.json`` from case 0) through
``BaseEditor.edit(sequential_edit=True)`` (b = 1) or ``batch_edit`` (b > 1), one after the other in this
process; only the call of the method's apply function is timed (EasyEdit's own pre/post evaluation is not).

Settings: ours are the shipped ``hparams/<METHOD>/smollm2-135m.yaml``; EasyEdit's take every value its
hyperparameter class has from that file (layers, target optimisation, λ, null-space threshold and L2). What
EasyEdit cannot match is listed in the output's ``note``.

    EASYEDIT_PATH=/path/to/EasyEdit python benchmarks/easyedit_speed.py --method MEMIT --num-edits 20 --out x.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _embedded import DEFAULT_DATA  # noqa: E402

logger = logging.getLogger("benchmarks.easyedit_speed")

EASYEDIT_FIELDS = {  # our key -> EasyEdit's, for the values both classes have
    "MEMIT": ["layers", "fact_token", "v_num_grad_steps", "v_lr", "v_loss_layer", "v_weight_decay",
              "clamp_norm_factor", "kl_factor", "mom2_adjustment", "mom2_update_weight", "rewrite_module_tmp",
              "layer_module_tmp", "mlp_module_tmp", "attn_module_tmp", "ln_f_module", "lm_head_module",
              "mom2_n_samples", "mom2_dtype", "max_length"],
}
EASYEDIT_FIELDS["AlphaEdit"] = EASYEDIT_FIELDS["MEMIT"] + ["nullspace_threshold", "L2"]
NOTE = ("same layers, target optimisation settings, statistics and cases; ours stops the target optimisation "
        "once the target NLL < {stop} ({early}), EasyEdit once its whole loss (NLL + KL + weight decay) < 5e-2; "
        "ours caches the prompt prefix and starts each target step at the edited block; EasyEdit's context "
        "templates are its own")


def requests(count: int) -> list[dict]:
    from mose_easyedit.data import load_counterfact

    return load_counterfact(DEFAULT_DATA / "counterfact" / "counterfact-edit.json", limit=count)


def seed_statistics(hparams, model_dir: Path, stats_dir: Path) -> None:
    """Write our cached key statistics of the method's layers as EasyEdit's ``wikipedia`` cache files."""
    from mose_easyedit.easyedit_stats import easyedit_stats_path, write_easyedit_stats
    from mose_easyedit.modeling import load_default_model
    from mose_easyedit.stats import second_moments

    model, tok = load_default_model()
    moments = second_moments(model, tok, hparams.layers, hparams)
    count = hparams.mom2_n_samples * hparams.mom2_sample_length
    for layer, mean in moments.items():
        module = hparams.rewrite_module_tmp.format(layer)
        path = easyedit_stats_path(stats_dir, str(model_dir), module, dataset="wikipedia",
                                   dtype=hparams.mom2_dtype, sample_size=hparams.mom2_n_samples)
        write_easyedit_stats(path, mean.double() * count, count, hparams.mom2_n_samples)


def timed_edits(editor, cases: list[dict], batch: int) -> list[float]:
    """Seconds per fact of every call of ``editor.apply_algo`` while BaseEditor edits ``cases``."""
    seconds: list[float] = []
    apply = editor.apply_algo

    def timed(model, tok, requests, *args, **kwargs):
        start = time.perf_counter()
        result = apply(model, tok, requests, *args, **kwargs)
        seconds.append((time.perf_counter() - start) / len(requests))
        return result

    editor.apply_algo = timed
    inputs = dict(prompts=[c["prompt"] for c in cases], target_new=[c["target_new"] for c in cases],
                  ground_truth=[c["ground_truth"] for c in cases], subject=[c["subject"] for c in cases])
    if batch == 1:
        editor.edit(**inputs, sequential_edit=True, verbose=False)
    else:
        editor.hparams.batch_size = batch
        editor.batch_edit(**inputs, sequential_edit=True, verbose=False)
    return seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=sorted(EASYEDIT_FIELDS), required=True)
    parser.add_argument("--model", default="smollm2-135m", choices=["smollm2-135m"],
                        help="the embedded model (the only one this script exports)")
    parser.add_argument("--num-edits", type=int, default=20)
    parser.add_argument("--batch", type=int, default=1, help="facts per call (b)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the result")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    if not os.environ.get("EASYEDIT_PATH"):
        raise SystemExit("EASYEDIT_PATH must name an EasyEdit checkout")
    import mose_easyedit
    from mose_easyedit.export import export_default_model
    from mose_easyedit.modeling import cache_dir
    from mose_easyedit.vision_stubs import stub_vision_packages

    stub_vision_packages()
    from easyeditor import BaseEditor, AlphaEditHyperParams as TheirAlphaEdit, MEMITHyperParams as TheirMEMIT

    work = cache_dir() / "easyedit"
    model_dir = work / "smollm2-135m-llama"
    if not (model_dir / "config.json").exists():
        export_default_model(model_dir, overwrite=True)
    ours = getattr(mose_easyedit, f"{args.method}HyperParams").from_hparams(f"{args.method}/{args.model}")
    ours = dataclasses.replace(ours, model_name=str(model_dir), device="cpu")
    seed_statistics(ours, model_dir, work / "stats")
    values = {key: getattr(ours, key) for key in EASYEDIT_FIELDS[args.method]}
    values["v_loss_layer"] = values["v_loss_layer"] if values["v_loss_layer"] is not None else 29
    # SmolLM2 ties lm_head to the embeddings, so EasyEdit finds no "lm_head.weight" parameter; EasyEdit's own YAML
    # for the tied llama3.2 names the embedding instead
    values["lm_head_module"] = "model.embed_tokens"
    theirs_cls = TheirAlphaEdit if args.method == "AlphaEdit" else TheirMEMIT
    extra = {"P_loc": str(work / f"null_space_project-{args.method}.pt")} if args.method == "AlphaEdit" else {}
    theirs = theirs_cls(alg_name=args.method, model_name=str(model_dir), device="cpu", layer_selection="all",
                        stats_dir=str(work / "stats"), mom2_dataset="wikipedia", batch_size=args.batch,
                        model_parallel=False, **values, **extra)
    cases = requests(args.num_edits)
    os.chdir(work)  # EasyEdit writes logs/ into the working directory
    rows = {}
    for label, hparams in ((f"EasyEdit's {args.method}", theirs), (f"ours ({ours.alg_name})", ours)):
        logger.info("%s: %d edit(s), b = %d, through BaseEditor", label, len(cases), args.batch)
        seconds = timed_edits(BaseEditor.from_hparams(hparams), cases, args.batch)
        rows[label] = seconds
        logger.info("%s: median %.2f s per fact", label, statistics.median(seconds))
    (theirs_label, theirs_s), (ours_label, ours_s) = rows.items()
    result = {"label": theirs_label, "median_seconds": statistics.median(theirs_s),
              "wall_seconds": sum(theirs_s) * args.batch, "ours_label": ours_label,
              "ours_median_seconds": statistics.median(ours_s), "ours_wall_seconds": sum(ours_s) * args.batch,
              "edits": len(cases), "batch": args.batch, "seconds": theirs_s, "ours_seconds": ours_s,
              "note": NOTE.format(stop=ours.target_early_stop, early=ours.early_stop_on)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(json.dumps({k: v for k, v in result.items() if "seconds" not in k or "median" in k}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
