"""Upload a Vedas checkpoint folder (from `vedas_hf.convert` or `trainer.save_model`) to the Hugging Face Hub.

    python -m vedas_hf.push runs/vedas-qwen2-vl-2b your-name/vedas-qwen2-vl-2b [--private] [--revision BRANCH]
    python -m vedas_hf.push runs/mine/final your-name/vedas-mine --dry-run   # checks and lists files, sends nothing

The folder is checked before anything is sent: it must hold a Vedas `config.json` with `auto_map` (AutoConfig and
AutoModelForImageTextToText), the two code files that `trust_remote_code` runs, root-level safetensors weights, the
tokenizer and processor files, and no pickle files (`*.bin`, `*.pt`, ...), so a pushed repository always loads with
`AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True)` and `AutoProcessor.from_pretrained(repo,
trust_remote_code=True)`. Every root-level `*.safetensors` file and every shard the index names is verified from its
header alone (header length, JSON header, file size = 8 + header length + end of the last tensor), so a truncated or
empty weight file from an interrupted save or copy is refused. A training run folder (no `config.json`, but a
`final/` or `checkpoint-*` model inside) is refused with the subfolder to pass instead. Training leftovers
(`checkpoint-*`, `runs/`, `wandb/`, locks), evaluation outputs (`eval/`: `eval.json`, `eval.md`, `windows/*.png`
from `examples/eval.py`) and hidden files or folders (`.staging/`, `.env`, ...) are never uploaded. `--dry-run`
(`push_to_hub(..., dry_run=True)`) runs every check and prints the files that would be uploaded, with their sizes,
and the skipped ones, without creating the repository or uploading. Authentication is `huggingface_hub`'s
(`hf auth login` or `HF_TOKEN`).
"""

import argparse
import json
import logging
import struct
from pathlib import Path

from huggingface_hub import HfApi

from .convert import TOKENIZER_FILES


logger = logging.getLogger(__name__)

CODE_FILES = ("configuration_vedas.py", "modeling_vedas.py")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
VEDAS_MODEL_TYPES = ("vedas_qwen2_vl", "vedas_qwen2_5_vl", "vedas_chameleon")
AUTO_MAP_CLASSES = ("AutoConfig", "AutoModelForImageTextToText")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
# what AutoProcessor needs, as alternatives per entry: tokenizer config, tokenizer vocabulary, image processor config
PROCESSOR_FILES = TOKENIZER_FILES + (("processor_config.json", "preprocessor_config.json"),)
# top-level folders that are never uploaded: Trainer logs (TensorBoard, W&B) and examples/eval.py outputs (its default
# --output_dir is <checkpoint>/eval: eval.json, eval.md, windows/sample_*.png)
LEFTOVER_FOLDERS = ("runs", "wandb", "eval")
# upload_folder patterns (fnmatch, `*` crosses `/`) for what `_is_leftover` skips: a second guard on the Hub side
IGNORE_PATTERNS = [".*", "*/.*", "checkpoint-*", "runs/*", "wandb/*", "eval/*", "*.lock"]
RESAVE = "re-save the model with save_pretrained into this folder (an interrupted save or copy?)"


def _is_leftover(relative: Path) -> bool:
    """Training-run leftovers that never belong in a model repository (Trainer checkpoints, logs, caches, evaluation
    outputs), and any hidden file or folder (`.staging/`, `.env`, `.cache/`, ...)."""
    top = relative.parts[0]
    return (
        top.startswith("checkpoint-")
        or top in LEFTOVER_FOLDERS
        or any(part.startswith(".") for part in relative.parts)
        or relative.suffix == ".lock"
    )


def split_files(folder) -> tuple[list[str], list[str]]:
    """The relative paths of the files under `folder`: (to upload, skipped as leftovers or hidden), both sorted."""
    folder = Path(folder)
    upload, skipped = [], []
    for path in folder.rglob("*"):
        if path.is_file():
            relative = path.relative_to(folder)
            (skipped if _is_leftover(relative) else upload).append(str(relative))
    return sorted(upload), sorted(skipped)


def check_folder(folder) -> list[str]:
    """Validate a checkpoint folder for upload; returns the relative paths that will be uploaded.

    Raises:
        ValueError: naming the problem and its fix (not a folder, a PEFT adapter, a training run folder or no
            config.json, not a Vedas config, missing auto_map/code/weights/shards/processor files, a truncated or
            corrupt safetensors file, pickle files present).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder; pass the output of vedas_hf.convert or trainer.save_model.")
    if (folder / "adapter_config.json").is_file():
        raise ValueError(
            f"{folder} holds a PEFT adapter; merge it first (model.merge_and_unload().save_pretrained(...)), or push "
            "the adapter folder with PeftModel.push_to_hub."
        )
    _check_config(folder)
    missing = [name for name in CODE_FILES if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"{folder} lacks {missing}, the code trust_remote_code runs; re-save with `import vedas_hf`.")
    files, _ = split_files(folder)
    pickles = [name for name in files if name.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise ValueError(f"{folder} holds pickle files {pickles}; only safetensors are pushed. Remove them first.")
    _check_weights(folder, files)
    missing = [" or ".join(names) for names in PROCESSOR_FILES if not any(name in files for name in names)]
    if missing:
        raise ValueError(
            f"{folder} lacks the processor files {missing} that AutoProcessor loads (an interrupted save?); re-save "
            "the processor with processor.save_pretrained into this folder."
        )
    return files


def _check_config(folder: Path) -> None:
    """Check that `folder/config.json` is a Vedas config with the auto_map entries.

    Raises:
        ValueError: no config.json (naming `final/` or the newest `checkpoint-*` of a training run folder), a
            model_type that is not Vedas, or missing auto_map entries.
    """
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(_no_config_message(folder))
    config = json.loads(config_path.read_text())
    if config.get("model_type") not in VEDAS_MODEL_TYPES:
        raise ValueError(
            f"{config_path} has model_type={config.get('model_type')!r}, not one of {VEDAS_MODEL_TYPES}; convert the "
            "stock checkpoint first (python -m vedas_hf.convert)."
        )
    missing = [name for name in AUTO_MAP_CLASSES if name not in (config.get("auto_map") or {})]
    if missing:
        raise ValueError(f"{config_path} has no auto_map for {missing}; save it with `import vedas_hf`.")


def _no_config_message(folder: Path) -> str:
    """The error for a folder without config.json: a training run folder points at its `final/` model, else at its
    newest `checkpoint-<step>` model (highest step); any other folder gets what a pushable folder holds."""
    if (folder / "final" / "config.json").is_file():
        return (f"{folder} has no config.json; it looks like a training run folder: did you mean {folder / 'final'}? "
                "(examples/sft.py saves the finished model there)")
    checkpoints = [path.parent for path in folder.glob("checkpoint-*/config.json")]
    if checkpoints:
        newest = max(checkpoints, key=lambda path: (_step(path), path.name))
        return (f"{folder} has no config.json; it looks like a training run folder without a final/ model: pass its "
                f"newest checkpoint, {newest}, or save the trained model with trainer.save_model into a folder.")
    return (f"{folder} has no config.json, so it is not a saved model; pass the folder that vedas_hf.convert or "
            "trainer.save_model wrote (a PEFT adapter must be merged first with merge_and_unload).")


def _step(checkpoint: Path) -> int:
    """The step of a Trainer `checkpoint-<step>` folder; -1 when the suffix is not a number."""
    suffix = checkpoint.name.removeprefix("checkpoint-")
    return int(suffix) if suffix.isdigit() else -1


def _check_weights(folder: Path, files: list) -> None:
    """Check the root-level safetensors weights: present, every indexed shard present, every file complete.

    Raises:
        ValueError: no root-level weights, an unreadable index, shards missing, or a truncated or corrupt
            safetensors file (see `check_safetensors`).
    """
    if not any(name in files for name in WEIGHT_FILES):
        raise ValueError(
            f"{folder} has no root-level safetensors weights ({' or '.join(WEIGHT_FILES)}); save the model with "
            "save_pretrained into this folder."
        )
    shards = _index_shards(folder, files)
    missing = sorted(shards - set(files))
    if missing:
        raise ValueError(
            f"{folder / WEIGHT_FILES[1]} lists weight shards that are not in the folder: {missing} (an interrupted "
            "save?); re-save the model with save_pretrained into this folder."
        )
    root_files = {name for name in files if "/" not in name and name.endswith(".safetensors")}
    for name in sorted(root_files | shards):
        check_safetensors(folder / name)


def _index_shards(folder: Path, files: list) -> set:
    """The shards named by the safetensors index (`weight_map` values); empty without an index.

    Raises:
        ValueError: the index is not JSON with a `weight_map` object.
    """
    if WEIGHT_FILES[1] not in files:
        return set()
    try:
        return set(json.loads((folder / WEIGHT_FILES[1]).read_text())["weight_map"].values())
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{folder / WEIGHT_FILES[1]} is not a safetensors index ({error}); re-save the model.") from None


def check_safetensors(path) -> None:
    """Verify a safetensors file from its header alone: an 8-byte little-endian header length, a JSON header, and a
    file size of exactly 8 + header length + the largest `data_offsets` end (the `__metadata__` entry aside).

    Raises:
        ValueError: naming the file, what is wrong (e.g. "is 1234 bytes, its header says 5678") and the fix.
    """
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        raise ValueError(f"{path} is {size} bytes, too short for a safetensors header; {RESAVE}.")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if 8 + header_len > size:
            raise ValueError(f"{path} is {size} bytes, its header alone says {8 + header_len}; {RESAVE}.")
        try:
            header = json.loads(f.read(header_len))
            end = max((int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"),
                      default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as error:
            raise ValueError(f"{path} has a corrupt safetensors header ({error!r}); {RESAVE}.") from None
    if size != 8 + header_len + end:
        raise ValueError(f"{path} is {size} bytes, its header says {8 + header_len + end}; {RESAVE}.")


def push_to_hub(folder, repo_id: str, private: bool = False, revision: str | None = None,
                commit_message: str = "Upload Vedas checkpoint", token: str | None = None, api: HfApi | None = None,
                dry_run: bool = False):
    """Create `repo_id` (if needed) and upload `folder` to it, on branch `revision` (created if needed). With
    `dry_run`, only check the folder and print what would be uploaded (with sizes) and what is skipped.

    Returns:
        The `huggingface_hub` commit info of the upload; with `dry_run`, the relative paths that would be uploaded.

    Raises:
        ValueError: from `check_folder`, before anything is sent.
    """
    files = check_folder(folder)
    _, skipped = split_files(folder)
    if dry_run:
        _print_plan(Path(folder), repo_id, files, skipped)
        return files
    if skipped:
        logger.info("Not uploading %d leftover or hidden files: %s", len(skipped), skipped)
    api = api or HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    return api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        repo_type="model",
        revision=revision,
        commit_message=commit_message,
        allow_patterns=files,
        ignore_patterns=IGNORE_PATTERNS,
    )


def _print_plan(folder: Path, repo_id: str, files: list, skipped: list) -> None:
    """Print the files a push would upload (bytes, path) and the skipped ones, for `--dry-run`."""
    sizes = {name: (folder / name).stat().st_size for name in files}
    print(f"Dry run: would upload {len(files)} files ({sum(sizes.values()):,} bytes) to {repo_id}:")
    for name in files:
        print(f"  {sizes[name]:>15,}  {name}")
    print(f"Would skip {len(skipped)} leftover or hidden files" + (f": {', '.join(skipped)}" if skipped else "."))
    print("Nothing was created or uploaded.")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="Vedas checkpoint folder (vedas_hf.convert or trainer.save_model output)")
    parser.add_argument("repo_id", help="target repository, e.g. your-name/vedas-qwen2-vl-2b")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--revision", default=None, help="branch to push to (created if missing)")
    parser.add_argument("--message", default="Upload Vedas checkpoint", help="commit message")
    parser.add_argument("--dry-run", action="store_true",
                        help="run every check and list the files (with sizes) that would be uploaded; send nothing")
    args = parser.parse_args(argv)
    if args.dry_run:
        push_to_hub(args.folder, args.repo_id, private=args.private, revision=args.revision, dry_run=True)
        return
    _, skipped = split_files(args.folder)
    if skipped:
        print(f"Skipping {len(skipped)} leftover or hidden files: {', '.join(skipped)}")
    info = push_to_hub(args.folder, args.repo_id, private=args.private, revision=args.revision,
                       commit_message=args.message)
    print(f"Pushed {args.folder} to {args.repo_id}: {getattr(info, 'commit_url', info)}")


if __name__ == "__main__":
    main()
