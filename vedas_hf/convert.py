"""Convert a stock Qwen2-VL, Qwen2.5-VL or Chameleon checkpoint folder into a Hub-ready Vedas folder.

    python -m vedas_hf.convert SRC DST [--backbone auto] [--overwrite] [--base-model Qwen/Qwen2-VL-2B-Instruct]
        [--set num_latent_steps=4 --set router_layers=odd ...]

The result holds the Vedas config (with `auto_map`), safetensors weights (stock weights unchanged, new router /
gate / TokenSR modules initialised, gates at zero), the modeling code files, the processor with the three latent
tokens added, and a model card. It loads with
`AutoModelForImageTextToText.from_pretrained(DST, trust_remote_code=True)` and, before any training, gives the
stock model's outputs. Everything is written to a hidden sibling folder first and moved to DST only when complete.
"""

import argparse
import copy
import dataclasses
import difflib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoProcessor

from . import (
    VedasChameleonConfig,
    VedasChameleonForConditionalGeneration,
    VedasQwen2_5_VLConfig,
    VedasQwen2_5_VLForConditionalGeneration,
    VedasQwen2VLConfig,
    VedasQwen2VLForConditionalGeneration,
)
from .modeling.configuration_vedas import VedasConfigMixin


logger = logging.getLogger(__name__)

LATENT_TOKENS = {
    "start_latent_token_id": "<|start-latent|>",
    "latent_token_id": "<|latent|>",
    "end_latent_token_id": "<|end-latent|>",
}
# stock model_type -> (Vedas config class, Vedas model class, display name)
BACKBONES = {
    "qwen2_vl": (VedasQwen2VLConfig, VedasQwen2VLForConditionalGeneration, "Qwen2-VL"),
    "qwen2_5_vl": (VedasQwen2_5_VLConfig, VedasQwen2_5_VLForConditionalGeneration, "Qwen2.5-VL"),
    "chameleon": (VedasChameleonConfig, VedasChameleonForConditionalGeneration, "Chameleon"),
}
SUPPORTED_BACKBONES = tuple(BACKBONES)
# the tokenizer files a checkpoint folder needs, as alternatives per entry: its config and its vocabulary
TOKENIZER_FILES = (("tokenizer_config.json",), ("tokenizer.json", "vocab.json"))
# the Vedas config fields `--set` / `convert_checkpoint(**overrides)` may set; the latent-token ids come from the tokenizer
SETTABLE_FIELDS = tuple(
    field.name for field in dataclasses.fields(VedasConfigMixin) if field.name not in LATENT_TOKENS
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_config_overrides(overrides: dict) -> dict:
    """`overrides` if every key is a settable Vedas config field (`SETTABLE_FIELDS`).

    Raises:
        ValueError: naming the first unknown key, the closest allowed name when there is one, and the allowed names;
            the three latent-token ids are refused because conversion reads them from the tokenizer.
    """
    for key in overrides:
        if key in SETTABLE_FIELDS:
            continue
        if key in LATENT_TOKENS:
            raise ValueError(
                f"{key} cannot be set: convert reads the latent-token ids from the tokenizer (after adding "
                f"{LATENT_TOKENS[key]!r}); drop --set {key}."
            )
        close = difflib.get_close_matches(key, SETTABLE_FIELDS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{key!r} is not a Vedas config field.{hint} Allowed: {', '.join(SETTABLE_FIELDS)}.")
    return overrides


def _check_paths(src: Path, dst: Path, overwrite: bool):
    if not (src / "config.json").is_file():
        raise ValueError(f"{src} has no config.json; pass a stock Qwen2-VL checkpoint folder.")
    if not any(src.glob("*.safetensors")):
        raise ValueError(f"{src} has no *.safetensors weights; only safetensors checkpoints are converted.")
    missing = [" or ".join(names) for names in TOKENIZER_FILES if not any((src / name).is_file() for name in names)]
    if missing:
        raise ValueError(
            f"{src} lacks the tokenizer files {missing}; conversion adds the latent tokens to the checkpoint's own "
            "tokenizer: save it into the folder first (processor.save_pretrained)."
        )
    if dst.exists() and not dst.is_dir():
        raise ValueError(f"Target {dst} is an existing file, not a folder; pass a folder path (new or empty).")
    source, target = src.resolve(), dst.resolve()
    if source != target and (target in source.parents or source in target.parents):
        inside = "contains the source" if target in source.parents else "is inside the source"
        raise ValueError(
            f"Target folder {dst} {inside} {src}: writing it would replace or nest the checkpoint being converted "
            "(with --overwrite the source would be deleted). Choose a folder beside the source, or pass the same "
            "folder twice to convert in place."
        )
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise ValueError(f"Target folder {dst} is not empty; choose an empty folder or pass overwrite=True (--overwrite).")


def detect_backbone(src, backbone: str = "auto") -> str:
    """The stock backbone (`model_type`) of the checkpoint folder `src`, checked against `backbone` unless "auto"."""
    if backbone != "auto" and backbone not in BACKBONES:
        raise ValueError(f"Unknown backbone={backbone!r}; use 'auto' or one of {SUPPORTED_BACKBONES}.")
    model_type = json.loads((Path(src) / "config.json").read_text()).get("model_type")
    if model_type not in BACKBONES:
        raise ValueError(f"Unknown backbone model_type={model_type!r} in {src}; supported: {SUPPORTED_BACKBONES}.")
    if backbone != "auto" and backbone != model_type:
        raise ValueError(f"backbone={backbone!r} but {src} holds a {model_type!r} checkpoint; pass --backbone auto.")
    return model_type


def _stock_config_kwargs(src: Path) -> dict:
    config = AutoConfig.from_pretrained(src)
    kwargs = config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path"):
        kwargs.pop(key, None)
    return kwargs


def add_latent_tokens(tokenizer, vocab_size: int) -> dict:
    """Add the three latent tokens (special, never split) and return their ids by config field name. They may
    land past `vocab_size` (a tokenizer that fills the vocabulary, e.g. Chameleon's): `convert_checkpoint` then
    grows the embeddings.

    Raises `ValueError` when the tokenizer is larger than the model's vocabulary (a mismatched tokenizer).
    """
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"The tokenizer has {len(tokenizer)} tokens but the checkpoint's vocab_size is {vocab_size}; the "
            "tokenizer does not belong to this checkpoint."
        )
    missing = [token for token in LATENT_TOKENS.values() if token not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    return {field: tokenizer.convert_tokens_to_ids(token) for field, token in LATENT_TOKENS.items()}


def _embeddings_tied(model) -> bool:
    """Whether the input embeddings and the LM head share one weight (`tie_word_embeddings`, e.g. Qwen2-VL-2B)."""
    output = model.get_output_embeddings()
    return output is not None and output.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def _init_latent_rows(model, token_ids: list[int], source_id: int) -> bool:
    """Copy the input-embedding row of `source_id` into the rows of `token_ids`; returns whether rows were copied.

    The LM-head rows are left as they are: the latent tokens are never predicted (their labels are masked), and
    keeping them makes the converted model's logits equal the stock model's over the whole vocabulary. With tied
    embeddings the input rows *are* the LM-head rows, so nothing is copied: copying would give the latent tokens the
    source token's logit (eos: sampling and beam search would split its probability with invisible tokens).
    """
    if _embeddings_tied(model):
        logger.info(
            "Tied word embeddings: the latent tokens keep their stock embedding rows (not copied from token id %d) "
            "so the logits stay exactly the stock model's.", source_id,
        )
        return False
    with torch.no_grad():
        embeddings = model.get_input_embeddings().weight
        embeddings[token_ids] = embeddings[source_id].clone()
    return True


def _base_model_name(src: Path, base_model: str | None = None) -> str:
    """The name of the stock checkpoint for the model card: `base_model` if given, else the source config's
    `_name_or_path` when it looks like a Hub id (owner/name), else the repository of a Hub-cache snapshot folder
    (`models--owner--name/snapshots/<sha>`), else the folder name."""
    if base_model:
        return base_model
    name_or_path = json.loads((src / "config.json").read_text()).get("_name_or_path") or ""
    if _HUB_ID.match(name_or_path):
        return name_or_path
    resolved = src.resolve()
    if resolved.parent.name == "snapshots" and resolved.parent.parent.name.startswith("models--"):
        return resolved.parent.parent.name[len("models--"):].replace("--", "/", 1)
    return resolved.name


def check_checkpoint_argument(path: str, flag: str) -> None:
    """`ValueError` for a checkpoint argument that names a local folder that does not exist (a mistyped path would
    otherwise be taken for a Hub repository id and fail with a network or repo-id error). A Hub id `owner/name`
    whose `owner` is not a local folder passes."""
    if os.path.isdir(path):
        if not any(os.path.isfile(os.path.join(path, name)) for name in ("config.json", "adapter_config.json")):
            hint = " (did you mean its final/ folder?)" if os.path.isdir(os.path.join(path, "final")) else ""
            raise ValueError(f"{flag} {path!r} has no config.json{hint}: pass a checkpoint folder.")
        return
    parts = Path(path).parts
    looks_local = (os.path.isabs(path) or path.startswith((".", "~")) or len(parts) != 2
                   or os.path.isdir(parts[0]))
    if looks_local:
        parent = Path(path).parent
        while not parent.is_dir() and parent != parent.parent:
            parent = parent.parent
        entries = sorted(p.name for p in parent.iterdir() if p.is_dir())[:8] if parent.is_dir() else []
        raise ValueError(
            f"{flag} {path!r}: no such folder (folders in {str(parent)!r}: {entries}). Pass a checkpoint folder, or "
            "a Hub repository id 'owner/name'."
        )


def _is_vedas_parameter(name: str) -> bool:
    """The parameters Vedas adds to a stock model (routers, TokenSR): absent from every stock checkpoint."""
    return ".router." in name or name.startswith(("token_sr.", "model.token_sr."))


def _load_stock_weights(model_class, src: Path, config, dtype, stock_vocab_size: int | None = None):
    """The Vedas model with the stock weights of `src`. transformers' own report of the parameters it had to
    initialise is replaced by one line: the routers and TokenSR are expected there (zero gates keep the converted
    model equal to the stock one); any other missing weight is a warning naming it.

    `stock_vocab_size`: when the latent tokens do not fit the stock vocabulary, the stock embedding size; the model
    is loaded at that size and then grown to `config`'s (see `_grow_vocabulary`)."""
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    load_config = config
    if stock_vocab_size is not None:  # loaded at the stock size (latent ids unset: past it), then grown
        load_config = copy.deepcopy(config)
        load_config.get_text_config().vocab_size = stock_vocab_size
        for field in LATENT_TOKENS:
            setattr(load_config, field, None)
    try:
        model, info = model_class.from_pretrained(src, config=load_config, dtype=dtype, output_loading_info=True)
    finally:
        transformers_logging.set_verbosity(verbosity)
    if stock_vocab_size is not None:
        _grow_vocabulary(model, config.get_text_config().vocab_size)
        for field in LATENT_TOKENS:
            setattr(model.config, field, getattr(config, field))
    missing = sorted(info.get("missing_keys", []))
    added = [name for name in missing if _is_vedas_parameter(name)]
    logger.info("Initialised the %d Vedas parameters that a stock checkpoint does not have (routers with zero gates, "
                "TokenSR): expected; the converted model equals the stock one until it is trained.", len(added))
    other = [name for name in missing if not _is_vedas_parameter(name)]
    if other:
        logger.warning("%s lacks %d stock weights, initialised at random: %s", src, len(other), other[:10])
    return model


def _grow_vocabulary(model, vocab_size: int) -> None:
    """Grow the input embeddings and the LM head to `vocab_size` rows for latent tokens past the stock vocabulary.
    The new LM-head rows are zeros; those tokens are never predicted (their logits are masked by backbones that
    mask non-text tokens, e.g. Chameleon), so the logits over the stock vocabulary are unchanged."""
    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(vocab_size, mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[old:].zero_()
        output = model.get_output_embeddings()
        if output is not None and not _embeddings_tied(model):
            output.weight[old:].zero_()
    logger.info("Grew the vocabulary from %d to %d rows for the latent tokens.", old, vocab_size)


def _temporary_sibling(dst: Path, kind: str) -> Path:
    """A hidden folder next to `dst` (same file system, so renames are atomic), removed first if left over."""
    path = dst.parent / f".{dst.name}.{kind}-{os.getpid()}"
    if path.exists():
        shutil.rmtree(path)
    return path


def _move_into_place(tmp: Path, dst: Path):
    """Rename the complete folder `tmp` to `dst`; an existing `dst` is renamed away first and deleted afterwards
    (restored if the second rename fails)."""
    if not dst.exists():
        tmp.rename(dst)
        return
    old = _temporary_sibling(dst, "old")
    dst.rename(old)
    try:
        tmp.rename(dst)
    except BaseException:
        old.rename(dst)
        raise
    if old.is_symlink():
        old.unlink()
    else:
        shutil.rmtree(old, ignore_errors=True)


def convert_checkpoint(
    src,
    dst,
    *,
    overwrite: bool = False,
    init_token: str | None = None,
    dtype: torch.dtype | None = None,
    backbone: str = "auto",
    base_model: str | None = None,
    **config_overrides,
) -> str:
    """Convert the stock Qwen2-VL / Qwen2.5-VL / Chameleon checkpoint `src` into a Vedas checkpoint written to `dst`.

    The folder is written to a hidden sibling `.<dst name>.tmp-<pid>` and renamed to `dst` only when complete, so a
    failure or interrupt leaves no partial `dst` (and an existing `dst` untouched). With `overwrite` an existing
    `dst` is replaced as a whole (files of the old folder do not survive); `dst == src` converts in place.

    Latent-token embeddings: for untied checkpoints the new tokens' input-embedding rows are copied from
    `init_token` and their LM-head rows are left as they are. For tied checkpoints (`tie_word_embeddings`, e.g.
    Qwen2-VL-2B and Qwen2.5-VL-3B) the shared rows are left as they are, since copying them would change the logits;
    either way the converted model's logits equal the stock model's over the whole vocabulary.

    Args:
        src: stock checkpoint folder (config.json, safetensors, processor/tokenizer files).
        dst: target folder; must not exist or be empty unless `overwrite`.
        backbone: `"auto"` (read `model_type` from `src`), `"qwen2_vl"`, `"qwen2_5_vl"` or `"chameleon"` (checked
            against `src`).
        init_token: token whose embedding initialises the latent tokens of untied checkpoints (default: the
            tokenizer's eos token).
        dtype: load/save dtype (default: the checkpoint's).
        base_model: name of the stock checkpoint for the model card, e.g. `"Qwen/Qwen2-VL-2B-Instruct"` (default:
            read from `src`, see `_base_model_name`); a Hub id (owner/name) is also written as `base_model:`.
        config_overrides: Vedas config fields (`SETTABLE_FIELDS`), e.g. `num_latent_steps=4, router_layers="odd"`.
    Returns:
        `dst` as a string.
    Raises:
        ValueError: for an unknown override, a bad source folder or backbone, or a target that is a file or a
            non-empty folder without `overwrite`.
    """
    check_config_overrides(config_overrides)
    src, dst = Path(src), Path(dst)
    _check_paths(src, dst, overwrite)
    config_class, model_class, backbone_name = BACKBONES[detect_backbone(src, backbone)]
    stock_kwargs = _stock_config_kwargs(src)
    processor = AutoProcessor.from_pretrained(src)
    tokenizer = processor.tokenizer
    text_kwargs = stock_kwargs.get("text_config", stock_kwargs)  # Chameleon's config is flat
    vocab_size = text_kwargs["vocab_size"]
    existing = set(tokenizer.get_vocab())
    token_ids = add_latent_tokens(tokenizer, vocab_size)
    grown = max(len(tokenizer) - vocab_size, 0)
    if "vocabulary_map" in stock_kwargs:  # Chameleon's config keeps the tokenizer's vocabulary
        stock_kwargs["vocabulary_map"] = {**(stock_kwargs["vocabulary_map"] or {}), **tokenizer.get_vocab()}
    if grown:  # the latent ids must be in the vocabulary when the config checks them; the weights grow on load
        text_kwargs["vocab_size"] = len(tokenizer)
    config = config_class(**{**stock_kwargs, **token_ids, **config_overrides})
    model = _load_stock_weights(model_class, src, config, dtype, vocab_size if grown else None)
    new_ids = [token_ids[f] for f, t in LATENT_TOKENS.items() if t not in existing]
    if new_ids:
        init_token = init_token or tokenizer.eos_token
        source_id = tokenizer.get_vocab().get(init_token)
        if source_id is None:
            raise ValueError(f"init_token={init_token!r} is not in the tokenizer.")
        _init_latent_rows(model, new_ids, source_id)
    card = model_card(_base_model_name(src, base_model), config, backbone_name)
    target = Path(os.path.abspath(dst))  # normalised, so "." or "runs/x/" have a name and a parent
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(target, "tmp")
    try:
        tmp.mkdir()
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "README.md").write_text(card)
        _move_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(dst)


def model_card(base_name: str, config, backbone_name: str = "Qwen2-VL") -> str:
    """A short model card with the usage snippet; `base_name` titles it and, when it is a Hub id (owner/name), is
    the `base_model` metadata. No license is written: it is the stock checkpoint's, for the uploader to state."""
    settings = {k: getattr(config, k) for k in ("num_latent_steps", "replay_mode", "replay_top_k", "replay_positions",
                                                   "router_layers", "router_top_k", "router_depth", "recon_window",
                                                   "recon_crop_size")}
    base_model = f"base_model: {base_name}\n" if _HUB_ID.match(base_name) else ""
    return f"""---
library_name: transformers
pipeline_tag: image-text-to-text
{base_model}tags: [vedas, latent-reasoning, {backbone_name.lower()}]
---
# Vedas latent reasoning on {base_name}

Converted with `python -m vedas_hf.convert` from a stock {backbone_name} checkpoint: Routing Depth Scaling routers (gates
at zero, so the untrained model equals the stock one), visual replay, and the latent tokens
`<|start-latent|>`, `<|latent|>`, `<|end-latent|>`. Settings: `{json.dumps(settings)}`.

```python
from transformers import AutoModelForImageTextToText, AutoProcessor

repo = "<this repo>"
model = AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True, revision="<pinned commit>")
processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True, revision="<pinned commit>")
processor.tokenizer.padding_side = "left"
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "What is shown?"}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(text=[prompt], images=[image], return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=64, num_latent_steps={config.num_latent_steps})
print(processor.batch_decode(out[:, inputs.input_ids.shape[1]:], skip_special_tokens=True))
```
"""


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="stock Qwen2-VL, Qwen2.5-VL or Chameleon checkpoint folder")
    parser.add_argument("dst", help="target folder (must be empty unless --overwrite)")
    parser.add_argument("--backbone", default="auto", choices=("auto", *SUPPORTED_BACKBONES),
                        help="stock backbone of SRC (default: read from its config.json)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty target folder")
    parser.add_argument("--init-token", default=None,
                        help="token whose embedding initialises the latent tokens (untied checkpoints only)")
    parser.add_argument("--base-model", default=None,
                        help="stock checkpoint name for the model card, e.g. Qwen/Qwen2-VL-2B-Instruct")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help=f"Vedas config field, value parsed as JSON when possible (repeatable); one of "
                             f"{', '.join(SETTABLE_FIELDS)}")
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        if "=" not in item:
            parser.error(f"--set {item!r} must look like FIELD=VALUE")
        key, value = item.split("=", 1)
        overrides[key] = _parse_value(value)
    try:
        check_config_overrides(overrides)
    except ValueError as error:
        parser.error(f"--set: {error}")
    if not logger.handlers:
        logger.addHandler(logging.StreamHandler())
    logger.setLevel(logging.INFO)
    out = convert_checkpoint(args.src, args.dst, overwrite=args.overwrite, init_token=args.init_token,
                             backbone=args.backbone, base_model=args.base_model, **overrides)
    print(f"Wrote Vedas checkpoint to {os.path.abspath(out)}")


if __name__ == "__main__":
    main()
