"""Where a target-optimisation step spends its time, and why a step costs what it costs.

Optimises the targets of the first ``--n`` CounterFact cases one request at a time (single-sequential shape)
on the embedded model at block ``--layer`` under the profiler, then prints:

* seconds per Adam step (the δ = 0 pass counted as the first step's forward);
* the share of the step in matrix products, split into the output head (vocabulary × d, tied embeddings)
  and the block products (attention and MLP projections of the blocks above ``--layer``), in milliseconds
  per step;
* one block product (12 rows, about a single request's token positions in a step, × d by d × p: the MLP
  up- and gate-projections) timed with its weight in cache (the same matrix again and again) and streamed
  from memory (cycling through the projections of all blocks above ``--layer``, as a step does), in GB/s
  of weight read.

    python benchmarks/target_steps.py --n 10 --threads 1
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from _embedded import add_arguments, load


def matmul_seconds(prof, vocab: int) -> tuple[float, float]:
    """Self CPU seconds of ``aten::mm`` / ``aten::addmm`` events: (output head, everything else)."""
    head = other = 0.0
    for event in prof.key_averages(group_by_input_shape=True):
        if event.key not in ("aten::mm", "aten::addmm"):
            continue
        seconds = event.self_cpu_time_total / 1e6
        if any(vocab in shape for shape in event.input_shapes if shape):
            head += seconds
        else:
            other += seconds
    return head, other


def product_timing(weights: list[torch.Tensor], rows: int, repeats: int = 5) -> tuple[float, float]:
    """Seconds of ``F.linear(x, W)`` for a (rows, d) input: W in cache, and W streamed (cycling through
    all of them)."""
    x = torch.randn(rows, weights[0].shape[1])
    timings = []
    for cycle in ([weights[0]] * len(weights), weights):
        for w in cycle:  # warm-up pass
            F.linear(x, w)
        start = time.perf_counter()
        for _ in range(repeats):
            for w in cycle:
                F.linear(x, w)
        timings.append((time.perf_counter() - start) / (repeats * len(cycle)))
    return timings[0], timings[1]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, 10, "CounterFact cases, optimised one at a time", "MOSE",
                  "whose YAML sets the targets")
    parser.add_argument("--layer", type=int, default=9, help="block whose output receives δ")
    args = parser.parse_args(argv)
    setup = load(args)
    hp, model, tok = setup.hp, setup.model, setup.tok

    from torch.profiler import ProfilerActivity, profile

    from mose_easyedit.keys import context_templates
    from mose_easyedit.modeling import decoder_blocks
    from mose_easyedit.requests import validate_requests
    from mose_easyedit.targets import optimize_targets

    requests = validate_requests(setup.cases)
    families = context_templates(model, tok, hp.context_template_length_params, hp.seed)
    optimize_targets(model, tok, requests[:1], args.layer, hp, families)  # warm-up

    steps = 0
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        start = time.perf_counter()
        for request in requests:
            result = optimize_targets(model, tok, [request], args.layer, hp, families)
            steps += result.steps[0] + 1
        seconds = time.perf_counter() - start
    vocab = model.get_output_embeddings().weight.shape[0]
    head, blocks = matmul_seconds(prof, vocab)
    profiled = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e6

    _, layers = decoder_blocks(model)
    upper = [w for block in list(layers)[args.layer + 1:]
             for w in (block.mlp.up_proj.weight, block.mlp.gate_proj.weight)]
    rows = 12
    hot, streamed = product_timing([w.detach() for w in upper], rows)
    size = upper[0].numel() * upper[0].element_size()

    print(f"{args.method} targets at block {args.layer}, {len(requests)} request(s) one at a time, "
          f"{torch.get_num_threads()} thread(s): {steps} steps, {seconds / steps:.3f} s per step "
          f"({seconds:.1f} s in all, under the profiler)")
    print("| part of a step | ms per step | share of profiled CPU time |")
    print("|---|---|---|")
    print(f"| output head products ({vocab} × {upper[0].shape[1]}) | {1e3 * head / steps:.0f} "
          f"| {head / profiled:.0%} |")
    print(f"| block products | {1e3 * blocks / steps:.0f} | {blocks / profiled:.0%} |")
    rest = profiled - head - blocks
    print(f"| everything else | {1e3 * rest / steps:.0f} | {rest / profiled:.0%} |")
    print(f"one block product, {rows} × {upper[0].shape[1]} by {upper[0].shape[1]} × {upper[0].shape[0]}:")
    print("| weight | µs | GB/s of weight read | GFLOP/s |")
    print("|---|---|---|---|")
    flops = 2 * rows * upper[0].numel()
    for name, t in (("in cache", hot), (f"streamed ({len(upper)} matrices)", streamed)):
        print(f"| {name} | {1e6 * t:.0f} | {size / t / 1e9:.1f} | {flops / t / 1e9:.0f} |")


if __name__ == "__main__":
    main()
