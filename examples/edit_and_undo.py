"""Edit two facts in the embedded model with MOSE, inspect the diagnostics, then undo one edit exactly.

    python examples/edit_and_undo.py [--corpus PATH]
"""
import argparse
import logging

import mose_easyedit as me

parser = argparse.ArgumentParser()
parser.add_argument("--corpus", default=None, help="text file for key statistics (default: sampled from the model)")
args = parser.parse_args()
logging.basicConfig(level=logging.INFO)

model, tok = me.load_default_model()
hparams = me.MOSEHyperParams.from_hparams("smollm2-135m")
if args.corpus:
    hparams.mom2_dataset = args.corpus

requests = [
    {"prompt": "The Eiffel Tower is located in the city of", "subject": "Eiffel Tower", "target_new": "Rome"},
    {"prompt": "Barack Obama was born in the state of", "subject": "Barack Obama", "target_new": "Texas"},
]
original = {n: p.detach().clone() for n, p in model.named_parameters()}
for request in requests:  # sequential editing: one call per fact
    me.apply_mose_to_model(model, tok, [request], hparams)

for entry in me.edit_history(model):
    print("layers", entry["layers"], "seconds", round(entry["seconds"]["total"], 2))
    for layer, d in sorted(entry["per_layer"].items()):
        print(f"  layer {layer}: rho={d['rho']:.2f} fit_error={d['fit_error']:.2f} "
              f"|R-I|={d['rotation_distance']:.3f} |RtR-I|={d['orthogonality_error']:.1e}")

me.undo_mose_edits(model, 2)
worst = max(float((p.detach() - original[n]).norm() / original[n].norm().clamp(min=1e-12))
            for n, p in model.named_parameters())
print(f"after undoing both edits, largest relative change of any parameter: {worst:.1e}")
