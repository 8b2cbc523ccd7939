"""Train a Vedas model through the latent curriculum, then evaluate it.

With no arguments it builds a tiny Vedas model offline and teaches it to read the images of the bundled task
(the sum mod 10 of two real handwritten digits from scikit-learn; `vedas_hf.toy.pretrain_reader`, the stand-in for
a pretrained VLM), then trains it on the CPU through every curriculum stage (the two reading steps become latents),
saves a loadable checkpoint and prints the test accuracy (about 10 minutes on 2 cores). The settings are those of
the Vedas row of `examples/table1.py` except for 6 epochs (not 12), lambda 0.2 (not 1.0) and the base router learning
rate, to keep it short: expect about 75% test accuracy rather than the table's 90% (see docs/results.md):

    python examples/sft.py
    python examples/sft.py --toy_task shapes --output_dir runs/vedas-tiny-shapes   # the easy-VQA counting task

On real data and a converted checkpoint (see `python -m vedas_hf.convert`), with any accelerate setup:

    accelerate launch --config_file examples/accelerate_configs/deepspeed_zero2.yaml examples/sft.py \
        --model_name_or_path runs/vedas-qwen2-vl-2b --dataset_path data/m3cot_train.jsonl --dataset_format m3cot \
        --output_dir runs/m3cot --use_peft --bf16 True --gradient_checkpointing --learning_rate 4e-5 \
        --per_device_train_batch_size 8

Every `VedasSFTConfig` / `SFTConfig` / `TrainingArguments` field is a command-line flag. The demo's settings
(`DEMO_DEFAULTS`: up to 2 latents, one epoch per stage, 6 epochs, lr 2e-3, lambda 0.2, float32, no activation checkpointing,
output in `runs/vedas-tiny-digits`) apply only without `--dataset_path`; on the user's data every default is
`VedasSFTConfig`'s (4 stages of 4 epochs, TRL's bf16 and activation checkpointing on). With `--eval_strategy steps`
(or `epoch`) the evaluation records (`--eval_dataset_path`, or the bundled task's test split) also give the eval loss
during training; `--resume_from_checkpoint True` continues from the last checkpoint in `--output_dir`.
"""

import json
import os
import sys
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor
from trl import TrlParser

import vedas_hf  # noqa: F401  (registers the Auto classes)
from vedas_hf.data import DATASET_FORMATS, NormalizedRecords, dataset_adapter, load_records
from vedas_hf.eval import evaluate
from vedas_hf.convert import check_checkpoint_argument
from vedas_hf.trainer import CHECKPOINTING_FIELD, VedasSFTConfig, VedasSFTTrainer, vedas_lora_config


@dataclass
class VedasScriptArguments:
    """Model and data of `examples/sft.py`; leave both unset for the bundled tiny demo."""

    model_name_or_path: str | None = field(default=None, metadata={"help": "Vedas checkpoint (None: tiny demo model)."})
    dataset_path: str | None = field(
        default=None, metadata={"help": "JSON/JSONL records or an image folder with metadata.jsonl (None: a bundled task)."}
    )
    eval_dataset_path: str | None = field(default=None, metadata={"help": "Evaluation records."})
    dataset_format: str = field(default="canonical", metadata={"help": " | ".join(DATASET_FORMATS)})
    toy_task: str = field(default="digits", metadata={"help": "Bundled task: digits | shapes (vedas_hf.toy)."})
    num_train_samples: int = field(default=2000, metadata={"help": "Bundled task: training samples."})
    num_eval_samples: int = field(default=200, metadata={"help": "Bundled task: evaluation samples."})
    toy_num_digits: int = field(default=2, metadata={"help": "Digits task: digits per image (2: their sum mod 10)."})
    toy_digit_size: int = field(default=16, metadata={"help": "Digits task: tile side in pixels."})
    toy_rows: int = field(default=2, metadata={"help": "Digits task: tile rows (each digit in a random one)."})
    use_peft: bool = field(default=False, metadata={"help": "LoRA on the language model (r=64, alpha=16)."})
    lora_r: int = field(default=64, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    eval_max_new_tokens: int = field(default=96, metadata={"help": "Tokens generated per evaluation sample."})


DEMO_DEFAULTS = dict(
    output_dir="runs/vedas-tiny-digits",
    learning_rate=2e-3,
    per_device_train_batch_size=32,
    epochs_per_stage=1,
    max_latent_stage=2,
    num_train_epochs=6,
    recon_loss_weight=0.2,
    lr_scheduler_type="cosine",
    warmup_steps=20,
    logging_steps=25,
    save_strategy="epoch",
    save_total_limit=2,
    report_to="none",
    bf16=False,
    seed=0,
)
DEMO_DEFAULTS[CHECKPOINTING_FIELD] = False  # TRL's default is on; pass --activation_checkpointing for large models


def toy_task_kwargs(script_args) -> dict:
    """Generator arguments of the bundled task named by `--toy_task`."""
    if script_args.toy_task == "digits":
        return {"num_digits": script_args.toy_num_digits, "digit_size": script_args.toy_digit_size,
                "rows": script_args.toy_rows}
    return {}


def load_data(script_args, training_args):
    """Train and eval records: the user's files, or a bundled task."""
    if script_args.dataset_path is None:
        from vedas_hf.toy import make_task

        return make_task(script_args.toy_task, script_args.num_train_samples, script_args.num_eval_samples,
                         seed=training_args.seed, **toy_task_kwargs(script_args))
    adapter = dataset_adapter(script_args.dataset_format)
    train = load_records(script_args.dataset_path, adapter=adapter)
    test = load_records(script_args.eval_dataset_path, adapter=adapter) if script_args.eval_dataset_path else []
    return train, test


def validate_records(records, training_args, source: str, require_steps: bool = True) -> None:
    """Check every record as training will (fields, reasoning steps, readable images), so a malformed file fails
    before the model is loaded; `ValueError` naming `source`, the record index and the field. The normalised copies
    are dropped (the trainer normalises again), so memory stays that of the raw records."""
    try:
        NormalizedRecords(records, max_steps=training_args.max_reasoning_steps, require_steps=require_steps)
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None


def load_model(script_args, training_args):
    """The checkpoint to train, or for the demo a tiny Vedas model pretrained to read the bundled task's images
    (written next to the outputs; with 16 px digits each digit is 2 x 2 merged visual tokens, so a step replays K=4
    tokens, the reconstruction window is 2 x 2 and the routers refine alpha=2 tokens of each chunk)."""
    path = script_args.model_name_or_path
    if path is None and script_args.dataset_path is not None:
        raise ValueError(
            f"--dataset_path {script_args.dataset_path} needs --model_name_or_path: a Vedas checkpoint folder or Hub "
            "repo (convert a stock one with python -m vedas_hf.convert). Without both, sft.py trains the bundled demo."
        )
    if path is not None:
        check_checkpoint_argument(path, "--model_name_or_path")
    else:
        from vedas_hf.toy import pretrain_reader

        path = pretrain_reader(
            os.path.join(training_args.output_dir, "reader"), task=script_args.toy_task,
            task_kwargs=toy_task_kwargs(script_args), seed=training_args.seed,
            num_latent_steps=training_args.max_latent_stage, replay_top_k=4, router_top_k=2, recon_window=2,
        )
    dtype = torch.bfloat16 if training_args.bf16 else None
    model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True, dtype=dtype)
    processor = AutoProcessor.from_pretrained(path)
    return model, processor


def resume_argument(value):
    """`--resume_from_checkpoint`: a checkpoint folder, or `True` / `true` for the last checkpoint in output_dir (as
    `trainer.train(resume_from_checkpoint=True)`); `False` / `false` / unset: start afresh."""
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true" or None
    return value


def uses_bundled_task(argv) -> bool:
    """Whether the command line (flags or `--config` file) leaves `--dataset_path` unset, i.e. trains on a bundled
    task; `--help` shows the demo's defaults."""
    if "-h" in argv or "--help" in argv:
        return True
    parsed = TrlParser((VedasScriptArguments,)).parse_args_and_config(argv, return_remaining_strings=True)
    return parsed[0].dataset_path is None


def main(argv=None):
    """Train (and evaluate) as the command line `argv` says; returns the trainer."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = TrlParser((VedasScriptArguments, VedasSFTConfig))
    if uses_bundled_task(argv):  # the demo's settings; a run on the user's data keeps VedasSFTConfig's (TRL's)
        parser.set_defaults(**DEMO_DEFAULTS)
    script_args, training_args = parser.parse_args_and_config(argv)
    # the data first: a missing or malformed file fails before any model is loaded (or the demo reader pretrained)
    train_records, test_records = load_data(script_args, training_args)
    evaluating = training_args.eval_strategy != "no"
    if evaluating and not test_records:
        raise ValueError(
            f"--eval_strategy {training_args.eval_strategy.value} needs evaluation records: pass --eval_dataset_path "
            "(or --num_eval_samples > 0 for a bundled task), or --eval_strategy no."
        )
    if script_args.dataset_path is not None:  # the bundled tasks are generated valid
        validate_records(train_records, training_args, "--dataset_path " + script_args.dataset_path)
        # evaluation records need reasoning steps only for the eval loss during training
        validate_records(test_records, training_args, f"--eval_dataset_path {script_args.eval_dataset_path}",
                         require_steps=evaluating)
    model, processor = load_model(script_args, training_args)
    peft_config = vedas_lora_config(r=script_args.lora_r, lora_alpha=script_args.lora_alpha) if script_args.use_peft else None
    trainer = VedasSFTTrainer(
        model=model, args=training_args, train_dataset=train_records, processing_class=processor,
        eval_dataset=test_records if evaluating else None, peft_config=peft_config,
    )
    trainer.train(resume_from_checkpoint=resume_argument(training_args.resume_from_checkpoint))
    final_dir = os.path.join(training_args.output_dir, "final")
    trainer.save_model(final_dir)
    processor.save_pretrained(final_dir)

    if test_records and trainer.accelerator.is_main_process:
        model = trainer.model.merge_and_unload() if script_args.use_peft else trainer.model
        steps = model.config.num_latent_steps  # what the trainer set: the last curriculum stage actually trained
        result = evaluate(model, processor, test_records, num_latent_steps=steps,
                          max_new_tokens=script_args.eval_max_new_tokens)
        summary = {k: result[k] for k in ("accuracy", "ar_steps", "seconds_per_sample", "num_samples")}
        with open(os.path.join(training_args.output_dir, "eval.json"), "w") as f:
            json.dump({**summary, "predictions": result["predictions"]}, f, indent=1)
        print(f"Test accuracy {100 * summary['accuracy']:.1f}% over {summary['num_samples']} samples, "
              f"{summary['ar_steps']:.1f} AR steps, {1000 * summary['seconds_per_sample']:.1f} ms/sample; "
              f"checkpoint in {final_dir}")
    return trainer


if __name__ == "__main__":
    main()
