"""Latency of `generate`: stock decoding vs Vedas latent reasoning (KV-cached) vs the naive recompute loop.

    python benchmarks/bench_generate.py [--device cpu|cuda] [--dtype float32|bfloat16] [--json out.json] ...

Variants (same model weights, same prompt, same answer length forced with min_new_tokens = max_new_tokens):
  (a) stock  : `model.generate(..., num_latent_steps=0)`, i.e. plain Qwen2-VL decoding.
  (b) vedas  : `model.generate(..., num_latent_steps=T_r)`, replay top-K visual tokens per step, KV-cached.
  (c) naive  : the paper authors' approach (see `_common.NaiveReference`): each latent step re-runs the whole
               sequence with eager attention and `output_attentions=True`, then the answer is decoded with a
               fresh KV cache.
  (d, e) with `--static`: (a) and (b) decoding from a StaticCache (`cache_implementation="static"`). On a GPU
               transformers compiles the decoding step itself when the cache is static; on the CPU `--compile` runs
               (d)/(e) on a copy of the model whose forward is under `torch.compile` (the way
               transformers documents compiled generation), so the static rows measure compiled decoding too.
  (f, g) at the first batch size (unless `--no-per-step`): (a) with one answer token and (b) with one latent step;
               the per-round differences give a decoding step ((a) - (f)) / (answer - 1) and a latent step
               ((b) - (g)) / (T_r - 1), reported next to each other (target: a latent step <= 2 decoding steps).
Each at batch 1 and batch 16 (one distinct image per row). Warmup, then interleaved rounds; medians reported.
"""

import copy
import statistics

from _common import (
    NaiveReference,
    base_parser,
    build_model,
    finish_args,
    interleaved,
    median,
    paired_ratio,
    print_header,
    prompt_batch,
    spread,
    table,
    verdict,
    write_json,
)

import torch


def main():
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--latent-steps", type=int, default=4, help="T_r")
    parser.add_argument("--top-k", type=int, default=32, help="K, visual tokens replayed per latent step")
    parser.add_argument("--router-top-k", type=int, default=32, help="alpha, tokens refined per chunk and layer")
    parser.add_argument("--visual-tokens", type=int, default=None,
                        help="merged visual tokens of the image; default 256 (tiny/small), 1024 (2b)")
    parser.add_argument("--new-tokens", type=int, default=32, help="answer length (forced)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--reps", type=int, default=None, help="minimum timed rounds; default 5 on cpu, 10 on cuda")
    parser.add_argument("--no-naive", action="store_true", help="skip variant (c)")
    parser.add_argument("--no-per-step", action="store_true",
                        help="skip the two variants that give the per-latent-step and per-decoding-step times")
    parser.add_argument("--static", action="store_true", help="add (d) stock and (e) vedas with a static cache")
    parser.add_argument("--compile", action="store_true",
                        help="with --static on the CPU: run (d)/(e) with the forward under torch.compile")
    args = finish_args(parser.parse_args())
    if args.visual_tokens is None:
        args.visual_tokens = 1024 if args.size == "2b" else 256
    if args.reps is None:
        args.reps = 10 if args.device == "cuda" else 5

    built = build_model(args, with_naive=not args.no_naive, num_latent_steps=args.latent_steps,
                        replay_top_k=args.top_k, router_top_k=args.router_top_k)
    model = built.model
    naive = None if args.no_naive else NaiveReference(built.naive)
    steps, new = args.latent_steps, args.new_tokens
    batches = {b: prompt_batch(built, b, device=args.device) for b in args.batch_sizes}
    prompt_len = batches[args.batch_sizes[0]]["input_ids"].shape[1]
    print_header("bench_generate", args, built, {
        "prompt": f"{prompt_len} tokens ({built.visual_tokens} visual, image {built.image_side}x{built.image_side}), "
                  f"answer {new} tokens, T_r={steps}, K={args.top_k}",
        "timing": f"per batch size: {args.warmup} warmup + interleaved rounds (>= {args.reps}, until "
                  f">= {args.min_time:g} s), median",
    })

    def stock(inputs):
        return model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                              num_latent_steps=0)

    def vedas(inputs):
        return model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                              num_latent_steps=steps)

    static_model = model
    if args.static and args.compile:
        static_model = copy.deepcopy(model)
        # not fullgraph: stock generate (d) also prefills through the forward, whose latent-sequence check is
        # data-dependent (a graph break); the decoding steps compile whole
        static_model.forward = torch.compile(static_model.forward)

    def stock_one_token(inputs):  # prefill + the first token: stock minus it = the decoding steps
        return model.generate(**inputs, max_new_tokens=1, do_sample=False, num_latent_steps=0)

    def vedas_one_step(inputs):  # vedas minus it = steps - 1 latent steps
        return model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                              num_latent_steps=1)

    def stock_static(inputs):
        return static_model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                     num_latent_steps=0, cache_implementation="static")

    def vedas_static(inputs):
        return static_model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                     num_latent_steps=steps, cache_implementation="static")

    def reference(inputs):
        return naive.generate(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                              inputs["image_grid_thw"], inputs["mm_token_type_ids"], steps, new)

    # correctness and equal work, once, untimed
    checks = {}
    with torch.no_grad():
        inputs = batches[args.batch_sizes[0]]
        out_stock, out_vedas = stock(inputs), vedas(inputs)
        assert out_stock.shape == out_vedas.shape == (inputs["input_ids"].shape[0], prompt_len + new), \
            (out_stock.shape, out_vedas.shape)
        if naive is not None:
            out_naive = reference(inputs)
            assert out_naive.shape == out_vedas.shape
            checks["naive_tokens_equal_vedas"] = bool(torch.equal(out_naive, out_vedas))
            checks["naive_vs_vedas_first_diff_token"] = int(
                (out_naive[0, prompt_len:] != out_vedas[0, prompt_len:]).int().argmax()
            ) if not checks["naive_tokens_equal_vedas"] else None
        if args.static:
            checks["static_tokens_equal_dynamic"] = bool(torch.equal(vedas_static(inputs), out_vedas))
            checks["stock_static_tokens_equal_dynamic"] = bool(torch.equal(stock_static(inputs), out_stock))
    print(f"   check: every variant returns prompt + {new} tokens; " + ", ".join(f"{k} {v}" for k, v in checks.items()))

    per_step = steps >= 2 and new >= 2 and not args.no_per_step
    # one interleaved group per batch size (so the cheap batch-1 variants get many rounds)
    times = {}
    with torch.no_grad():
        for b, inputs in batches.items():
            group = {f"stock b{b}": (lambda x=inputs: stock(x)), f"vedas b{b}": (lambda x=inputs: vedas(x))}
            if naive is not None:
                group[f"naive b{b}"] = lambda x=inputs: reference(x)
            if b == args.batch_sizes[0] and per_step:
                group[f"stock 1-token b{b}"] = lambda x=inputs: stock_one_token(x)
                group[f"vedas T=1 b{b}"] = lambda x=inputs: vedas_one_step(x)
            if args.static:
                group[f"stock-static b{b}"] = lambda x=inputs: stock_static(x)
                group[f"vedas-static b{b}"] = lambda x=inputs: vedas_static(x)
            times.update(interleaved(group, args.reps, args.warmup, args.device, min_time=args.min_time,
                                     log=None if args.quiet else print))

    med = {name: median(t) for name, t in times.items()}
    best = {name: min(t) for name, t in times.items()}
    rows = []
    for b in args.batch_sizes:
        for letter, kind in zip("abcdefg", ("stock", "vedas", "naive", "stock-static", "vedas-static",
                                             "stock 1-token", "vedas T=1")):
            name = f"{kind} b{b}"
            if name in med:
                rows.append([f"({letter}) {kind}", b, len(times[name]), f"{med[name] * 1e3:.1f}",
                             f"{best[name] * 1e3:.1f}", f"{spread(times[name]):.1f}",
                             f"{b * (1 if kind == 'stock 1-token' else new) / med[name]:.1f}",
                             f"{med[name] / med[f'stock b{b}']:.2f}"])
    print()
    print(table(["variant", "batch", "rounds", "median ms", "min ms", "+-% (IQR/2)", "answer tok/s", "x stock"],
                rows))
    print()

    ratios, lines = {}, []

    def add(key, label, top, bottom, target=None, higher=False, note=""):
        ratios[key] = paired_ratio(times, top, bottom)
        ratios[key + "_of_medians"] = med[top] / med[bottom]
        ratios[key + "_of_minima"] = best[top] / best[bottom]
        check = f"; {verdict(ratios[key], target, higher)}{note}" if target is not None else ""
        lines.append(f"{label}: {ratios[key]:.2f}x (paired per-round median; ratio of medians "
                     f"{ratios[key + '_of_medians']:.2f}x, of minima {ratios[key + '_of_minima']:.2f}x{check})")

    b1 = args.batch_sizes[0]
    for b in args.batch_sizes:
        add(f"vedas_over_stock_b{b}", f"(b)/(a) vedas/stock latency, batch {b}", f"vedas b{b}", f"stock b{b}",
            1.3 if b == b1 else None)
    if naive is not None:
        for b in args.batch_sizes:
            add(f"naive_over_vedas_b{b}", f"(c)/(b) naive/vedas latency, batch {b}", f"naive b{b}", f"vedas b{b}",
                3, True)
    if args.static:
        for b in args.batch_sizes:
            add(f"vedas_static_over_stock_static_b{b}", f"(e)/(d) vedas/stock latency, static cache, batch {b}",
                f"vedas-static b{b}", f"stock-static b{b}", 1.3 if b == b1 else None)
            add(f"vedas_static_over_vedas_b{b}", f"(e)/(b) vedas static/dynamic latency, batch {b}",
                f"vedas-static b{b}", f"vedas b{b}")
    if per_step:
        # paired per round: (stock - stock 1-token) / (new - 1) and (vedas - vedas T=1) / (steps - 1)
        decode = [(t - o) / (new - 1) for t, o in zip(times[f"stock b{b1}"], times[f"stock 1-token b{b1}"])]
        latent = [(t - o) / (steps - 1) for t, o in zip(times[f"vedas b{b1}"], times[f"vedas T=1 b{b1}"])]
        per_round = [l / d for l, d in zip(latent, decode) if d > 0]
        ratios["latent_step_over_decoding_step_b1"] = statistics.median(per_round) if per_round else float("nan")
        per_step_ms = {"latent_step_ms": median(latent) * 1e3, "decoding_step_ms": median(decode) * 1e3}
        if min(per_step_ms.values()) <= 0:  # a difference drowned in noise: say so rather than a verdict
            lines.append(f"per step, batch {b1}: not resolved above the noise ({per_step_ms}); run more rounds "
                         "(--min-time)")
        else:
            lines.append(f"per step, batch {b1}: latent step {per_step_ms['latent_step_ms']:.2f} ms, decoding step "
                         f"{per_step_ms['decoding_step_ms']:.2f} ms (medians of per-round differences); latent / "
                         f"decoding {ratios['latent_step_over_decoding_step_b1']:.2f}x (paired; "
                         f"{verdict(ratios['latent_step_over_decoding_step_b1'], 2, False)})")
    for b in args.batch_sizes[1:]:
        for kind in ("vedas", "stock"):
            # throughput ratio = (b / t_b) / (b1 / t_b1)
            key = f"{kind}_throughput_b{b}_over_b{b1}"
            ratios[key] = b * med[f"{kind} b{b1}"] / (b1 * med[f"{kind} b{b}"])
            ratios[key + "_of_minima"] = b * best[f"{kind} b{b1}"] / (b1 * best[f"{kind} b{b}"])
            check = f"; {verdict(ratios[key], 8, True)} (a GPU target)" if kind == "vedas" else ""
            lines.append(f"{kind} throughput batch {b} / batch {b1}: {ratios[key]:.2f}x (ratio of medians; of "
                         f"minima {ratios[key + '_of_minima']:.2f}x{check})")
    print("\n".join(lines))
    headline = {k: v for k, v in ratios.items() if not k.endswith(("_of_medians", "_of_minima"))}
    print("RATIOS: " + ", ".join(f"{k}={v:.2f}" for k, v in headline.items()))

    write_json(args.json, {
        "benchmark": "generate", "args": vars(args), "model": built.description, "prompt_len": prompt_len,
        "visual_tokens": built.visual_tokens, "checks": checks, "times_s": times,
        "median_s": med, "min_s": best, "ratios": ratios, "per_step_ms": per_step_ms if per_step else None,
    })


if __name__ == "__main__":
    main()
