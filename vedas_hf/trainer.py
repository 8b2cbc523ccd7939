"""`VedasSFTTrainer`: TRL's `SFTTrainer` with the Vedas curriculum and the reconstruction loss (eq. 13).

Curriculum (paper section 3.4, Coconut-style): stage k replaces the first k reasoning steps of every record with k
`<|latent|>` tokens. The stage advances every `epochs_per_stage` epochs up to `max_latent_stage`; it is a function
of the epoch only, so a run resumed from a checkpoint continues at the same stage with the same data order.

The loss is computed by the model's own latent multi-pass forward (TRL's fused LM head never runs the latent
passes), `ce_loss + lambda * recon_loss`; `ce_loss`, `recon_loss` and `stage` are logged through `_metrics`.
"""

import copy
import json
import math
import os
import random
import shutil
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field

import safetensors.torch
import torch
from transformers import TrainerCallback
from transformers.utils import logging
from transformers.core_model_loading import revert_weight_conversion
from transformers.trainer import TRAINING_ARGS_NAME, _is_peft_model
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from transformers.utils import ADAPTER_SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_NAME
from trl import SFTConfig, SFTTrainer

from .data import (END_LATENT, IGNORE_INDEX, LATENT, START_LATENT, NormalizedRecords, VedasDataCollator,
                   build_stage_example, check_image_sizes, example_length)


logger = logging.get_logger(__name__)


# transformers >= 5.24 calls activation checkpointing `activation_checkpointing` (`gradient_checkpointing` before,
# still accepted there with a FutureWarning)
CHECKPOINTING_FIELD = ("activation_checkpointing" if "activation_checkpointing" in SFTConfig.__dataclass_fields__
                       else "gradient_checkpointing")


@dataclass
class VedasSFTConfig(SFTConfig):
    r"""
    [`~trl.SFTConfig`] plus the Vedas curriculum: up to 4 latent steps (T_r, paper section 4.1), 4 epochs per stage
    (the paper trains 16 epochs in all and gives no per-stage count), and by default as many epochs as the
    curriculum has.

    Parameters:
        num_train_epochs (`float` or `None`, *optional*, defaults to `None`):
            `None`: the whole curriculum, `(max_latent_stage + 1) * epochs_per_stage` epochs (20 with the defaults)
            when the stage advances, else 3 (the transformers default). A shorter schedule (fewer epochs, or
            `max_steps`) ends at an earlier stage: training logs a warning, the model's `num_latent_steps` follows
            the stage actually trained, and evaluation renders that stage.
        gradient_checkpointing (`bool`, *optional*, defaults to `True`):
            TRL's default (`activation_checkpointing` on transformers >= 5.24, where the old name is a deprecated
            alias; both flags work). Works with the latent passes (a layer's backward replay reads the shared KV cache as it
            was and writes nothing); needs non-reentrant checkpointing, the transformers default.
        epochs_per_stage (`int`, *optional*, defaults to `4`):
            Epochs spent at each curriculum stage before one more reasoning step becomes a latent.
        max_latent_stage (`int`, *optional*, defaults to `4`):
            Last stage: at most this many latents (the model's `num_latent_steps` at inference).
        curriculum (`bool`, *optional*, defaults to `True`):
            Advance through stages 0..max; when `False`, train at `max_latent_stage` from the first step.
        recon_loss_weight (`float` or `None`, *optional*, defaults to `None`):
            lambda of eq. 13; `None` keeps the model config's `recon_loss_weight`.
        recon_crop_size (`int` or `None`, *optional*, defaults to `None`):
            Side in pixels of the square each reconstruction crop is resized to before it is re-encoded (a multiple
            of the vision tower's `patch_size * spatial_merge_size`); `None` keeps the model config's
            `recon_crop_size` (by default: crops resized to their image's size). Sets the model config's field.
        earlier_stage_probability (`float`, *optional*, defaults to `0.0`):
            Coconut's stage mixing: at stage k > 0, each training record is rendered with this probability at a stage
            drawn uniformly from 0..k-1 instead (fewer latents, more explicit steps), so the model keeps answering
            after fewer latent steps than it was last trained on. The draw depends only on the seed, the epoch and the
            record, so a resumed run renders the same examples. Evaluation always renders the last stage.
        vedas_lr_multiplier (`float`, *optional*, defaults to `1.0`):
            The modules Vedas adds to the backbone (the routers with their gates e(d), and TokenSR) train at
            `learning_rate * vedas_lr_multiplier`. The gates start at zero (so a converted checkpoint equals the stock
            model) and their gradient is small next to the backbone's; a larger rate lets routing leave that start
            within a short fine-tune.
        cot_baseline (`bool`, *optional*, defaults to `False`):
            Evaluation baseline: train on the full explicit reasoning chain, never latents.
        no_cot_baseline (`bool`, *optional*, defaults to `False`):
            Evaluation baseline: train on the answer only.
        pad_latent_to_max (`bool`, *optional*, defaults to `True`):
            Records with fewer steps than the stage still get `stage` latents (all their steps removed).
        use_latent_markers (`bool`, *optional*, defaults to `True`):
            Surround latents with `<|start-latent|>` / `<|end-latent|>` (needed by `generate`).
        max_reasoning_steps (`int`, *optional*, defaults to `4`):
            A `rationale` is split on blank lines into at most this many steps (paper fig. 3).
        save_on_sigterm (`bool`, *optional*, defaults to `True`):
            On SIGTERM (preemption, `kill`, a scheduler's time limit) finish the current optimizer step, save a
            checkpoint and stop, so `resume_from_checkpoint=True` continues exactly there.
        max_length (`int` or `None`, *optional*, defaults to `None`):
            Longer examples are truncated on the right (TRL's meaning), in their reasoning and answer only; an
            example whose prompt (images included) and latent block leave no room for one target token is an error.
            `None` (the default here; TRL's is 1024, which one Qwen2-VL image alone can exceed): no truncation.

    `packing`, `padding_free` and `dataloader_persistent_workers` with an advancing curriculum are rejected: the
    curriculum renders and collates its own examples, and a persistent worker would keep rendering the first stage.
    """

    num_train_epochs: float | None = field(
        default=None,
        metadata={"help": "Epochs in all (None: the whole curriculum, (max_latent_stage + 1) x epochs_per_stage)."},
    )
    epochs_per_stage: int = field(default=4, metadata={"help": "Epochs per curriculum stage."})
    max_latent_stage: int = field(default=4, metadata={"help": "Last curriculum stage (max latents)."})
    curriculum: bool = field(default=True, metadata={"help": "Advance stages; False trains at the last stage."})
    recon_loss_weight: float | None = field(default=None, metadata={"help": "lambda of eq. 13 (None: model config)."})
    recon_crop_size: int | None = field(
        default=None, metadata={"help": "Re-encode reconstruction crops at N x N pixels (None: model config)."}
    )
    earlier_stage_probability: float = field(
        default=0.0, metadata={"help": "Probability of rendering a training record at a random earlier stage."}
    )
    vedas_lr_multiplier: float = field(
        default=1.0, metadata={"help": "Learning-rate multiplier for the routers (gates included) and TokenSR."}
    )
    cot_baseline: bool = field(default=False, metadata={"help": "Train on explicit CoT only (baseline)."})
    no_cot_baseline: bool = field(default=False, metadata={"help": "Train on answers only (baseline)."})
    pad_latent_to_max: bool = field(default=True, metadata={"help": "Always use `stage` latents."})
    use_latent_markers: bool = field(default=True, metadata={"help": "Wrap latents in start/end markers."})
    max_reasoning_steps: int = field(default=4, metadata={"help": "Max steps when splitting a rationale."})
    save_on_sigterm: bool = field(default=True, metadata={"help": "Save a checkpoint and stop on SIGTERM."})
    max_length: int | None = field(
        default=None,
        metadata={"help": "Truncate examples on the right to this many tokens, in their reasoning and answer only "
                          "(None: no limit)."},
    )

    if "activation_checkpointing" in SFTConfig.__dataclass_fields__:
        # transformers >= 5.24 renamed `gradient_checkpointing`; TRL's default of the old name (True) would warn on
        # every run. Unset here, TRL's default goes to the new name in __post_init__ (a user's old name still wins).
        gradient_checkpointing: bool | None = field(
            default=None,
            metadata={"help": "Deprecated alias of activation_checkpointing (default: on).", "nargs": "?",
                      "const": True},  # a bare --gradient_checkpointing means True, as in transformers
        )

    def __post_init__(self):
        if getattr(self, "activation_checkpointing", False) is None and self.gradient_checkpointing is None:
            self.activation_checkpointing = True  # TRL's default, under its new name
        # The dataset is built per stage on the fly and batched by VedasDataCollator; TRL must not tokenize it or drop
        # its columns.
        self.remove_unused_columns = False
        self.dataset_kwargs = {**(self.dataset_kwargs or {}), "skip_prepare_dataset": True}
        if self.num_train_epochs is None:
            self.num_train_epochs = self.curriculum_epochs if self.curriculum_advances else 3.0
        try:
            super().__post_init__()
        except ValueError as error:
            if "use_cpu" not in str(error) or not self.bf16:
                raise
            raise ValueError(
                "bf16=True (TRL's default) needs a GPU and none was found: pass --bf16 False (bf16=False) to train in "
                "float32 on the CPU, or --use_cpu True to keep bf16 autocast on the CPU (several times slower)."
            ) from error
        if self.cot_baseline and self.no_cot_baseline:
            raise ValueError("cot_baseline and no_cot_baseline are exclusive; set at most one of them.")
        for name in ("epochs_per_stage", "max_reasoning_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1.")
        if self.max_latent_stage < 0:
            raise ValueError(f"max_latent_stage={self.max_latent_stage} must be >= 0.")
        if self.recon_loss_weight is not None and self.recon_loss_weight < 0:
            raise ValueError(f"recon_loss_weight={self.recon_loss_weight} must be >= 0.")
        if not isinstance(self.earlier_stage_probability, (int, float)) or not 0 <= self.earlier_stage_probability <= 1:
            raise ValueError(f"earlier_stage_probability={self.earlier_stage_probability!r} must be in [0, 1].")
        if not isinstance(self.vedas_lr_multiplier, (int, float)) or not self.vedas_lr_multiplier > 0:
            raise ValueError(f"vedas_lr_multiplier={self.vedas_lr_multiplier!r} must be a number > 0.")
        if self.recon_crop_size is not None and self.recon_crop_size < 1:
            raise ValueError(f"recon_crop_size={self.recon_crop_size} must be >= 1 pixels (or None).")
        for name in ("packing", "padding_free"):
            if getattr(self, name):
                raise ValueError(
                    f"{name}=True is not supported: the latent curriculum renders each record at the current stage "
                    "and VedasDataCollator aligns the latent block of every row in a padded batch. Set "
                    f"{name}=False."
                )
        if getattr(self, "truncation_mode", "keep_start") != "keep_start":
            raise ValueError(
                f"truncation_mode={self.truncation_mode!r} would cut the prompt and its images; use 'keep_start' "
                "(examples are truncated on the right, in their reasoning and answer only)."
            )
        if self.dataloader_persistent_workers and self.dataloader_num_workers > 0 and self.curriculum_advances:
            raise ValueError(
                "dataloader_persistent_workers=True: persistent workers keep the curriculum stage they started with "
                "(the stage is set in the main process each epoch). Set dataloader_persistent_workers=False (workers "
                "are then re-created every epoch at the new stage), or curriculum=False."
            )

    @property
    def curriculum_epochs(self) -> int:
        """Epochs until the last stage has been trained for `epochs_per_stage` epochs."""
        return (self.max_latent_stage + 1) * self.epochs_per_stage

    @property
    def curriculum_advances(self) -> bool:
        """Whether the stage can change during training (latent mode, curriculum on, `max_latent_stage > 0`)."""
        return self.data_mode == "latent" and self.curriculum and self.max_latent_stage > 0

    @property
    def inference_latent_steps(self) -> int:
        """Latent steps the fully trained model runs at inference: `max_latent_stage`, 0 for the baselines (which
        decode without latents). A schedule that ends earlier teaches `stage_for_epoch` of its last epoch."""
        return self.max_latent_stage if self.data_mode == "latent" else 0

    @property
    def data_mode(self) -> str:
        """`"cot"`, `"no_cot"` or `"latent"`."""
        return "cot" if self.cot_baseline else "no_cot" if self.no_cot_baseline else "latent"

    @property
    def last_stage(self) -> int:
        """The last stage of the schedule: from `num_train_epochs`, or `max_latent_stage` with `max_steps` (whose
        epoch count depends on the data; the trainer warns at the start of training if it ends earlier)."""
        if self.max_steps is not None and self.max_steps > 0:
            return self.stage_for_epoch(10**9)
        return self.stage_for_epoch(max(math.ceil(self.num_train_epochs), 1) - 1)

    def stage_for_epoch(self, epoch: int) -> int:
        """Curriculum stage of (0-based) `epoch`."""
        if self.data_mode != "latent":
            return 0
        if not self.curriculum:
            return self.max_latent_stage
        return min(epoch // self.epochs_per_stage, self.max_latent_stage)


class StageRenderer:
    """Renders canonical records at the current curriculum `stage` (a `datasets` transform).

    Every record is validated when the renderer is built, so a malformed record fails before training starts, not
    when a later stage or epoch reaches it: its fields and images ([`NormalizedRecords`]), each image's size against
    the image processor's limits (e.g. Qwen2-VL refuses an aspect ratio of 200 or more), with `max_length` its
    fit at the largest stage of the schedule (which renders every record once more), and without it its length at
    that stage against `position_limit` (the model's `max_position_embeddings`; counted from text and image sizes).
    Images are decoded when a record is rendered.
    """

    def __init__(self, records, processor, args: VedasSFTConfig, stage: int = 0, position_limit: int | None = None):
        self.processor = processor
        self.args = args
        self.position_limit = position_limit
        self.stage = stage
        self.epoch = 0  # set with the stage each epoch (the earlier-stage draws depend on it)
        self.mix_earlier_stages = False  # the training renderer mixes (`earlier_stage_probability`)
        self.records = NormalizedRecords(records, max_steps=args.max_reasoning_steps, tokenizer=processor.tokenizer,
                                         check=self._check)

    def _check(self, record: dict) -> None:
        """`ValueError` for what rendering `record` would refuse at some stage of the schedule."""
        check_image_sizes(record, self.processor)
        last = self.args.last_stage  # the longest latent block of the schedule
        if self.args.max_length is not None:
            try:
                self._render(record, last)
            except ValueError as error:
                raise ValueError(f"at curriculum stage {last}: {error}") from None
        elif self.position_limit is not None:
            length = example_length(
                record, last, processor=self.processor, max_latent_stage=self.args.max_latent_stage,
                pad_latent_to_max=self.args.pad_latent_to_max, use_latent_markers=self.args.use_latent_markers,
                mode=self.args.data_mode,
            )
            if length > self.position_limit:
                raise ValueError(
                    f"it is {length} tokens at curriculum stage {last} (images included), more than the model's "
                    f"max_position_embeddings={self.position_limit}. Shorten it or use smaller images (the processor's "
                    "max_pixels), leave it out, or set max_length to truncate its reasoning and answer."
                )

    def _render(self, record: dict, stage: int) -> dict:
        return build_stage_example(
            record,
            stage,
            processor=self.processor,
            max_latent_stage=self.args.max_latent_stage,
            pad_latent_to_max=self.args.pad_latent_to_max,
            use_latent_markers=self.args.use_latent_markers,
            mode=self.args.data_mode,
            max_length=self.args.max_length,
        )

    def stage_of(self, index: int) -> int:
        """The stage record `index` is rendered at this epoch: the current one, or with `earlier_stage_probability`
        (training renderer only) one drawn from 0..stage-1, from a generator seeded by (seed, epoch, index)."""
        probability = self.args.earlier_stage_probability if self.mix_earlier_stages else 0.0
        if probability == 0 or self.stage == 0 or self.args.data_mode != "latent":
            return self.stage
        rng = random.Random(f"{self.args.seed}-{self.epoch}-{index}")
        return rng.randrange(self.stage) if rng.random() < probability else self.stage

    def example(self, index: int) -> dict:
        """The tokenised example of record `index` at its stage this epoch (a `ValueError` names the record)."""
        record = self.records[index]  # its errors name the record already
        try:
            return self._render(record, self.stage_of(index))
        except ValueError as error:
            raise ValueError(f"Record {index}: {error}") from None

    def __call__(self, batch: dict) -> dict:
        examples = [self.example(i) for i in batch["record_index"]]
        keys = dict.fromkeys(key for e in examples for key in e)  # text-only rows have no pixel_values: None there
        return {key: [e.get(key) for e in examples] for key in keys}


def curriculum_dataset(records, processor, args: VedasSFTConfig, stage: int = 0, name: str = "train_dataset",
                       position_limit: int | None = None):
    """A `datasets.Dataset` of record indices whose rows are rendered on the fly by a [`StageRenderer`]; returns
    `(dataset, renderer)`. `name` (the trainer argument) goes into the errors; `position_limit`: see the renderer."""
    from datasets import Dataset

    if isinstance(records, dict):
        raise ValueError(
            f"{name} is a dict of splits ({', '.join(map(str, records))}); pass one split's records, e.g. "
            f"dataset['train']."
        )
    if len(records) == 0:
        raise ValueError(f"{name} has no records; check the dataset path, split or sample count.")
    renderer = StageRenderer(records, processor, args, stage, position_limit=position_limit)
    dataset = Dataset.from_dict({"record_index": list(range(len(renderer.records)))})
    dataset.set_transform(renderer)
    return dataset, renderer


class CurriculumCallback(TrainerCallback):
    """Sets the stage of the training renderers at the start of every epoch (also after a resume), and calls
    `on_stage(stage)` then; at the start of training, computes the last stage the schedule reaches and calls
    `on_final_stage(stage)` (with a warning when that is before `max_latent_stage`)."""

    def __init__(self, renderers, args: VedasSFTConfig, on_stage=None, on_final_stage=None):
        self.renderers = renderers
        self.args = args
        self.on_stage, self.on_final_stage = on_stage, on_final_stage
        self.stage = None

    def on_train_begin(self, args, state, control, **kwargs):
        epochs = state.num_train_epochs  # whole epochs, the last one possibly partial (max_steps)
        final = self.args.stage_for_epoch(max(epochs, 1) - 1)
        if final < self.args.inference_latent_steps:
            schedule = (f"max_steps={args.max_steps}, within epoch {epochs}" if args.max_steps > 0
                        else f"{args.num_train_epochs:g} epoch{'' if args.num_train_epochs == 1 else 's'}")
            logger.warning(
                f"The training schedule ({schedule}) ends at curriculum stage {final}, before "
                f"max_latent_stage={self.args.max_latent_stage} (epochs_per_stage={self.args.epochs_per_stage}): the "
                f"model will run {final} latent steps. Train for {self.args.curriculum_epochs} epochs (the default "
                "num_train_epochs=None does), or lower max_latent_stage / epochs_per_stage."
            )
        if self.on_final_stage is not None:
            self.on_final_stage(final)

    def on_epoch_begin(self, args, state, control, **kwargs):
        epoch = math.floor(state.epoch + 1e-4) if state.epoch else 0
        self.stage = self.args.stage_for_epoch(epoch)
        for renderer in self.renderers:
            renderer.stage, renderer.epoch = self.stage, epoch
        if self.on_stage is not None:
            self.on_stage(self.stage)
        return control


class SaveOnSigtermCallback(TrainerCallback):
    """Turns SIGTERM into "save a checkpoint after this optimizer step, then stop" (main thread only)."""

    def __init__(self):
        self.received = False
        self._previous = None

    def _handle(self, signum, frame):
        self.received = True

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def on_step_end(self, args, state, control, **kwargs):
        if self.received:
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()

    def restore(self):
        """Put back the SIGTERM handler found at `on_train_begin` (also called when `train()` raises)."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


class OutputDirLock:
    """An exclusive lock on a training run's output folder (`<output_dir>/.vedas_train.lock`, `filelock`), held by
    the main process for the whole of `train()`, so a second run in the same folder fails at once instead of
    replacing the first run's checkpoints. The operating system drops the lock when its process ends, so a crashed
    run leaves none behind; `.vedas_train.json` says who holds it (process, host, start time, command)."""

    def __init__(self, output_dir: str):
        from filelock import FileLock

        self.output_dir = output_dir
        self.owner_path = os.path.join(output_dir, ".vedas_train.json")
        self._lock = FileLock(os.path.join(output_dir, ".vedas_train.lock"), timeout=0)

    def acquire(self) -> None:
        """Take the lock, or raise `ValueError` naming the run that holds it and the fix."""
        from filelock import Timeout

        os.makedirs(self.output_dir, exist_ok=True)
        try:
            self._lock.acquire()
        except Timeout:
            try:
                with open(self.owner_path) as f:
                    owner = json.load(f)
                holder = (f"process {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}: "
                          f"{owner.get('command')}")
            except (OSError, ValueError):
                holder = "another process"
            raise ValueError(
                f"output_dir={self.output_dir!r} is in use by another training run ({holder}). Give this run its own "
                "--output_dir, or wait for that run to finish (to resume it, use its own command)."
            ) from None
        with open(self.owner_path, "w") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
                       "started": time.strftime("%Y-%m-%d %H:%M:%S")}, f)

    def release(self) -> None:
        try:
            os.remove(self.owner_path)
        except OSError:
            pass
        self._lock.release()


def base_model(model):
    """The model itself, under a PEFT wrapper when there is one."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


LATENT_TOKEN_FIELDS = {LATENT: "latent_token_id", START_LATENT: "start_latent_token_id",
                       END_LATENT: "end_latent_token_id"}
CONVERT_HINT = "python -m vedas_hf.convert STOCK_FOLDER VEDAS_FOLDER"


def check_vedas_model(model, processor) -> None:
    """`ValueError` unless `model` (or the base model under a PEFT wrapper) is a Vedas model and the processor's
    tokenizer holds its latent tokens under the config's ids, naming the `convert` command that makes one."""
    config = getattr(base_model(model), "config", None)
    model_type = getattr(config, "model_type", None)
    if config is None or not str(model_type).startswith("vedas_") or not hasattr(config, "latent_token_id"):
        raise ValueError(
            f"The model is a {model_type!r} checkpoint, not a Vedas one: the curriculum needs the latent tokens and "
            f"the latent forward. Convert it first ({CONVERT_HINT}) and train the converted folder."
        )
    tokenizer = getattr(processor, "tokenizer", processor)
    vocabulary = tokenizer.get_vocab()
    for token, field_name in LATENT_TOKEN_FIELDS.items():
        expected = getattr(config, field_name)
        if vocabulary.get(token) != expected:
            raise ValueError(
                f"The tokenizer maps {token!r} to {vocabulary.get(token)!r} but the model's {field_name} is "
                f"{expected!r}: load the processor from the converted checkpoint folder ({CONVERT_HINT} writes both)."
            )


def _position_limit(model, args: VedasSFTConfig) -> int | None:
    """The text model's `max_position_embeddings` (records are checked against it), with a warning when `max_length`
    allows longer examples."""
    config = base_model(model).config
    limit = getattr(getattr(config, "text_config", config), "max_position_embeddings", None)
    if limit and args.max_length is not None and args.max_length > limit:
        logger.warning(
            f"max_length={args.max_length} is above the model's max_position_embeddings={limit}: examples are "
            f"truncated at max_length, so some may run past the positions the model was trained on; set "
            f"max_length <= {limit}."
        )
    return limit


class VedasSFTTrainer(SFTTrainer):
    """[`~trl.SFTTrainer`] for Vedas latent reasoning.

    `train_dataset` / `eval_dataset` are lists of canonical CoT records (dicts, see `vedas_hf.data`), rendered on
    the fly at the current stage; `processing_class` is the Qwen2-VL processor. The eval dataset (or a dict of
    them, evaluated and logged by name) is rendered at the final stage (what the trained model will run). The
    model config's `num_latent_steps` is set to what training teaches (`max_latent_stage`, 0 for the baselines), so
    saved checkpoints `generate` the way they were trained; during training it follows the current stage, so a
    checkpoint (or a schedule that ends before the last stage) runs the stage it was trained at.
    """

    def __init__(self, model, args: VedasSFTConfig, train_dataset=None, eval_dataset=None, processing_class=None,
                 data_collator=None, callbacks=None, **kwargs):
        if not isinstance(args, VedasSFTConfig):
            raise ValueError(f"args must be a VedasSFTConfig, got {type(args).__name__}.")
        if processing_class is None:
            raise ValueError("Pass the model's processor as processing_class (it renders images and prompts).")
        check_vedas_model(model, processing_class)
        self._position_limit = _position_limit(model, args)
        renderers = []
        if train_dataset is not None:
            train_dataset, renderer = curriculum_dataset(train_dataset, processing_class, args, args.stage_for_epoch(0),
                                                         position_limit=self._position_limit)
            renderer.mix_earlier_stages = True
            renderers.append(renderer)
        self.eval_stage = args.stage_for_epoch(10**9)
        self._eval_renderers = []
        if isinstance(eval_dataset, dict):  # {name: records}, as `Trainer` accepts (a DatasetDict included)
            eval_dataset = {name: self._eval_dataset(records, processing_class, args, f"eval_dataset[{name!r}]")
                            for name, records in eval_dataset.items()}
        elif eval_dataset is not None:
            eval_dataset = self._eval_dataset(eval_dataset, processing_class, args, "eval_dataset")
        self.curriculum_callback = CurriculumCallback(
            renderers, args, on_stage=self._on_stage, on_final_stage=self._on_final_stage
        )
        self.sigterm_callback = SaveOnSigtermCallback() if args.save_on_sigterm else None
        extra_callbacks = [self.sigterm_callback] if self.sigterm_callback else []
        self._staging_dir = None
        super().__init__(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            data_collator=data_collator or VedasDataCollator(processing_class),
            callbacks=[self.curriculum_callback, *extra_callbacks, *(callbacks or [])],
            **kwargs,
        )
        # compute_loss normalises the loss for gradient accumulation itself (token count over all micro-batches for
        # the cross-entropy, number of micro-batches for the reconstruction term): Trainer must not divide again.
        self.model_accepts_loss_kwargs = True
        if args.recon_loss_weight is not None:
            self._vedas_config().recon_loss_weight = args.recon_loss_weight
        if args.recon_crop_size is not None:
            config = self._vedas_config()
            config.check_recon_crop_size(args.recon_crop_size)  # against the vision tower, before anything changes
            config.recon_crop_size = args.recon_crop_size
        self._set_inference_latent_steps(args.inference_latent_steps)

    def _eval_dataset(self, records, processor, args, name):
        dataset, renderer = curriculum_dataset(records, processor, args, stage=self.eval_stage, name=name,
                                               position_limit=self._position_limit)
        self._eval_renderers.append(renderer)
        return dataset

    def _on_stage(self, stage: int) -> None:
        """A new epoch's stage: the model now learns to run `stage` latent steps (saved checkpoints say so)."""
        if self.args.data_mode == "latent":
            self._set_inference_latent_steps(stage)

    def _on_final_stage(self, stage: int) -> None:
        """The last stage the schedule reaches is what evaluation renders (what the trained model will run)."""
        self.eval_stage = stage
        for renderer in self._eval_renderers:
            renderer.stage = stage

    def _set_inference_latent_steps(self, steps: int) -> None:
        """`num_latent_steps` of the model config (and of its generation config where set there, since `generate`
        reads that first) becomes what training teaches."""
        model = self._vedas_model()
        model.config.num_latent_steps = steps
        if getattr(model.generation_config, "num_latent_steps", None) is not None:
            model.generation_config.num_latent_steps = steps

    def train(self, *args, **kwargs):
        """`Trainer.train` holding the output folder's lock (see [`OutputDirLock`]); the SIGTERM handler of
        `save_on_sigterm` is removed however training ends."""
        lock = OutputDirLock(self.args.output_dir) if self.args.should_save else None
        if lock is not None:
            lock.acquire()
        try:
            return super().train(*args, **kwargs)
        finally:
            if self.sigterm_callback is not None:
                self.sigterm_callback.restore()
            if lock is not None:
                lock.release()

    def create_optimizer(self, model=None):
        """Trainer's optimizer; the parameters of the modules Vedas adds (routers, TokenSR) then move to groups of
        their own at `learning_rate * vedas_lr_multiplier` (same weight decay as the group they leave)."""
        optimizer = super().create_optimizer(model)
        multiplier = self.args.vedas_lr_multiplier
        if multiplier == 1 or not isinstance(optimizer, torch.optim.Optimizer):
            return optimizer
        added = {id(p) for p in vedas_added_parameters(self.model if model is None else model)}
        for group in list(optimizer.param_groups):
            moved = [p for p in group["params"] if id(p) in added]
            if not moved:
                continue
            group["params"] = [p for p in group["params"] if id(p) not in added]
            optimizer.add_param_group({**{k: v for k, v in group.items() if k != "params"}, "params": moved,
                                       "lr": group["lr"] * multiplier})
        optimizer.param_groups[:] = [group for group in optimizer.param_groups if group["params"]]
        return optimizer

    def _vedas_model(self):
        """The Vedas model itself (under a PEFT wrapper when there is one)."""
        return base_model(self.model)

    def _vedas_config(self):
        return self._vedas_model().config

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Latent multi-pass forward; logs `ce_loss` (per-token mean of the batch), `recon_loss` and `stage`.

        In training, `num_items_in_batch` (the Trainer's count of label tokens over all gradient-accumulation
        micro-batches, and over processes with `average_tokens_across_devices`) turns the cross-entropy into a token
        sum divided by that count, and the reconstruction term (a mean over samples) is divided by the number of
        micro-batches: accumulated micro-batches give the loss and gradients of one large batch.
        """
        mode = "train" if model.training else "eval"
        count = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
        outputs = model(**inputs, use_cache=False, **count)  # no cache: checkpoint replays would write it twice
        ce, recon = outputs.get("ce_loss", outputs.loss), outputs.get("recon_loss")
        loss = outputs.loss
        if num_items_in_batch is not None:
            loss = self._accumulation_loss(ce, recon)
            labelled = (inputs["labels"][..., 1:] != IGNORE_INDEX).sum()
            ce = ce * num_items_in_batch / labelled.clamp(min=1)  # back to this batch's per-token mean, for logging
        metrics = self._metrics[mode]
        metrics["ce_loss"].append(self._gathered_mean(ce))
        if recon is not None:
            metrics["recon_loss"].append(self._gathered_mean(recon))
        stage = self.curriculum_callback.stage if mode == "train" else self.eval_stage
        metrics["stage"].append(float(stage or 0))
        return (loss, outputs) if return_outputs else loss

    def _accumulation_loss(self, ce, recon):
        """This micro-batch's share of the accumulated loss: `ce` is already a token sum over the count of the whole
        accumulated batch (times the process count when that count spans processes, since DDP averages gradients,
        as `Trainer.compute_loss` does); the reconstruction mean is divided by the number of micro-batches."""
        loss = ce * self.accelerator.num_processes if self.args.average_tokens_across_devices else ce
        if recon is not None:
            weight = self._vedas_config().recon_loss_weight
            loss = loss + weight * recon / self.current_gradient_accumulation_steps
        return loss

    def _gathered_mean(self, value: torch.Tensor) -> float:
        return self.accelerator.gather_for_metrics(value.detach().reshape(1)).float().mean().item()

    # ---- checkpoints: atomic, no pickles ---------------------------------------------------------------------

    def _save(self, output_dir=None, state_dict=None):
        """Stock save, but the training arguments go to `training_args.json` instead of a pickled
        `training_args.bin`, so model folders hold no pickle (and `vedas_hf.push` accepts them); adapter folders also
        get a `generation_config.json` with the `num_latent_steps` they were trained for."""
        super()._save(output_dir, state_dict=state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save and _is_peft_model(self.model):
            # the latent-step count the adapter was trained for, in a generation config next to it (read back by the
            # model's `load_adapter`, i.e. `from_pretrained(adapter_folder)`; a config.json would make transformers
            # take the folder for a full model)
            generation_config = copy.deepcopy(self._vedas_model().generation_config)
            generation_config.num_latent_steps = self._vedas_config().num_latent_steps
            generation_config._from_model_config = False  # else `GenerationConfig.from_pretrained` drops the field
            generation_config.save_pretrained(output_dir)
        pickled = os.path.join(output_dir, TRAINING_ARGS_NAME)
        if self.args.should_save and os.path.isfile(pickled):
            os.remove(pickled)
            with open(os.path.join(output_dir, "training_args.json"), "w") as f:
                f.write(self.args.to_json_string())

    def _get_output_dir(self, trial):
        return self._staging_dir if self._staging_dir is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """Write `checkpoint-N` atomically: everything goes to `<output_dir>/.staging/checkpoint-N`, which is renamed
        into place once complete, so a crash while saving leaves the previous checkpoints untouched and never a
        half-written one that `resume_from_checkpoint=True` would pick."""
        run_dir = self._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging_root = os.path.join(run_dir, ".staging")
        if self.args.should_save and os.path.isdir(os.path.join(staging_root, name)):
            shutil.rmtree(os.path.join(staging_root, name))  # leftover of an earlier crash
        self.accelerator.wait_for_everyone()
        self._staging_dir = staging_root
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_dir = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            final = os.path.join(run_dir, name)
            if os.path.isdir(final):  # re-saving a step (e.g. after resume): keep the old one until the swap
                shutil.rmtree(final)
            os.replace(os.path.join(staging_root, name), final)
            if self.state.best_model_checkpoint and self.state.best_model_checkpoint.startswith(staging_root):
                self.state.best_model_checkpoint = final
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
            try:
                os.rmdir(staging_root)  # only when empty: a finished folder keeps no `.staging/`
            except OSError:
                pass
        self.accelerator.wait_for_everyone()

    def _load_best_model(self) -> None:
        """`load_best_model_at_end`: full-model weights go through the same key conversion as a resume
        ([`_load_from_checkpoint`], an error on any missing weight); `Trainer`'s raw `load_state_dict(strict=False)`
        would match none of the saved keys and keep the last weights. Adapters (PEFT; their own key names), DeepSpeed
        and FSDP go through the stock path."""
        checkpoint = self.state.best_model_checkpoint
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._load_best_model()
        weights = ADAPTER_SAFE_WEIGHTS_NAME if _is_peft_model(self.model) else SAFE_WEIGHTS_NAME
        if not os.path.isfile(os.path.join(checkpoint, weights)):
            raise ValueError(
                f"load_best_model_at_end: the best checkpoint {checkpoint} has no {weights}; it was not written by "
                "this trainer (or was deleted). Set load_best_model_at_end=False or restore the checkpoint."
            )
        if _is_peft_model(self.model):
            return super()._load_best_model()
        self._load_from_checkpoint(checkpoint)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Resume full-model weights through the model's key conversion.

        `save_pretrained` writes Qwen2-VL weights in the original Hub layout (`model.layers.*`, `visual.*`), but
        `Trainer` resumes with a raw `load_state_dict`, which would silently leave every weight at its initial value
        (transformers 5.x, stock Qwen2-VL included). We map the saved keys back and refuse to resume on any missing
        weight. Adapter (PEFT), FSDP and sharded checkpoints go through the stock path.
        """
        model = self.model if model is None else model
        weights = os.path.join(resume_from_checkpoint, SAFE_WEIGHTS_NAME)
        if _is_peft_model(model) or self.is_fsdp_enabled or not os.path.isfile(weights):
            return super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        saved = safetensors.torch.load_file(weights, device="cpu")
        state_dict = {saved_to_model.get(key, key): tensor
                      for saved_to_model in [saved_key_map(model)] for key, tensor in saved.items()}
        result = model.load_state_dict(state_dict, strict=False)
        tied = set(getattr(model, "all_tied_weights_keys", None) or {})
        missing = [key for key in result.missing_keys if key not in tied]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"Checkpoint {resume_from_checkpoint} does not match the model: missing {missing[:5]} "
                f"({len(missing)} in all), unexpected {result.unexpected_keys[:5]}. Resume with the model class and "
                "config that wrote it."
            )
        model.tie_weights()


VEDAS_MODULE_CLASSES = ("VedasRouter", "TokenSR")


def vedas_added_parameters(model) -> list:
    """The trainable parameters of the modules Vedas adds to a backbone (routers with their gates, TokenSR), found by
    class name so that models loaded as remote code (their own copy of the classes) count too."""
    found = {}
    for module in model.modules():
        if type(module).__name__ in VEDAS_MODULE_CLASSES:
            for parameter in module.parameters():
                if parameter.requires_grad:
                    found[id(parameter)] = parameter
    return list(found.values())


def saved_key_map(model) -> dict[str, str]:
    """`{key as save_pretrained writes it: key in model.state_dict()}` for the model's (rename-only) key conversion."""
    mapping = {}
    for key, tensor in model.state_dict().items():
        reverted = revert_weight_conversion(model, {key: tensor})
        if len(reverted) == 1:
            mapping[next(iter(reverted))] = key
    return mapping


def vedas_lora_config(r: int = 64, lora_alpha: int = 16, lora_dropout: float = 0.05, **kwargs):
    """LoRA on the language model's linear layers only (defaults r=64, alpha=16, dropout 0.05 are our choice; the
    paper gives no LoRA settings); routers and TokenSR are trained fully and saved with the adapter
    (`modules_to_save`)."""
    from peft import LoraConfig

    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        # the decoder layers (`model.language_model.layers.*` for Qwen, `model.layers.*` for Chameleon); the vision
        # tower's blocks and Chameleon's VQ-VAE have no `layers.<n>.self_attn` / `mlp` projections
        target_modules=r".*\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)",
        modules_to_save=["router", "token_sr"],
        task_type="CAUSAL_LM",
        **kwargs,
    )


__all__ = ["CurriculumCallback", "SaveOnSigtermCallback", "StageRenderer", "curriculum_dataset", "VedasSFTConfig", "VedasSFTTrainer", "vedas_lora_config"]
