"""Edit a few facts in the embedded SmolLM2-135M with MOSE and show what changed.

    python -m mose_easyedit.demo [--corpus PATH] [--threads N]

Prints, for each fact, the greedy completion before and after editing; per edit the layers MOSE chose, ρ, the
fit error and the seconds it took; and ‖W‖_F and κ₂ of every edited matrix before and after (equal, since
every edit is a rotation). Runs offline: the first run samples a small statistics corpus from the model itself
and caches it (a couple of minutes on a laptop CPU); later runs start in seconds.
"""
from __future__ import annotations

import argparse
import sys

import torch

from .logs import setup_logging

FACTS = [
    {"prompt": "The Eiffel Tower is located in the city of", "subject": "Eiffel Tower", "target_new": "Rome"},
    {"prompt": "Barack Obama was born in the state of", "subject": "Barack Obama", "target_new": "Texas"},
    {"prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux", "target_new": "English"},
    {"prompt": "The Great Wall is located in", "subject": "Great Wall", "target_new": "Mexico"},
]


def complete(model, tok, prompt: str, new_tokens: int = 6) -> str:
    ids = tok(prompt, return_tensors="pt").to(model.get_input_embeddings().weight.device)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).replace("\n", " ").strip()


def spectrum(weight: torch.Tensor) -> tuple[float, float]:
    s = torch.linalg.svdvals(weight.detach().double())
    return float(weight.detach().double().norm()), float(s[0] / s[-1])


def _first(value):
    """A per-layer diagnostic: a number (output side) or one number per request of the call (input side)."""
    return value[0] if isinstance(value, list) else value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Edit facts in the embedded model with MOSE")
    parser.add_argument("--corpus", default=None,
                        help="text file for key statistics (default: text sampled from the model, cached)")
    parser.add_argument("--hparams", default="smollm2-135m", help="MOSE hyperparameter file or name")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    setup_logging()
    if args.threads:
        torch.set_num_threads(args.threads)

    from . import MOSEHyperParams, apply_mose_to_model, edit_history, load_default_model

    model, tok = load_default_model()
    hparams = MOSEHyperParams.from_hparams(args.hparams)
    if args.corpus:
        hparams.mom2_dataset = args.corpus
    before = {fact["prompt"]: complete(model, tok, fact["prompt"]) for fact in FACTS}
    originals = {name: p.detach().clone() for name, p in model.named_parameters() if "mlp.down_proj" in name}

    for fact in FACTS:
        apply_mose_to_model(model, tok, [fact], hparams)

    print("\nMOSE on SmolLM2-135M-Instruct: greedy completions before -> after")
    for fact in FACTS:
        print(f"  {fact['prompt']!r}  [{fact['target_new']}]")
        print(f"      before: {before[fact['prompt']]}")
        print(f"      after:  {complete(model, tok, fact['prompt'])}")
    print("\nPer edit: layers edited, ρ = ‖v − Wk‖/‖Wk‖ and fit error at each layer, seconds")
    for fact, entry in zip(FACTS, edit_history(model)):
        detail = ", ".join(f"L{layer}: ρ={_first(d['rho']):.2f} fit={_first(d['fit_error']):.2f}"
                           for layer, d in sorted(entry["per_layer"].items()))
        print(f"  {fact['subject']:<18} layers {entry['layers']}  {detail}  {entry['seconds']['total']:.1f} s")
    print("\nEdited matrices: Frobenius norm and condition number before -> after")
    for name, original in originals.items():
        current = model.get_parameter(name)
        if torch.equal(current, original):
            continue
        (n0, k0), (n1, k1) = spectrum(original), spectrum(current)
        print(f"  {name:<36} ‖W‖_F {n0:.6f} -> {n1:.6f}   κ₂ {k0:.6f} -> {k1:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
