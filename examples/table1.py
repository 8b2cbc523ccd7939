"""Paper table 1 (+ table 3 ablations) on a bundled task, on the CPU, with seeds, 95% intervals and paired
differences.

    python examples/table1.py --task digits --select               # 1. choose lambda and the router lr on validation
    python examples/table1.py --task digits --seeds 0 1 2          # 2. the table on the test split
    python examples/table1.py --task digits --seeds 0 --num_test_samples 200 --variants no-cot vedas   # a quick one

Protocol (per seed; every random choice, reader included, follows the seed):
1. A tiny Vedas model is taught to read the task's images (answer-only, `vedas_hf.toy.pretrain_reader`): the
   stand-in for the pretrained VLM every method starts from. Its reading accuracy on the test images is reported.
2. Every variant fine-tunes that same reader for the same epochs on the same training records (paired):
   No-CoT (answers only), CoT (explicit steps), Vedas (latent curriculum: stage k replaces the first k steps by k
   latents) and the ablations without Routing Depth Scaling, without visual replay (which also drops the
   reconstruction target) and without the reconstruction loss (lambda = 0), plus Vedas at the other lambda of
   {0.2, 1.0}.
3. Greedy decoding on the test split (unseen handwriting / renders): per-sample correctness, AR steps, time. The
   full method is also evaluated at 0 .. T_r + 2 latent steps, with zero vectors as latent inputs, and with its
   routers switched off (router diagnostics: `vedas_hf.diagnostics.router_diagnostics`).

`--select` instead trains Vedas for seed 0 at each (lambda, router lr multiplier) of the grid on the train split and
scores it on the validation split (held-out source images of the training data); the choice goes to
`<output_dir>/selected.json`, which step 2 reads. The test split is never used to choose anything.

Each (seed, variant) result is cached as `<output_dir>/seed<N>/<variant>.json`: an interrupted run resumes, and more
seeds extend a table. A folder holds one protocol (`protocol.json`: samples, epochs, lr, width, ...): a run with other
training settings, or a cached result evaluated otherwise (split, size, generation length, the full method's
lambda / router lr), is refused instead of reused. The table (per-seed numbers, means with 95% intervals over seeds and over samples, paired
differences of the full method minus each row) goes to stdout, `<output_dir>/table1.md` and `table1.json`.
"""

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import time
from collections import Counter

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

import vedas_hf  # noqa: F401  (registers the Auto classes)
from vedas_hf.diagnostics import router_diagnostics
from vedas_hf.eval import evaluate
from vedas_hf.stats import format_ci, mean_ci, mean_ci_normal, paired_sample_ci
from vedas_hf.toy import TASKS, VALIDATION_FRACTION, make_task_splits, pretrain_reader, reading_records, toy_sft_config
from vedas_hf.trainer import VedasSFTTrainer


# command-line name -> (table row, data mode, Vedas config overrides, trainer overrides); "{lambda}" rows are built
# from the selected lambda.
VARIANTS = {
    "no-cot": ("No-CoT", "no_cot", {}, {}),
    "cot": ("CoT", "cot", {}, {}),
    "vedas": ("Vedas", "latent", {}, {}),
    "no-rds": ("Vedas w/o RDS", "latent", {"router_layers": "none"}, {}),
    "no-replay": ("Vedas w/o SCF-VR", "latent", {"replay_mode": "none"}, {}),
    "no-recon": ("Vedas w/o recon loss (lambda 0)", "latent", {}, {"recon_loss_weight": 0.0}),
    "lambda-0.2": ("Vedas, lambda 0.2", "latent", {}, {"recon_loss_weight": 0.2}),
    "lambda-1.0": ("Vedas, lambda 1.0", "latent", {}, {"recon_loss_weight": 1.0}),
    # not in the paper, not run by default: replayed tokens keep their M-RoPE image positions; Coconut's mixing of
    # earlier curriculum stages (a record is rendered at an earlier stage with probability 0.3)
    "replay-image-pos": ("Vedas, replay at image positions", "latent", {"replay_positions": "image"}, {}),
    "stage-mixing": ("Vedas, earlier stages mixed in (p 0.3)", "latent", {}, {"earlier_stage_probability": 0.3}),
}
DEFAULT_VARIANTS = ["no-cot", "cot", "vedas", "no-rds", "no-replay", "no-recon", "lambda-0.2", "lambda-1.0"]
FULL = "vedas"
# the validation grid of `--select`
SELECT_GRID = {"recon_loss_weight": (0.2, 1.0), "vedas_lr_multiplier": (1.0, 10.0)}
# The bundled tasks' Vedas settings (all in the reader's config): with 2 x 2 merged visual tokens per digit / panel,
# K = 4 replays one object's worth per step, W = 2 crops one object, and alpha = 2 selects within every latent chunk
# (K + 1 = 5 tokens) as well as in the prompt.
TASK_VEDAS_CONFIG = {"replay_top_k": 4, "recon_window": 2, "router_top_k": 2}
# Per task: generator settings (`vedas_hf.toy`), T_r (latent steps of the last stage) and reader epochs. Digits: two
# digits and their sum mod 10 (steps: read, read, add); the latents replace the two reading steps (with all three
# steps latent the tiny model stays at chance, like No-CoT: see docs/results.md). Shapes: three panels, one reading
# step each, then the count; the latents replace the reading steps.
# "selected": lambda and the router lr multiplier chosen on the validation split by `--select` (seed 0; the grid's
# scores are in results/table1-<task>-selection.json); a `--select` run in the output folder takes precedence.
TASK_SETTINGS = {
    "digits": {"task": {"num_digits": 2}, "max_latent_stage": 2, "reader_epochs": 8, "num_train_epochs": 12,
               "selected": {"recon_loss_weight": 1.0, "vedas_lr_multiplier": 10.0}},
    "shapes": {"task": {}, "max_latent_stage": 3, "reader_epochs": 16, "num_train_epochs": 6,
               "selected": {"recon_loss_weight": 0.2, "vedas_lr_multiplier": 10.0}},
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="digits", choices=sorted(TASKS), help="bundled task (vedas_hf.toy)")
    parser.add_argument("--output_dir", default=None, help="default: runs/table1-<task>")
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS,
                        help=f"any of {list(VARIANTS)} (default: {DEFAULT_VARIANTS})")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--select", action="store_true", help="run the validation search instead of the table")
    parser.add_argument("--num_train_samples", type=int, default=2000)
    parser.add_argument("--num_validation_samples", type=int, default=500)
    parser.add_argument("--num_test_samples", type=int, default=500)
    parser.add_argument("--eval_split", default="test", choices=["test", "validation"],
                        help="score the table on the test split (the reported table, touched once) or on the "
                             "validation split carved from the training data (to choose epochs, lr or width; use "
                             "its own --output_dir)")
    parser.add_argument("--num_reader_samples", type=int, default=4000, help="reading pretraining samples")
    parser.add_argument("--reader_epochs", type=int, default=None, help="default: the task's (TASK_SETTINGS)")
    parser.add_argument("--max_latent_stage", type=int, default=None,
                        help="T_r, latent steps of the final stage (default: the task's, TASK_SETTINGS)")
    parser.add_argument("--epochs_per_stage", type=int, default=1)
    parser.add_argument("--num_train_epochs", type=int, default=None,
                        help="epochs of every variant; the latent ones stay at the last stage once they reach it "
                             "(default: the task's, TASK_SETTINGS)")
    parser.add_argument("--recon_loss_weight", type=float, default=None,
                        help="lambda of the full method (default: the validated choice, TASK_SETTINGS)")
    parser.add_argument("--vedas_lr_multiplier", type=float, default=None,
                        help="router / TokenSR learning-rate multiplier (default: the validated choice)")
    parser.add_argument("--hidden_size", type=int, default=None,
                        help="language-model width of the tiny model (default: vedas_hf.testing's, 64; the MLP is 2x)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--max_new_tokens", type=int, default=96)
    parser.add_argument("--eval_batch_size", type=int, default=64)
    parser.add_argument("--results", default=None,
                        help="also write the table to <results>.json / <results>.md (e.g. results/table1-digits)")
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    args.output_dir = args.output_dir or f"runs/table1-{args.task}"
    for name in ("max_latent_stage", "reader_epochs", "num_train_epochs"):
        if getattr(args, name) is None:
            setattr(args, name, TASK_SETTINGS[args.task][name])
    return args


def _write_json(path, value):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=1)
    os.replace(path + ".tmp", path)  # a killed run never leaves a half-written cache entry


def _read_json(path):
    with open(path) as f:
        return json.load(f)


# the command-line fields that change what a cached reader or variant is: an output folder holds one protocol
PROTOCOL_FIELDS = ("task", "num_train_samples", "num_reader_samples", "reader_epochs", "max_latent_stage",
                   "epochs_per_stage", "num_train_epochs", "hidden_size", "batch_size", "learning_rate")


def check_protocol(args) -> None:
    """`ValueError` when `args.output_dir` holds results of other training settings (its cached readers and variants
    would silently be reused); the first run writes them to `<output_dir>/protocol.json`."""
    path = os.path.join(args.output_dir, "protocol.json")
    current = {name: getattr(args, name) for name in PROTOCOL_FIELDS}
    if not os.path.exists(path):
        _write_json(path, current)
        return
    saved = _read_json(path)
    changed = {name: (saved.get(name), value) for name, value in current.items() if saved.get(name) != value}
    if changed:
        differences = ", ".join(f"{name}: {there!r} there, {now!r} now" for name, (there, now) in changed.items())
        raise ValueError(
            f"{args.output_dir} holds results trained with other settings ({differences}); its cached readers and "
            "variants would be reused. Pass a new --output_dir, or the same settings."
        )


def check_cached(path: str, cached: dict, expected: dict) -> None:
    """`ValueError` when a cached (seed, variant) result was evaluated or configured otherwise than `expected`
    (evaluation split and size, generation length, the full method's lambda / router lr); entries written before
    these were recorded are accepted."""
    changed = {k: (cached[k], v) for k, v in expected.items() if k in cached and cached[k] != v}
    if changed:
        raise ValueError(
            f"{path} was computed with {', '.join(f'{k}={a!r}' for k, (a, _) in changed.items())}, this run asks for "
            f"{', '.join(f'{k}={b!r}' for k, (_, b) in changed.items())}: delete it to recompute, or use another "
            "--output_dir."
        )


def full_method_settings(args) -> dict:
    """lambda and the router lr multiplier of the full method: the command line, else the output folder's
    `selected.json` (from `--select`), else the task's validated choice in `TASK_SETTINGS`."""
    selected_path = os.path.join(args.output_dir, "selected.json")
    selected = (_read_json(selected_path)["selected"] if os.path.exists(selected_path)
                else TASK_SETTINGS[args.task]["selected"])
    return {name: getattr(args, name) if getattr(args, name) is not None else selected[name] for name in SELECT_GRID}


def task_kwargs(args) -> dict:
    """The bundled task's generator settings used by this protocol (`TASK_SETTINGS`)."""
    return dict(TASK_SETTINGS[args.task]["task"])


def reader_for_seed(args, seed: int) -> str:
    """The seed's reader checkpoint (trained once, then reused)."""
    folder = os.path.join(args.output_dir, f"seed{seed}", "reader")
    final = os.path.join(folder, "final")
    if os.path.exists(os.path.join(final, "config.json")):
        return final
    stock = None
    if args.hidden_size is not None:
        stock = {"text_config": {"hidden_size": args.hidden_size, "intermediate_size": 2 * args.hidden_size}}
    # the reader never sees the validation split's source images either
    return pretrain_reader(folder, task=args.task, task_kwargs=task_kwargs(args), num_samples=args.num_reader_samples,
                           epochs=args.reader_epochs, stock_overrides=stock, validation_fraction=VALIDATION_FRACTION,
                           batch_size=args.batch_size, learning_rate=args.learning_rate, seed=seed,
                           num_latent_steps=args.max_latent_stage, **TASK_VEDAS_CONFIG)


def train_variant(variant, reader, train, args, seed, settings, output_dir):
    """Fine-tune the reader as `variant`; returns the trainer (its model trained) and the processor."""
    _, mode, config_overrides, trainer_overrides = VARIANTS[variant]
    model = AutoModelForImageTextToText.from_pretrained(reader, **config_overrides)
    processor = AutoProcessor.from_pretrained(reader)
    fields = {**settings, **trainer_overrides}
    config = toy_sft_config(
        output_dir, no_cot_baseline=mode == "no_cot", cot_baseline=mode == "cot",
        max_latent_stage=args.max_latent_stage, epochs_per_stage=args.epochs_per_stage,
        num_train_epochs=args.num_train_epochs, per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate, seed=seed, disable_tqdm=True, logging_steps=10**6, **fields,
    )
    trainer = VedasSFTTrainer(model=model, args=config, train_dataset=train, processing_class=processor)
    trainer.train()
    return trainer, processor


def _evaluate(model, processor, records, args, steps, **kwargs):
    return evaluate(model, processor, records, num_latent_steps=steps, max_new_tokens=args.max_new_tokens,
                    batch_size=args.eval_batch_size, progress=False, **kwargs)


def _compact(result: dict) -> dict:
    """An `evaluate` result without the generated texts: accuracy, AR steps, time and per-sample correctness."""
    return {"accuracy": result["accuracy"], "ar_steps": result["ar_steps"],
            "seconds_per_sample": result["seconds_per_sample"], "num_samples": result["num_samples"],
            "correct": [int(p["correct"]) for p in result["predictions"]]}


def cache_key(args, variant, settings) -> dict:
    """What a cached (seed, variant) result must match to be reused (see `check_cached`)."""
    key = {"eval_split": args.eval_split, "max_new_tokens": args.max_new_tokens}
    if VARIANTS[variant][1] == "latent":
        key["full_method_settings"] = settings
    return key


def run_variant(variant, reader, splits, args, seed, settings) -> dict:
    """Train and evaluate one (seed, variant); the full method also gets the steps curve, the zero-latent probe
    and the router diagnostics."""
    start = time.perf_counter()
    mode = VARIANTS[variant][1]
    trainer, processor = train_variant(variant, reader, splits["train"], args, seed, settings,
                                       os.path.join(args.output_dir, f"seed{seed}", variant))
    train_minutes = (time.perf_counter() - start) / 60
    model, steps = trainer.model, args.max_latent_stage if mode == "latent" else 0
    test = splits["test"]
    result = _evaluate(model, processor, test, args, steps)
    out = {"variant": variant, "seed": seed, "train_minutes": train_minutes, **_compact(result),
           "examples": [p["text"] for p in result["predictions"][:5]], **cache_key(args, variant, settings)}
    if variant in (FULL, "stage-mixing"):
        # greedy decoding is deterministic: the step count it was trained for is the evaluation above
        out["steps_curve"] = {
            t: result["accuracy"] if t == steps else _evaluate(model, processor, test, args, t)["accuracy"]
            for t in range(args.max_latent_stage + 3)
        }
    if variant == FULL:
        out["zero_latents"] = _compact(_evaluate(model, processor, test, args, steps, latent_inputs="zeros"))
        out["router_diagnostics"] = router_diagnostics(
            model, processor, test, trainer.args, num_latent_steps=steps, accuracy=result["accuracy"],
            evaluate_kwargs={"batch_size": args.eval_batch_size, "max_new_tokens": args.max_new_tokens},
        )
    out["minutes"] = (time.perf_counter() - start) / 60
    return out


def reading_accuracy(reader, records, args) -> dict:
    """The reader on the reading version of `records`: whole readings right, and digits / panels right."""
    model = AutoModelForImageTextToText.from_pretrained(reader)
    processor = AutoProcessor.from_pretrained(reader)
    result = _evaluate(model, processor, reading_records(records), args, 0)
    items = []
    for p in result["predictions"]:
        gold, said = (p["answer"].replace(",", " ").split(), p["prediction"].replace(",", " ").split())
        items.append(sum(a == b for a, b in zip(gold, said)) / len(gold))
    return {"exact": result["accuracy"], "items": sum(items) / len(items)}


def select(args):
    """Grid over `SELECT_GRID` for the full method, seed 0, scored on the validation split."""
    seed = args.seeds[0]
    splits = make_task_splits(args.task, args.num_train_samples, args.num_validation_samples, 0, seed=seed,
                              **task_kwargs(args))
    reader = reader_for_seed(args, seed)
    scores = []
    for values in itertools.product(*SELECT_GRID.values()):
        settings = dict(zip(SELECT_GRID, values))
        name = "-".join(f"{k}{v}" for k, v in settings.items())
        path = os.path.join(args.output_dir, "select", f"{name}.json")
        if not os.path.exists(path):
            trainer, processor = train_variant(FULL, reader, splits["train"], args, seed, settings,
                                               os.path.join(args.output_dir, "select", name))
            result = _evaluate(trainer.model, processor, splits["validation"], args, args.max_latent_stage)
            _write_json(path, {"settings": settings, "validation_accuracy": result["accuracy"]})
        scores.append(_read_json(path))
        print(f"{name}: validation accuracy {100 * scores[-1]['validation_accuracy']:.1f}%", flush=True)
    best = max(scores, key=lambda s: s["validation_accuracy"])
    _write_json(os.path.join(args.output_dir, "selected.json"),
                {"selected": best["settings"], "grid": scores, "seed": seed, "task": args.task,
                 "num_validation_samples": args.num_validation_samples, "command": " ".join(sys.argv)})
    print(f"selected {best['settings']}")


def summarize(results: dict, variants: list, seeds: list) -> dict:
    """Per row: per-seed accuracies, the mean with its 95% interval over seeds and over samples, AR steps; per
    ablation / baseline: the paired difference full method minus it (per seed, over seeds, over samples)."""
    rows = {}
    for variant in variants:
        per_seed = [results[s][variant] for s in seeds]
        correct = [c for r in per_seed for c in r["correct"]]
        rows[variant] = {
            "name": VARIANTS[variant][0],
            "accuracy_per_seed": [r["accuracy"] for r in per_seed],
            "accuracy_seeds_ci": mean_ci([r["accuracy"] for r in per_seed]),
            "accuracy_samples_ci": mean_ci_normal(correct),
            "ar_steps": sum(r["ar_steps"] for r in per_seed) / len(per_seed),
            "ms_per_sample": 1000 * sum(r["seconds_per_sample"] for r in per_seed) / len(per_seed),
        }
        if variant != FULL and FULL in variants:
            full = [results[s][FULL] for s in seeds]
            rows[variant]["full_minus_this"] = {
                "per_seed": [f["accuracy"] - r["accuracy"] for f, r in zip(full, per_seed)],
                "seeds_ci": mean_ci([f["accuracy"] - r["accuracy"] for f, r in zip(full, per_seed)]),
                "samples_ci": paired_sample_ci([c for f in full for c in f["correct"]], correct),
            }
    return rows


def latents_matter(full: list) -> dict:
    """Full method with its latents minus with zero latent inputs, paired per seed and per sample."""
    return {
        "per_seed": [f["accuracy"] - f["zero_latents"]["accuracy"] for f in full],
        "seeds_ci": mean_ci([f["accuracy"] - f["zero_latents"]["accuracy"] for f in full]),
        "samples_ci": paired_sample_ci([c for f in full for c in f["correct"]],
                                       [c for f in full for c in f["zero_latents"]["correct"]]),
    }


def markdown(rows: dict, results: dict, seeds: list, header: str) -> str:
    lines = [header, "",
             "| method | accuracy (%), mean [95% CI over seeds] | per seed | [95% CI over samples] | # AR steps | "
             "Vedas minus this (points), mean [95% CI over seeds] | [95% CI over samples] |",
             "|---|---|---|---|---:|---|---|"]
    for row in rows.values():
        diff = row.get("full_minus_this")
        lines.append(
            f"| {row['name']} | {format_ci(row['accuracy_seeds_ci'])} | "
            f"{', '.join(f'{100 * a:.1f}' for a in row['accuracy_per_seed'])} | "
            f"[{100 * row['accuracy_samples_ci']['low']:.1f}, {100 * row['accuracy_samples_ci']['high']:.1f}] | "
            f"{row['ar_steps']:.1f} | {format_ci(diff['seeds_ci']) if diff else ''} | "
            f"{format_ci(diff['samples_ci']) if diff else ''} |"
        )
    full = [results[s].get(FULL) for s in seeds]
    if all(full):
        steps = sorted(full[0]["steps_curve"], key=int)
        lines += ["", "Full method, accuracy (%) by latent steps at inference (mean [95% CI over seeds]):", "",
                  "| latent steps | " + " | ".join(str(t) for t in steps) + " | zero latent inputs |",
                  "|---|" + "---|" * (len(steps) + 1),
                  "| accuracy | " + " | ".join(format_ci(mean_ci([f["steps_curve"][t] for f in full])) for t in steps)
                  + f" | {format_ci(mean_ci([f['zero_latents']['accuracy'] for f in full]))} |"]
        zeros = latents_matter(full)
        lines += ["", f"Do the latents matter: accuracy with the latents' computed inputs minus with zero vectors "
                      f"(paired), {format_ci(zeros['seeds_ci'])} points over seeds, {format_ci(zeros['samples_ci'])} "
                      "over samples."]
        diag = [f["router_diagnostics"] for f in full]
        lines += ["", "Router diagnostics of the full method (mean over seeds):", "",
                  "| mean abs gate e(d) | share of implicit-phase tokens refined | test CE | CE routers off | "
                  "accuracy (%) | accuracy routers off (%) |", "|---:|---:|---:|---:|---:|---:|",
                  "| " + " | ".join(f"{sum(_value(d, k) for d in diag) / len(diag) * s:.{p}f}" for k, s, p in (
                      ("gate_abs_mean_all", 1, 4), ("refined_share", 1, 3), ("ce", 1, 4), ("ce_routers_off", 1, 4),
                      ("accuracy", 100, 1), ("accuracy_routers_off", 100, 1))) + " |"]
    return "\n".join(lines)


def _value(diagnostics: dict, key: str) -> float:
    value = diagnostics[key]
    return value["mean"] if isinstance(value, dict) else value


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    check_protocol(args)
    if args.select:
        return select(args)
    start = time.perf_counter()
    settings = full_method_settings(args)
    # the lambda row equal to the full method's lambda is the full method itself: not trained twice
    args.variants = [v for v in args.variants
                     if not (v.startswith("lambda-") and float(v.split("-", 1)[1]) == settings["recon_loss_weight"])]
    results, readers = {}, {}
    for seed in args.seeds:
        validation = args.eval_split == "validation"  # every row below is then scored on the validation split
        splits = make_task_splits(args.task, args.num_train_samples, args.num_validation_samples if validation else 0,
                                  0 if validation else args.num_test_samples, seed=seed, **task_kwargs(args))
        if validation:
            splits["test"] = splits["validation"]
        evaluated = {"eval_split": args.eval_split, "num_samples": len(splits["test"])}
        reader = reader_for_seed(args, seed)
        reading_path = os.path.join(args.output_dir, f"seed{seed}", "reading.json")
        if not os.path.exists(reading_path):
            _write_json(reading_path, {**reading_accuracy(reader, splits["test"], args), **evaluated})
        readers[seed] = _read_json(reading_path)
        check_cached(reading_path, readers[seed], evaluated)
        results[seed] = {}
        for variant in args.variants:
            path = os.path.join(args.output_dir, f"seed{seed}", f"{variant}.json")
            if not os.path.exists(path):
                _write_json(path, run_variant(variant, reader, splits, args, seed, settings))
            results[seed][variant] = _read_json(path)
            check_cached(path, results[seed][variant], {**cache_key(args, variant, settings), **evaluated})
            print(f"seed {seed} {VARIANTS[variant][0]}: accuracy {100 * results[seed][variant]['accuracy']:.1f}%",
                  flush=True)
        answers = Counter(r["answer"] for r in splits["test"])
        results[seed]["majority"] = answers.most_common(1)[0][1] / len(splits["test"])
    rows = summarize(results, args.variants, args.seeds)
    reading = ", ".join(f"{100 * readers[s]['items']:.1f}" for s in args.seeds)
    majority = ", ".join(f"{100 * results[s]['majority']:.1f}" for s in args.seeds)
    header = (f"Task `{args.task}`, seeds {args.seeds}, {evaluated['num_samples']} {args.eval_split} samples per seed; "
              f"full method lambda = {settings['recon_loss_weight']}, router lr multiplier = "
              f"{settings['vedas_lr_multiplier']}; "
              f"the readers read {reading}% of the {args.eval_split} digits / panels (per seed); always answering "
              f"the most frequent {args.eval_split} answer: {majority}%.")
    table = markdown(rows, results, args.seeds, header)
    summary = {
        "command": "python " + " ".join(sys.argv), "commit": _commit(), "machine": platform.platform(),
        "processor": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
        "args": vars(args), "full_method_settings": settings, "reading": readers, "rows": rows,
        # everything each (seed, variant) measured, per-sample correctness included (the paired intervals' input)
        "per_seed": {s: {v: r for v, r in results[s].items() if isinstance(r, dict)} for s in args.seeds},
        "majority_answer_accuracy": {s: results[s]["majority"] for s in args.seeds},
        "latents_matter": latents_matter([results[s][FULL] for s in args.seeds]) if FULL in args.variants else None,
        "minutes_this_invocation": (time.perf_counter() - start) / 60,
    }
    targets = [os.path.join(args.output_dir, "table1")] + ([args.results] if args.results else [])
    for target in targets:
        _write_json(target + ".json", summary)
        with open(target + ".md", "w") as f:
            f.write(table + "\n")
    print("\n" + table)


if __name__ == "__main__":
    main()
