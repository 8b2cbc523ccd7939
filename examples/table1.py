"""Paper table 1 (+ table 3 ablations) on a bundled task, on the CPU.

    python examples/table1.py                      # handwritten digits, the six paper rows, ~20 minutes on 2 CPU cores
    python examples/table1.py --task shapes --output_dir runs/table1-shapes   # easy-VQA counting
    python examples/table1.py --variants cot vedas --num_train_samples 1000   # a subset, smaller

Protocol:
1. A tiny Vedas model is taught to read the images (answer-only, `vedas_hf.toy.pretrain_reader`): the stand-in for
   the pretrained VLM every method of the paper starts from. Test-split images are never shown.
2. Every variant fine-tunes that same reader on the task (`(a + b) * c mod 10` over three digits, or "how many
   panels show a circle?" over three easy-VQA panels) for the same number of epochs:
   No-CoT (answers only), CoT (explicit steps), Vedas (latent curriculum: stage k replaces the first k steps by k
   latents), and the ablations without Routing Depth Scaling (`router_layers="none"`), without visual replay
   (`replay_mode="none"`, which also drops the reconstruction target) and without the reconstruction loss
   (`recon_loss_weight=0`). `--variants ... replay-image-pos` adds Vedas with `replay_positions="image"`.
3. Greedy decoding on the test split (unseen handwriting / renders): accuracy, AR steps (latent steps + generated
   tokens) and time per sample; the table goes to stdout, `<output_dir>/table1.md` and `<output_dir>/table1.json`.
"""

import argparse
import json
import os
import time
from collections import Counter

from transformers import AutoModelForImageTextToText, AutoProcessor

import vedas_hf  # noqa: F401  (registers the Auto classes)
from vedas_hf.eval import evaluate, markdown_table
from vedas_hf.toy import TASKS, make_task, pretrain_reader, toy_sft_config
from vedas_hf.trainer import VedasSFTTrainer


# command-line name -> (table row, data mode, Vedas config overrides, trainer overrides)
VARIANTS = {
    "no-cot": ("No-CoT", "no_cot", {}, {}),
    "cot": ("CoT", "cot", {}, {}),
    "vedas": ("Vedas", "latent", {}, {}),
    "no-rds": ("Vedas w/o RDS", "latent", {"router_layers": "none"}, {}),
    "no-replay": ("Vedas w/o SCF-VR", "latent", {"replay_mode": "none"}, {}),
    "no-recon": ("Vedas w/o recon loss", "latent", {}, {"recon_loss_weight": 0.0}),
    # not in the paper, not run by default: replayed tokens keep their M-RoPE image positions
    "replay-image-pos": ("Vedas, replay at image positions", "latent", {"replay_positions": "image"}, {}),
}
DEFAULT_VARIANTS = ["no-cot", "cot", "vedas", "no-rds", "no-replay", "no-recon"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="digits", choices=sorted(TASKS), help="bundled task (vedas_hf.toy)")
    parser.add_argument("--output_dir", default="runs/table1")
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS,
                        help=f"any of {list(VARIANTS)} (default: {DEFAULT_VARIANTS})")
    parser.add_argument("--num_train_samples", type=int, default=3000)
    parser.add_argument("--num_test_samples", type=int, default=200)
    parser.add_argument("--num_reader_samples", type=int, default=4000, help="reading pretraining samples")
    parser.add_argument("--reader_epochs", type=int, default=None, help="default: 8 for digits, 32 for shapes")
    parser.add_argument("--max_latent_stage", type=int, default=3, help="latent steps of the final stage")
    parser.add_argument("--epochs_per_stage", type=int, default=1)
    parser.add_argument("--num_train_epochs", type=int, default=8,
                        help="epochs of every variant; the latent ones stay at the last stage once they reach it")
    parser.add_argument("--reader", default=None, help="an existing reader checkpoint (skips step 1)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--max_new_tokens", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    return args


def train_variant(variant, reader, train, args):
    """Fine-tune the reader as `variant` (a key of `VARIANTS`); returns the trained model and its processor."""
    _, mode, config_overrides, trainer_overrides = VARIANTS[variant]
    model = AutoModelForImageTextToText.from_pretrained(reader, **config_overrides)
    processor = AutoProcessor.from_pretrained(reader)
    config = toy_sft_config(
        os.path.join(args.output_dir, variant),
        no_cot_baseline=mode == "no_cot", cot_baseline=mode == "cot",
        max_latent_stage=args.max_latent_stage, epochs_per_stage=args.epochs_per_stage,
        num_train_epochs=args.num_train_epochs,
        per_device_train_batch_size=args.batch_size, learning_rate=args.learning_rate, seed=args.seed,
        **trainer_overrides,
    )
    trainer = VedasSFTTrainer(model=model, args=config, train_dataset=train, processing_class=processor)
    trainer.train()
    return trainer.model, processor


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    start = time.perf_counter()
    reader = args.reader or pretrain_reader(
        os.path.join(args.output_dir, "reader"), task=args.task, num_samples=args.num_reader_samples,
        epochs=args.reader_epochs,
        batch_size=args.batch_size, learning_rate=args.learning_rate, seed=args.seed,
        num_latent_steps=args.max_latent_stage, replay_top_k=1, router_top_k=8, recon_window=1,
    )
    train, test = make_task(args.task, args.num_train_samples, args.num_test_samples, seed=args.seed)
    rows = {}
    for variant in args.variants:
        name, mode = VARIANTS[variant][:2]
        model, processor = train_variant(variant, reader, train, args)
        latent_steps = args.max_latent_stage if mode == "latent" else 0
        rows[name] = evaluate(model, processor, test, num_latent_steps=latent_steps,
                              max_new_tokens=args.max_new_tokens, batch_size=16)
        print(f"{name}: accuracy {100 * rows[name]['accuracy']:.1f}%", flush=True)
    table = markdown_table(rows)
    answers = Counter(record["answer"] for record in test)
    majority = answers.most_common(1)[0][1] / len(test) if test else 0.0
    minutes = (time.perf_counter() - start) / 60
    with open(os.path.join(args.output_dir, "table1.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.output_dir, "table1.json"), "w") as f:
        json.dump({"args": vars(args), "minutes": minutes, "majority_answer_accuracy": majority, "rows": rows}, f,
                  indent=1)
    print(f"\n{table}\n\nalways answering the most frequent test answer: {100 * majority:.1f}% | {len(test)} test "
          f"samples | {minutes:.1f} min in total")


if __name__ == "__main__":
    main()
