"""How far the keys a run protects have drifted: recorded when each fact was edited against recomputed now.

A MOSE run protects earlier facts through the keys it recorded when it edited them (the session's
``protected_keys``, one column per request and layer). When a later edit changes a layer below, the fact's key at
the layers above moves, and the protection then guards a key the model no longer produces. For each run folder
with a checkpoint (``python -m mose_easyedit.experiments`` keeps ``checkpoint.pt`` while a run is unfinished) this
restores the edited weights, recomputes every protected fact's key at every protected layer (the same template
families), and prints per layer and per window of edit order:

* ``drift``: ‖k_now − k_rec‖ / ‖k_rec‖, mean over the facts of the window;
* ``output``: ‖W (k_now − k_rec)‖ / ‖W k_rec‖ with the layer's current W: what the drift alone does to the layer's
  output for that fact, beside which the protection's own tolerance (how far a later solve may move W k_rec)
  can be read.

    python benchmarks/key_drift.py runs/long/runs/MOSE-input-procrustes-single runs/long/runs/MOSE-single
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from _embedded import DEFAULT_DATA

logger = logging.getLogger("benchmarks.key_drift")


def edited_cases(records: list[dict], modules: list[str]) -> dict[str, list[int]]:
    """Per module, the case ids of the requests that edited it, in the order their keys were recorded."""
    order: dict[str, list[int]] = {module: [] for module in modules}
    for record in records:
        for module in record.get("modules", []):
            if module in order:
                order[module].extend(record["case_ids"])
    return order


def current_keys(model, tok, hp, requests, modules: list[str]) -> dict[str, torch.Tensor]:
    """Template-mean keys ``{module: (p, n)}`` of ``requests`` at ``modules`` on the model as it is now."""
    from mose_easyedit.keys import context_templates, encode_rows, family_mean, trace_at_subject

    families = context_templates(model, tok, hp.context_template_length_params, hp.seed)
    rows, index = encode_rows(tok, requests, families)
    deepest = max(int(module.split(".")[2]) for module in modules)
    traced = trace_at_subject(model, tok, rows, modules, (), hp.layer_module_tmp.format(deepest), hp.chunk_size)
    return {module: family_mean(traced[("input", module)], index).double() for module in modules}


def drift_rows(run: Path, model, tok, originals: dict, by_case: dict, window: int) -> list[str]:
    from mose_easyedit.cache import model_cache
    from mose_easyedit.experiments.checkpoint import load_checkpoint
    from mose_easyedit.methods import METHODS
    from mose_easyedit.modeling import read_weight, write_weight
    from mose_easyedit.requests import validate_requests

    payload = load_checkpoint(run / "checkpoint.pt")
    sessions = payload["sessions"]
    if len(sessions) != 1:
        raise SystemExit(f"{run}: expected one editing session in the checkpoint, found {len(sessions)}")
    (method, session), = sessions.items()
    protected = getattr(session.state, "protected_keys", {})
    if not protected:
        raise SystemExit(f"{run}: the {method} session protects no keys")
    hp = METHODS[method].hparams_cls.from_hparams(run / "hparams.yaml")
    for name, value in originals.items():  # every run starts from the original weights
        write_weight(model, name, value)
    model_cache(model).update(payload["cache"])
    with torch.no_grad():
        for name, value in payload["weights"].items():
            model.get_parameter(name).copy_(value.to(model.get_parameter(name).dtype))
    modules = sorted(protected, key=lambda m: int(m.split(".")[2]))
    order = edited_cases(payload["state"]["records"], modules)
    edits = payload["state"]["edits_done"]
    columns = [f"edits {a + 1}–{min(a + window, edits)}: drift / output" for a in range(0, edits, window)]
    lines = [f"\n{run.name}: {method}, {edits} edits (checkpoint)\n",
             "| layer | facts | " + " | ".join(columns) + " |", "|" + "---|" * (2 + len(columns))]
    for module in modules:
        recorded = protected[module].double()
        cases = order[module]
        if len(cases) != recorded.shape[1]:
            raise SystemExit(f"{run}: {module} protects {recorded.shape[1]} keys but the records list "
                             f"{len(cases)} edits of it")
        now = current_keys(model, tok, hp, validate_requests([by_case[c] for c in cases]), [module])[module]
        W = read_weight(model, module).double().cpu()
        cells = windowed_drift(recorded, now, W, edit_numbers(payload["state"]["records"], module), edits, window)
        lines.append(f"| {module.split('.')[2]} | {len(cases)} | " + " | ".join(cells) + " |")
    return lines


def windowed_drift(recorded: torch.Tensor, now: torch.Tensor, W: torch.Tensor, edit_of: list[int], edits: int,
                   window: int) -> list[str]:
    """Per window of edit order, ``"drift / output"``: the mean of ‖k_now − k_rec‖ / ‖k_rec‖ and of
    ‖W (k_now − k_rec)‖ / ‖W k_rec‖ over the keys recorded in that window (columns of ``recorded``/``now``)."""
    drift = (now - recorded).norm(dim=0) / recorded.norm(dim=0)
    output = (W @ (now - recorded)).norm(dim=0) / (W @ recorded).norm(dim=0)
    cells = []
    for start in range(0, edits, window):
        chosen = [i for i, n in enumerate(edit_of) if start < n <= start + window]
        cells.append(f"{drift[chosen].mean():.3f} / {output[chosen].mean():.3f}" if chosen else "–")
    return cells


def edit_numbers(records: list[dict], module: str) -> list[int]:
    """The edit count at which each protected key of ``module`` was recorded (its request's position)."""
    numbers = []
    for record in records:
        if module in record.get("modules", []):
            first = record["edits"] - len(record["case_ids"])
            numbers.extend(first + 1 + i for i in range(len(record["case_ids"])))
    return numbers


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="run folders with a checkpoint.pt")
    parser.add_argument("--window", type=int, default=100, help="edits per column")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    from mose_easyedit.data import load_counterfact
    from mose_easyedit.modeling import load_default_model, read_weight

    missing = [str(run) for run in args.runs if not (run / "checkpoint.pt").is_file()]
    if missing:
        raise SystemExit(f"no checkpoint.pt in {', '.join(missing)} (a finished run keeps none)")
    model, tok = load_default_model()
    cases = load_counterfact(args.data_dir / "counterfact" / "counterfact-edit.json")
    by_case = {case["case_id"]: case for case in cases}
    originals = {f"model.layers.{layer}.mlp.down_proj": read_weight(model, f"model.layers.{layer}.mlp.down_proj")
                 .detach().clone() for layer in range(len(model.model.layers))}
    for run in args.runs:
        for line in drift_rows(run, model, tok, originals, by_case, args.window):
            print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
