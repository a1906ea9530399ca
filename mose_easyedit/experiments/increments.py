"""Does stacking edits move unrelated representations? The paper's Figure 5 (§6.5), for every method.

A run with ``record_increments=true`` keeps each edit call's increment ΔW_i = W_i − W_{i−1} of every module it
wrote, compactly, as low-rank factors ΔW_i ≈ A Bᵀ (``increments/step-NNNNNN.pt``): exact for an additive call
(rank ≤ its batch size) and for an input-side plane (rank two per request); an output-side rotation's increment
(R − I) W is truncated where the singular values' tail holds less than ``tolerance`` of ‖ΔW_i‖_F, and an increment
that is neither (RECT's sparse ΔW) at ``max_rank`` (the file and ``figure5.json`` say how much was dropped). Then

    python -m mose_easyedit.experiments.increments RUN_DIR [--out DIR] [--permutations 1000]

rebuilds, for each edited fact i, the final-layer representation of its relation tokens (the prompt's tokens after
the subject, averaged; the last token when the subject ends the prompt) under (i) the unedited model plus ΔW_i
alone and (ii) the unedited model plus Σ_j ΔW_j (every edit of the run), and reports numbers that do not depend
on a projection: the mean cosine distance between the two conditions' representations of the same fact, the
energy distance between the two clouds and its permutation p-value (the two labels shuffled within each fact's
pair). ``figure5.png`` shows both clouds by t-SNE (scikit-learn) with their marginal densities on top and right.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

import torch

logger = logging.getLogger(__name__)

FOLDER = "increments"


# ------------------------------------------------------------------------------------------------ recording
def factorize(delta: torch.Tensor, tolerance: float = 1e-3, max_rank: int = 256) -> dict:
    """``{"A": (d, r), "B": (p, r), "dropped": ‖ΔW − A Bᵀ‖_F / ‖ΔW‖_F}`` in float32 from a float64 SVD: the
    smallest rank whose dropped tail is below ``tolerance`` (at most ``max_rank``)."""
    delta = delta.detach().to("cpu", torch.float64)
    total = float(torch.linalg.norm(delta))
    if total == 0.0:
        return {"A": torch.zeros(delta.shape[0], 0), "B": torch.zeros(delta.shape[1], 0), "dropped": 0.0}
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    tail = torch.sqrt(torch.flip(torch.cumsum(torch.flip(S ** 2, [0]), 0), [0]))  # tail[r] = ‖S[r:]‖
    within = (tail / total < tolerance).nonzero()
    rank = min(int(within[0]) if len(within) else len(S), max_rank)
    dropped = float(tail[rank] / total) if rank < len(S) else 0.0
    return {"A": (U[:, :rank] * S[:rank]).float(), "B": Vh[:rank].T.float(), "dropped": dropped}


def record_step(run_dir: Path, step: int, deltas: dict[str, torch.Tensor], tolerance: float = 1e-3) -> dict:
    """Write one step's increments (``{module: ΔW (out, in)}``); returns ``{module: (rank, dropped)}``."""
    folder = Path(run_dir) / FOLDER
    folder.mkdir(exist_ok=True)
    factors = {module: factorize(delta, tolerance) for module, delta in deltas.items()}
    partial = folder / f".step-{step:06d}.pt"
    torch.save(factors, partial)
    partial.replace(folder / f"step-{step:06d}.pt")
    return {module: (f["A"].shape[1], f["dropped"]) for module, f in factors.items()}


def load_increments(run_dir: Path) -> list[dict[str, dict]]:
    """Every recorded step's ``{module: {"A", "B", "dropped"}}``, in step order."""
    paths = sorted((Path(run_dir) / FOLDER).glob("step-*.pt"))
    if not paths:
        raise ValueError(f"{run_dir}: no recorded increments (run it with record_increments=true)")
    return [torch.load(path, map_location="cpu", weights_only=True) for path in paths]


# ------------------------------------------------------------------------------------------------- analysis
def relation_positions(tok, prompt: str, subject: str) -> tuple[list[int], list[int]]:
    """``(ids, positions)``: the prompt's tokens and the positions of its relation tokens (after the subject)."""
    from ..tokens import encode_prompt

    encoded = encode_prompt(tok, prompt, subject)
    after = list(range(encoded.subject_last + 1, len(encoded.ids)))
    return list(encoded.ids), after or [len(encoded.ids) - 1]


def representations(model, tok, facts: Sequence[tuple[str, str]]) -> torch.Tensor:
    """(n, d) final-layer hidden states of each fact's relation tokens, averaged over those tokens."""
    from ..modeling import input_device

    rows = []
    with torch.no_grad():
        for prompt, subject in facts:
            ids, positions = relation_positions(tok, prompt, subject)
            output = model(input_ids=torch.tensor([ids], device=input_device(model)), output_hidden_states=True,
                           use_cache=False)
            rows.append(output.hidden_states[-1][0, positions].double().mean(dim=0).cpu())
    return torch.stack(rows)


def _with_increment(model, originals: dict[str, torch.Tensor], increment: dict[str, torch.Tensor]):
    from ..modeling import write_weight

    for module, base in originals.items():
        write_weight(model, module, base.double() + increment[module] if module in increment else base)


def two_conditions(model, tok, facts: Sequence[tuple[str, str]], steps: Sequence[dict[str, dict]],
                   fact_steps: Sequence[int], progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Representations of ``facts`` under (i) W₀ + ΔW of the step that edited each fact and (ii) W₀ + every ΔW.
    ``model`` holds W₀ and holds it again afterwards."""
    from tqdm.auto import tqdm

    from ..modeling import read_weight, write_weight

    modules = sorted({m for step in steps for m in step})
    originals = {m: read_weight(model, m).clone() for m in modules}

    def dense(step: dict[str, dict]) -> dict[str, torch.Tensor]:
        return {m: f["A"].double() @ f["B"].double().T for m, f in step.items()}

    try:
        single, current = [], None
        for fact, index in tqdm(list(zip(facts, fact_steps)), desc="single-update representations",
                                disable=not progress, leave=False):
            if index != current:  # the facts of one batch step share its increment
                _with_increment(model, originals, dense(steps[index]))
                current = index
            single.append(representations(model, tok, [fact]))
        total: dict[str, torch.Tensor] = {}
        for step in steps:
            for module, delta in dense(step).items():
                total[module] = total[module] + delta if module in total else delta
        _with_increment(model, originals, total)
        accumulated = representations(model, tok, facts)
    finally:
        for module, base in originals.items():
            write_weight(model, module, base)
    return torch.cat(single), accumulated


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """2 E‖x − y‖ − E‖x − x'‖ − E‖y − y'‖ (Székely's energy distance; 0 when the two samples coincide)."""
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())


def compare_conditions(single: torch.Tensor, accumulated: torch.Tensor, permutations: int = 1000,
                       seed: int = 0) -> dict:
    """Projection-free comparison of the paired conditions: ``mean_cosine_distance`` (1 − cos of each fact's
    pair, averaged), ``energy_distance`` of the two clouds and its permutation ``p_value`` (each fact's two
    labels swapped at random; the fraction of permutations at least as distant, counting the observed one)."""
    x, y = single.double(), accumulated.double()
    cosine = torch.nn.functional.cosine_similarity(x, y, dim=1)
    observed = energy_distance(x, y)
    generator = torch.Generator().manual_seed(seed)
    at_least = 1
    for _ in range(permutations):
        swap = torch.rand(len(x), generator=generator) < 0.5
        a = torch.where(swap[:, None], y, x)
        b = torch.where(swap[:, None], x, y)
        at_least += energy_distance(a, b) >= observed
    return {"facts": len(x), "mean_cosine_distance": float((1 - cosine).mean()),
            "median_cosine_distance": float((1 - cosine).median()), "energy_distance": observed,
            "p_value": at_least / (permutations + 1), "permutations": permutations}


def plot_figure5(single: torch.Tensor, accumulated: torch.Tensor, path: Path, title: str, seed: int = 0) -> None:
    """t-SNE of both clouds together, with each condition's marginal density along each axis."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from sklearn.manifold import TSNE

    points = torch.cat([single, accumulated]).numpy()
    perplexity = max(2.0, min(30.0, (len(points) - 1) / 3))
    embedded = TSNE(n_components=2, perplexity=perplexity, random_state=seed, init="pca").fit_transform(points)
    n = len(single)
    figure = plt.figure(figsize=(6, 6))
    grid = figure.add_gridspec(2, 2, width_ratios=(4, 1), height_ratios=(1, 4), hspace=0.05, wspace=0.05)
    main = figure.add_subplot(grid[1, 0])
    top = figure.add_subplot(grid[0, 0], sharex=main)
    right = figure.add_subplot(grid[1, 1], sharey=main)
    for part, label, marker in ((embedded[:n], "single update ΔW_i", "o"), (embedded[n:], "all updates Σ ΔW", "^")):
        main.scatter(part[:, 0], part[:, 1], s=14, marker=marker, alpha=0.6, label=label)
        for axis, values, vertical in ((top, part[:, 0], False), (right, part[:, 1], True)):
            grid_values = np.linspace(embedded[:, int(vertical)].min(), embedded[:, int(vertical)].max(), 200)
            width = 1.06 * values.std() * len(values) ** -0.2 + 1e-9  # Silverman's rule
            density = np.exp(-0.5 * ((grid_values[:, None] - values[None]) / width) ** 2).sum(1)
            density /= density.sum() * (grid_values[1] - grid_values[0])
            if vertical:
                axis.plot(density, grid_values)
            else:
                axis.plot(grid_values, density)
    top.set_axis_off()
    right.set_axis_off()
    main.legend(fontsize=8)
    main.set_xlabel("t-SNE 1")
    main.set_ylabel("t-SNE 2")
    top.set_title(title, fontsize=9)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)


def analyse(run_dir: Path, out: Path | None = None, permutations: int = 1000, plot: bool = True) -> dict:
    """The Figure 5 analysis of a finished run with recorded increments; writes ``figure5.json`` (and
    ``figure5.png``) into ``out`` (default: the run directory) and returns the numbers."""
    from omegaconf import OmegaConf

    from .setup import load_model, load_requests

    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir
    cfg = OmegaConf.load(run_dir / "config.yaml")
    steps = load_increments(run_dir)
    requests = load_requests(cfg)[:len(steps) * int(cfg.batch_size)]
    facts = [(r["prompt"], r["subject"]) for r in requests]
    fact_steps = [i // int(cfg.batch_size) for i in range(len(requests))]
    model, tok = load_model(cfg.model)
    single, accumulated = two_conditions(model, tok, facts, steps, fact_steps)
    numbers = compare_conditions(single, accumulated, permutations)
    dropped = max((f["dropped"] for step in steps for f in step.values()), default=0.0)
    label = cfg.get("label") or cfg.method.name
    numbers.update({"run": str(run_dir), "label": label, "steps": len(steps), "max_dropped": dropped})
    out.mkdir(parents=True, exist_ok=True)
    (out / "figure5.json").write_text(json.dumps(numbers, indent=1), encoding="utf-8")
    if plot:
        plot_figure5(single, accumulated, out / "figure5.png",
                     f"{label}: {len(facts)} facts, single vs accumulated updates "
                     f"(energy distance {numbers['energy_distance']:.3g}, p = {numbers['p_value']:.3g})")
    logger.info("%s: %s", run_dir, numbers)
    return numbers


def main(argv: Sequence[str] | None = None) -> int:
    from ..logs import setup_logging

    parser = argparse.ArgumentParser(prog="python -m mose_easyedit.experiments.increments",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a finished run recorded with record_increments=true")
    parser.add_argument("--out", type=Path, default=None, help="folder for figure5.json / figure5.png")
    parser.add_argument("--permutations", type=int, default=1000)
    parser.add_argument("--no-plot", action="store_true", help="the numbers only (no scikit-learn needed)")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        numbers = analyse(args.run_dir, args.out, args.permutations, plot=not args.no_plot)
    except (ValueError, FileNotFoundError) as exc:
        logger.error("%s", exc)
        return 2
    sys.stdout.write(json.dumps(numbers, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
