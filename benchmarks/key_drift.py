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

    python benchmarks/key_drift.py runs/long/runs/MOSE-input-procrustes-single runs/long/runs/MOSE-input-t5e-2-single
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from _embedded import DEFAULT_DATA

logger = logging.getLogger("benchmarks.key_drift")


def recorded_order(records: list[dict], module: str) -> list[tuple[int, int]]:
    """``(case id, edit number)`` of each request that edited ``module``, in the order its key was recorded (the
    edit number is the request's position in the run: a call of b requests after n edits holds n+1 … n+b)."""
    order = []
    for record in records:
        if module in record.get("modules", []):
            first = record["edits"] - len(record["case_ids"])
            order.extend((case, first + 1 + i) for i, case in enumerate(record["case_ids"]))
    return order


def drift_rows(run: Path, model, tok, originals: dict, by_case: dict, window: int) -> list[str]:
    """The markdown table of one run: its checkpoint restored into ``model`` (whose original weights ``originals``
    keeps, filled as parameters are first written), the protected keys recomputed layer by layer."""
    from mose_easyedit.editor import EditContext
    from mose_easyedit.experiments.checkpoint import load_checkpoint, restore_checkpoint
    from mose_easyedit.methods import METHODS
    from mose_easyedit.modeling import num_layers, read_weight
    from mose_easyedit.requests import validate_requests
    from mose_easyedit.session import EditSession

    payload = load_checkpoint(run / "checkpoint.pt")
    sessions = payload["sessions"]
    if len(sessions) != 1:
        raise SystemExit(f"{run}: expected one editing session in the checkpoint, found {len(sessions)}")
    (method, session), = sessions.items()
    protected = getattr(session.state, "protected_keys", {})
    if not protected:
        raise SystemExit(f"{run}: the {method} session protects no keys")
    hp = METHODS[method].hparams_cls.from_hparams(run / "hparams.yaml")
    with torch.no_grad():  # every run starts from the original weights
        for name, value in originals.items():
            model.get_parameter(name).copy_(value)
        for name in payload["weights"]:
            originals.setdefault(name, model.get_parameter(name).detach().clone())
    restore_checkpoint(model, payload)
    layer_of = {hp.rewrite_module_tmp.format(layer): layer for layer in range(num_layers(model))}
    edits = payload["state"]["edits_done"]
    columns = [f"edits {a + 1}–{min(a + window, edits)}: drift / output" for a in range(0, edits, window)]
    lines = [f"\n{run.name}: {method}, {edits} edits (checkpoint)\n",
             "| layer | facts | " + " | ".join(columns) + " |", "|" + "---|" * (2 + len(columns))]
    for module in sorted(protected, key=layer_of.__getitem__):
        recorded = protected[module].double()
        order = recorded_order(payload["state"]["records"], module)
        if len(order) != recorded.shape[1]:
            raise SystemExit(f"{run}: {module} protects {recorded.shape[1]} keys but the records list "
                             f"{len(order)} edits of it")
        layer = layer_of[module]
        logger.info("%s: layer %d, recomputing the keys of %d fact(s)", run.name, layer, len(order))
        requests = validate_requests([by_case[case] for case, _ in order])
        now = EditContext(model, tok, hp, EditSession(method), requests).keys([layer])[0][layer].cpu()
        W = read_weight(model, module).double().cpu()
        cells = windowed_drift(recorded, now, W, [number for _, number in order], edits, window)
        lines.append(f"| {layer} | {len(order)} | " + " | ".join(cells) + " |")
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
    from mose_easyedit.modeling import load_default_model

    missing = [str(run) for run in args.runs if not (run / "checkpoint.pt").is_file()]
    if missing:
        raise SystemExit(f"no checkpoint.pt in {', '.join(missing)} (a finished run keeps none)")
    model, tok = load_default_model()
    cases = load_counterfact(args.data_dir / "counterfact" / "counterfact-edit.json")
    by_case = {case["case_id"]: case for case in cases}
    originals: dict = {}
    for run in args.runs:
        for line in drift_rows(run, model, tok, originals, by_case, args.window):
            print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
