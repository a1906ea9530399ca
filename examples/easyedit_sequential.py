"""MOSE through EasyEdit's BaseEditor (needs an EasyEdit git checkout on PYTHONPATH or in EASYEDIT_PATH).

    EASYEDIT_PATH=/path/to/EasyEdit python examples/easyedit_sequential.py --model /path/to/Meta-Llama-3-8B \
        --hparams hparams/MOSE/llama3-8b

EasyEdit evaluates each request right after its own edit; for retention after the last edit (the paper's
tables) use ``python -m mose_easyedit.experiments``.
"""
import argparse
import json
import logging

import mose_easyedit
from mose_easyedit import MOSEHyperParams

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True, help="model path or Hugging Face name (must contain a family name)")
parser.add_argument("--hparams", default="hparams/MOSE/llama3-8b")
parser.add_argument("--data", default="../shared/data/counterfact/counterfact-edit.json")
parser.add_argument("--n", type=int, default=10)
args = parser.parse_args()
logging.basicConfig(level=logging.INFO)

mose_easyedit.register()  # adds MOSE (and the baselines) to EasyEdit's ALG_DICT and batch whitelist
from easyeditor import BaseEditor  # noqa: E402  (import after registration is fine either way)

hparams = MOSEHyperParams.from_hparams(args.hparams)
hparams.model_name = args.model
with open(args.data) as handle:
    cases = json.load(handle)[:args.n]
editor = BaseEditor.from_hparams(hparams)
metrics, edited_model, _ = editor.edit(
    prompts=[c["prompt"] for c in cases], target_new=[c["target_new"] for c in cases],
    ground_truth=[c["ground_truth"] for c in cases], subject=[c["subject"] for c in cases],
    rephrase_prompts=[c["rephrase_prompt"] for c in cases], sequential_edit=True)
print(json.dumps(metrics[-1], indent=1, default=str))
