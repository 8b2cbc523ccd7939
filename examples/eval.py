"""Evaluate a Vedas checkpoint (paper table 1 protocol): accuracy, mean AR steps, wall time per sample.

    python examples/eval.py runs/vedas-tiny-digits/final                      # bundled digit task, test split
    python examples/eval.py CKPT --dataset_path data/m3cot_test.jsonl --dataset_format m3cot --num_latent_steps 4
    python examples/eval.py CKPT --num_latent_steps 0 --output_dir runs/eval-cot   # CoT / No-CoT baselines
    python examples/eval.py CKPT --window_images 8                             # + PNGs of the replay windows

Writes `<output_dir>/eval.json` (summary + per-sample predictions) and `<output_dir>/eval.md` (a Markdown row).
"""

import argparse
import json
import os

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

import vedas_hf  # noqa: F401  (registers the Auto classes)
from vedas_hf.convert import check_checkpoint_argument
from vedas_hf.data import DATASET_FORMATS, dataset_adapter, load_records
from vedas_hf.eval import evaluate, markdown_table, window_images


def load_test_records(args) -> list:
    """The records to evaluate: the first `--num_samples` of `--dataset_path` (all of them for 0, the default), or
    that many samples of the bundled task's test split (which needs a positive count; default 100)."""
    if args.num_samples is None:
        args.num_samples = 0 if args.dataset_path else 100
    if args.num_samples < 0 or (args.num_samples == 0 and args.dataset_path is None):
        needs = "0 (all records) or more" if args.dataset_path else "at least 1 (the bundled task has no 'all')"
        raise ValueError(f"--num_samples {args.num_samples}: pass {needs}.")
    if args.dataset_path is None:
        from vedas_hf.toy import make_task

        kwargs = {"num_digits": args.num_digits} if args.task == "digits" else {}
        return make_task(args.task, 0, args.num_samples, seed=args.seed, **kwargs)[1]
    records = load_records(args.dataset_path, adapter=dataset_adapter(args.dataset_format))
    return records[: args.num_samples] if args.num_samples else records


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="Vedas checkpoint folder or Hub id (pin --revision for Hub ids)")
    parser.add_argument("--revision", default=None)
    parser.add_argument("--dataset_path", default=None, help="JSON/JSONL records (default: a bundled task)")
    parser.add_argument("--task", default="digits", help="bundled task without --dataset_path: digits | shapes")
    parser.add_argument("--num_digits", type=int, default=2,
                        help="digits task: digits per image (2, the sum mod 10, as `examples/sft.py` trains)")
    parser.add_argument("--dataset_format", default="canonical", help=" | ".join(DATASET_FORMATS))
    parser.add_argument("--num_samples", type=int, default=None,
                        help="samples to evaluate (default: all records of --dataset_path, 100 of a bundled task)")
    parser.add_argument("--num_latent_steps", type=int, default=None, help="default: the checkpoint's config")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=96)
    parser.add_argument("--output_dir", default=None, help="default: <checkpoint>/eval")
    parser.add_argument("--window_images", type=int, default=0, help="PNGs of the replay windows for N samples")
    parser.add_argument("--name", default="vedas", help="row name in the Markdown table")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    records = load_test_records(args)  # before the model: a bad file or count fails fast
    check_checkpoint_argument(args.checkpoint, "checkpoint")
    model = AutoModelForImageTextToText.from_pretrained(args.checkpoint, trust_remote_code=True,
                                                        revision=args.revision)
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    processor = AutoProcessor.from_pretrained(args.checkpoint, revision=args.revision)
    steps = model.config.num_latent_steps if args.num_latent_steps is None else args.num_latent_steps
    result = evaluate(model, processor, records, num_latent_steps=steps, batch_size=args.batch_size,
                      max_new_tokens=args.max_new_tokens)
    output_dir = args.output_dir or os.path.join(args.checkpoint, "eval")
    os.makedirs(output_dir, exist_ok=True)
    summary = {k: result[k] for k in ("accuracy", "ar_steps", "seconds_per_sample", "num_samples")}
    with open(os.path.join(output_dir, "eval.json"), "w") as f:
        json.dump({**summary, "num_latent_steps": steps, "predictions": result["predictions"]}, f, indent=1)
    table = markdown_table({args.name: result})
    with open(os.path.join(output_dir, "eval.md"), "w") as f:
        f.write(table + "\n")
    if args.window_images and steps > 0:
        window_images(model, processor, records[: args.window_images], os.path.join(output_dir, "windows"), steps)
    print(table)


if __name__ == "__main__":
    main()
