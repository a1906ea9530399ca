"""Every method at LLaMA3-8B shape on a GPU: seconds per edit by stage, the update rules alone, peak memory.

Builds a model with LLaMA3-8B's shape and random weights (``from_config``; nothing is downloaded: 32 layers,
d = 4096, p = 14336, 32 query / 8 key-value heads, vocabulary 128256) in bf16 on the GPU, key statistics of the
right shape from a corpus of random text, and edits a few facts with each method's shipped
``hparams/<METHOD>/llama3-8b.yaml`` (the input side of MOSE with ``smollm2-135m-input.yaml``'s settings on
AlphaEdit's window). It reports, per method, the median seconds per edit of each stage (keys, targets, update),
the target steps, the peak GPU memory, and beside them the memory plan (where each large tensor lives and its
size); then the update rules alone at d = 4096, p = 14336 (MOSE's polar factor by SVD, eigh and Newton–Schulz,
MEMIT's solve, AlphaEdit's carried inverse; ``benchmarks/update_rules.py``).

Random weights make the targets meaningless, so the edits are timed, not judged; their cost does not depend on
the values. Without CUDA the same code runs at reduced width (``--width``: d, p and the heads scaled down, the
depth and the hyperparameters kept) on the CPU, which is what the test suite exercises.

    python benchmarks/gpu_check.py --out runs/gpu_check            # on a CUDA machine: the full 8B shape, bf16
    python benchmarks/gpu_check.py --width 0.0625 --edits 2        # CPU: d = 256, p = 896, float32 (the default)
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

logger = logging.getLogger("benchmarks.gpu_check")

LLAMA3_8B = {"num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
             "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192, "rope_theta": 500000.0,
             "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
METHODS = ["ROME", "MEMIT", "RECT", "EMMET", "PRUNE", "AlphaEdit", "MOSE", "MOSE-input", "MOSE-OFT"]
REQUESTS = [
    {"prompt": "The Eiffel Tower is located in the city of", "subject": "Eiffel Tower", "target_new": "Rome"},
    {"prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux", "target_new": "English"},
    {"prompt": "Toko Yasuda plays the instrument", "subject": "Toko Yasuda", "target_new": "piano"},
    {"prompt": "The headquarters of Nintendo are in", "subject": "Nintendo", "target_new": "Berlin"},
    {"prompt": "Lionel Messi plays the sport of", "subject": "Lionel Messi", "target_new": "basketball"},
]
GB = 1e9


def model_shape(width: float) -> dict:
    """LLaMA3-8B's configuration with d and p scaled by ``width`` (depth, GQA 4:1 and p/d = 3.5 kept; heads of 128
    at full width, of 64 below)."""
    shape = dict(LLAMA3_8B, head_dim=128)
    if width != 1.0:
        hidden = max(128, round(4096 * width / 64) * 64)
        heads = max(4, hidden // 64 // 4 * 4)
        shape.update(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=heads // 4,
                     head_dim=hidden // heads, intermediate_size=round(3.5 * hidden / 64) * 64)
    return shape


def build_model(shape: dict, vocab: int, dtype: torch.dtype, device: torch.device, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**shape, "vocab_size": vocab})
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.config.name_or_path = f"random-llama3-8b-shape-d{shape['hidden_size']}"
    return model.eval()


def random_corpus(tok, tokens: int, folder: Path, seed: int) -> Path:
    """A text file of random vocabulary pieces, long enough for ``tokens`` tokens of key statistics."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, len(tok) - 1, (tokens + tokens // 4,), generator=generator).tolist()
    lines = [tok.decode(ids[i:i + 64]) for i in range(0, len(ids), 64)]
    path = folder / "random-corpus.txt"
    path.write_text("\n\n".join(lines), encoding="utf-8")
    return path


def load_hparams(label: str, device: torch.device, corpus: Path, samples: int, length: int, layers: int):
    from mose_easyedit.hparams import HPARAMS_ROOT
    from mose_easyedit.methods import METHODS as REGISTERED
    import yaml

    name = label
    raw = yaml.safe_load((HPARAMS_ROOT / name / "llama3-8b.yaml").read_text(encoding="utf-8"))
    raw["device"] = (device.index or 0) if device.type == "cuda" else "cpu"
    if "mom2_dataset" in raw:
        raw.update(mom2_dataset=str(corpus), mom2_n_samples=samples, mom2_sample_length=length)
    if raw.get("v_loss_layer") is not None:
        raw["v_loss_layer"] = layers - 1
    return REGISTERED[name].hparams_cls.from_dict(raw, f"{name}/llama3-8b.yaml (+ gpu_check)")


def memory_plan(shape: dict, vocab: int, dtype: torch.dtype) -> list[dict]:
    """The large tensors, their sizes at this shape and where they live (see docs/benchmarks.md §6)."""
    d, p, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = shape["num_key_value_heads"] * shape["head_dim"]
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * p + 2 * d
    params = layers * per_layer + 2 * vocab * d + d
    width = torch.finfo(dtype).bits // 8
    rows = [
        ("model weights", f"{params / 1e9:.2f} B parameters", str(dtype).replace("torch.", ""),
         "GPU (model.device)", params * width),
        ("key statistics C per layer (cached on the model, every layer a method may edit)", f"p×p = {p}²",
         "float32 (mom2_dtype)", "GPU, beside the weight", p * p * 4),
        ("MEMIT / RECT / EMMET / PRUNE solve (λC + K Kᵀ), per edited layer, transient", f"p×p = {p}²", "float64",
         "GPU", p * p * 8),
        ("AlphaEdit null-space projector P per layer (cached)", f"p×p = {p}²", "float32", "GPU", p * p * 4),
        ("AlphaEdit carried K_p K_pᵀ per layer (carried across edits)", f"p×p = {p}²", "float32 (mom2_dtype)",
         "GPU", p * p * 4),
        ("AlphaEdit carried inverse (K_p K_pᵀ P + L2·I)⁻¹ per layer (carried across edits)", f"p×p = {p}²",
         "float64", "GPU", p * p * 8),
        ("MOSE output side: C in float64 while building M = λ W C Wᵀ + V (W K)ᵀ, transient", f"p×p = {p}²",
         "float64", "GPU", p * p * 8),
        ("MOSE output side: W and W C in float64, transient", f"2 × d×p = {d}×{p}", "float64", "GPU",
         2 * d * p * 8),
        ("MOSE output side: M, its SVD and the rotation R", f"4 × d×d = {d}²", "float64", "GPU", 4 * d * d * 8),
        ("MOSE input side: AlphaEdit's cached projector P in float64 while aiming the plane, transient",
         f"p×p = {p}²", "float64", "GPU", p * p * 8),
        ("target optimisation: logits of ~20 positions", f"20 × {vocab}", "float32", "GPU", 20 * vocab * 4),
        ("MOSE undo log (undo_history steps × 3 rotations)", f"d×d = {d}²", "float64", "CPU", 3 * d * d * 8),
    ]
    return [{"tensor": t, "shape": s, "dtype": dt, "where": w, "GB": size / GB} for t, s, dt, w, size in rows]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def edit_with(label: str, model, tok, args, device, corpus: Path) -> dict:
    """Edit ``args.edits`` facts one after another with ``label``; restore the weights afterwards."""
    from mose_easyedit.methods import METHODS as REGISTERED
    from mose_easyedit.modeling import get_parameter
    from mose_easyedit.session import get_session, reset_session

    name = label
    hparams = load_hparams(label, device, corpus, args.samples, args.sample_length,
                           model.config.num_hidden_layers)
    spec = REGISTERED[name]
    originals: dict[str, torch.Tensor] = {}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    resident = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    seconds, stages, steps = [], {"keys": [], "targets": [], "update": []}, []
    try:
        for i in range(args.edits):
            request = dict(REQUESTS[i % len(REQUESTS)])
            synchronize(device)
            start = time.perf_counter()
            _, weights_copy = spec.apply(model, tok, [request], hparams, return_orig_weights=True)
            synchronize(device)
            seconds.append(time.perf_counter() - start)
            for key, value in weights_copy.items():
                originals.setdefault(key, value)
            entry = get_session(model, name).history[-1]
            for stage in stages:
                stages[stage].append(float(entry["seconds"].get(stage, 0.0)))
            stages["targets"][-1] += float(entry["seconds"].get("train", 0.0))
            value = entry.get("target_steps", entry.get("steps", 0))
            steps.append(float(sum(value) if isinstance(value, list) else value))
            logger.info("%s edit %d/%d: %.2f s (%s)", label, i + 1, args.edits, seconds[-1],
                        ", ".join(f"{k} {v[-1]:.2f}" for k, v in stages.items()))
    finally:
        with torch.no_grad():
            for key, value in originals.items():
                get_parameter(model, key).copy_(value)
        reset_session(model, name)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    # the first edit pays for the statistics (and AlphaEdit's projector); the median is the steady state
    return {"method": label, "edits": args.edits, "median_seconds": statistics.median(seconds),
            "first_seconds": seconds[0], **{f"{k}_median": statistics.median(v) for k, v in stages.items()},
            "target_steps_mean": statistics.fmean(steps),
            "resident_GB": resident / GB if device.type == "cuda" else None,
            "peak_GB": peak / GB if peak is not None else None}


def update_rules(shape: dict, device: torch.device, repeats: int) -> list[dict]:
    from update_rules import benchmark_size

    d, p = shape["hidden_size"], shape["intermediate_size"]
    args = SimpleNamespace(key_ratio=p / d, repeats=repeats, lam=30.0, output_spread=0.1, seed=0)
    return [benchmark_size(d, n, args, device) for n in (1, 10)]


def markdown(result: dict) -> str:
    lines = [f"# GPU check: {result['device_name']}, {result['shape']['num_hidden_layers']} layers, "
             f"d = {result['shape']['hidden_size']}, p = {result['shape']['intermediate_size']}, "
             f"{result['dtype']}", "",
             f"- machine: {result['machine']}; torch {result['torch']}; {result['edits']} edit(s) per method, one "
             f"fact each; statistics over {result['stat_tokens']} tokens of random text", "",
             "| Method | median s/edit | first edit s | keys s | targets s | update s | target steps | "
             "resident GB | peak GB |", "|---|---|---|---|---|---|---|---|---|"]

    def gb(value):
        return "–" if value is None else f"{value:.1f}"

    for row in result["methods"]:
        lines.append(f"| {row['method']} | {row['median_seconds']:.2f} | {row['first_seconds']:.2f} | "
                     f"{row['keys_median']:.2f} | {row['targets_median']:.2f} | {row['update_median']:.2f} | "
                     f"{row['target_steps_mean']:.1f} | {gb(row['resident_GB'])} | {gb(row['peak_GB'])} |")
    lines += ["", "Memory plan (sizes at this shape):", "", "| tensor | shape | dtype | where | GB |",
              "|---|---|---|---|---|"]
    lines += [f"| {r['tensor']} | {r['shape']} | {r['dtype']} | {r['where']} | {r['GB']:.2f} |"
              for r in result["memory_plan"]]
    if result.get("rules"):
        from update_rules import markdown_table

        lines += ["", f"Update rules alone (float64, median seconds over {result['rule_repeats']} steps):", "",
                  markdown_table(result["rules"])]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=float, default=None,
                        help="scale of d, p and the heads (default: 1 on CUDA, 1/16 on the CPU)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                        help="weights (default: bfloat16 on CUDA, float32 on the CPU)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--edits", type=int, default=3, help="facts edited one after another per method")
    parser.add_argument("--samples", type=int, default=None,
                        help="statistics samples (default: enough tokens for 2p, at least 8)")
    parser.add_argument("--sample-length", type=int, default=256)
    parser.add_argument("--rule-repeats", type=int, default=2, help="steps of the update-rule timing (0: skip)")
    parser.add_argument("--vocab", type=int, default=None,
                        help="vocabulary (default: LLaMA3's 128256 at full width, the tokenizer's otherwise)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="folder for gpu_check.md and gpu_check.json")
    args = parser.parse_args(argv)
    if args.edits < 1:
        parser.error("--edits must be >= 1")
    if args.rule_repeats == 1:
        parser.error("--rule-repeats must be 0 or >= 2")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for name in ("transformers", "urllib3", "filelock"):
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: CUDA is not available")
    width = args.width if args.width is not None else (1.0 if device.type == "cuda" else 1 / 16)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    from mose_easyedit.modeling import load_default_model

    _, tok = load_default_model()  # the embedded model's tokenizer: any tokenizer does for random weights
    shape = model_shape(width)
    vocab = args.vocab or (shape["vocab_size"] if width == 1.0 else len(tok))
    if vocab < len(tok):
        raise SystemExit(f"--vocab {vocab}: must be at least the tokenizer's {len(tok)}")
    p = shape["intermediate_size"]
    args.samples = args.samples or max(8, -(-2 * p // args.sample_length))
    logger.info("building a random LLaMA3-8B-shaped model: %s, vocabulary %d, %s on %s", shape, vocab, dtype, device)
    model = build_model(shape, vocab, dtype, device, args.seed)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    result = {"device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
              or platform.machine(), "machine": f"{platform.machine()} {platform.platform()}",
              "torch": torch.__version__, "shape": shape, "vocab": vocab, "dtype": str(dtype).replace("torch.", ""),
              "edits": args.edits, "stat_tokens": args.samples * args.sample_length,
              "memory_plan": memory_plan(shape, vocab, dtype), "methods": [], "rule_repeats": args.rule_repeats}
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as folder:
        corpus = random_corpus(tok, args.samples * args.sample_length, Path(folder), args.seed)
        for label in args.methods:
            result["methods"].append(edit_with(label, model, tok, args, device, corpus))
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    result["rules"] = update_rules(shape, device, args.rule_repeats) if args.rule_repeats else []
    report = markdown(result)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
        (args.out / "gpu_check.md").write_text(report, encoding="utf-8")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
