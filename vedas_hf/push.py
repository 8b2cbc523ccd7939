"""Upload a Vedas checkpoint folder (from `vedas_hf.convert` or `trainer.save_model`) to the Hugging Face Hub.

    python -m vedas_hf.push runs/vedas-qwen2-vl-2b your-name/vedas-qwen2-vl-2b [--private] [--revision BRANCH]

The folder is checked before anything is sent: it must hold a Vedas `config.json` with `auto_map` (AutoConfig and
AutoModelForImageTextToText), the two code files that `trust_remote_code` runs, root-level safetensors weights, the
tokenizer and processor files, and no pickle files (`*.bin`, `*.pt`, ...), so a pushed repository always loads with
`AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True)` and `AutoProcessor.from_pretrained(repo,
trust_remote_code=True)`. Training leftovers (`checkpoint-*`, `runs/`, `wandb/`, locks) and hidden files or folders
(`.staging/`, `.env`, ...) are never uploaded. Authentication is `huggingface_hub`'s (`hf auth login` or `HF_TOKEN`).
"""

import argparse
import json
import logging
from pathlib import Path

from huggingface_hub import HfApi

from .convert import TOKENIZER_FILES


logger = logging.getLogger(__name__)

CODE_FILES = ("configuration_vedas.py", "modeling_vedas.py")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
VEDAS_MODEL_TYPES = ("vedas_qwen2_vl", "vedas_qwen2_5_vl")
AUTO_MAP_CLASSES = ("AutoConfig", "AutoModelForImageTextToText")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
# what AutoProcessor needs, as alternatives per entry: tokenizer config, tokenizer vocabulary, image processor config
PROCESSOR_FILES = TOKENIZER_FILES + (("processor_config.json", "preprocessor_config.json"),)
# upload_folder patterns (fnmatch, `*` crosses `/`) for what `_is_leftover` skips: a second guard on the Hub side
IGNORE_PATTERNS = [".*", "*/.*", "checkpoint-*", "runs/*", "wandb/*", "*.lock"]


def _is_leftover(relative: Path) -> bool:
    """Training-run leftovers that never belong in a model repository (Trainer checkpoints, logs, caches), and any
    hidden file or folder (`.staging/`, `.env`, `.cache/`, ...)."""
    top = relative.parts[0]
    return (
        top.startswith("checkpoint-")
        or top in ("runs", "wandb")
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
        ValueError: naming the problem (missing config/auto_map/code/weights/processor files, not a Vedas config,
            pickle files present).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder; pass the output of vedas_hf.convert or trainer.save_model.")
    if (folder / "adapter_config.json").is_file():
        raise ValueError(
            f"{folder} holds a PEFT adapter; merge it first (model.merge_and_unload().save_pretrained(...)), or push "
            "the adapter folder with PeftModel.push_to_hub."
        )
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{folder} has no config.json; adapters must be merged (merge_and_unload) before pushing.")
    config = json.loads(config_path.read_text())
    if config.get("model_type") not in VEDAS_MODEL_TYPES:
        raise ValueError(
            f"{config_path} has model_type={config.get('model_type')!r}, not one of {VEDAS_MODEL_TYPES}; convert the "
            "stock checkpoint first (python -m vedas_hf.convert)."
        )
    missing = [name for name in AUTO_MAP_CLASSES if name not in (config.get("auto_map") or {})]
    if missing:
        raise ValueError(f"{config_path} has no auto_map for {missing}; save it with `import vedas_hf`.")
    missing = [name for name in CODE_FILES if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"{folder} lacks {missing}, the code trust_remote_code runs; re-save with `import vedas_hf`.")
    files, _ = split_files(folder)
    pickles = [name for name in files if name.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise ValueError(f"{folder} holds pickle files {pickles}; only safetensors are pushed. Remove them first.")
    if not any(name in files for name in WEIGHT_FILES):
        raise ValueError(
            f"{folder} has no root-level safetensors weights ({' or '.join(WEIGHT_FILES)}); save the model with "
            "save_pretrained into this folder."
        )
    missing = _missing_shards(folder, files)
    if missing:
        raise ValueError(
            f"{folder / WEIGHT_FILES[1]} lists weight shards that are not in the folder: {missing} (an interrupted "
            "save?); re-save the model with save_pretrained into this folder."
        )
    missing = [" or ".join(names) for names in PROCESSOR_FILES if not any(name in files for name in names)]
    if missing:
        raise ValueError(
            f"{folder} lacks the processor files {missing} that AutoProcessor loads (an interrupted save?); re-save "
            "the processor with processor.save_pretrained into this folder."
        )
    return files


def _missing_shards(folder: Path, files: list) -> list:
    """Shards named by the safetensors index (`weight_map`) that are not among `files`, sorted."""
    if WEIGHT_FILES[1] not in files:
        return []
    try:
        shards = set(json.loads((folder / WEIGHT_FILES[1]).read_text())["weight_map"].values())
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{folder / WEIGHT_FILES[1]} is not a safetensors index ({error}); re-save the model.") from None
    return sorted(shards - set(files))


def push_to_hub(folder, repo_id: str, private: bool = False, revision: str | None = None,
                commit_message: str = "Upload Vedas checkpoint", token: str | None = None, api: HfApi | None = None):
    """Create `repo_id` (if needed) and upload `folder` to it, on branch `revision` (created if needed).

    Returns:
        The `huggingface_hub` commit info of the upload.
    """
    files = check_folder(folder)
    _, skipped = split_files(folder)
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="Vedas checkpoint folder (vedas_hf.convert or trainer.save_model output)")
    parser.add_argument("repo_id", help="target repository, e.g. your-name/vedas-qwen2-vl-2b")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--revision", default=None, help="branch to push to (created if missing)")
    parser.add_argument("--message", default="Upload Vedas checkpoint", help="commit message")
    args = parser.parse_args(argv)
    _, skipped = split_files(args.folder)
    if skipped:
        print(f"Skipping {len(skipped)} leftover or hidden files: {', '.join(skipped)}")
    info = push_to_hub(args.folder, args.repo_id, private=args.private, revision=args.revision,
                       commit_message=args.message)
    print(f"Pushed {args.folder} to {args.repo_id}: {getattr(info, 'commit_url', info)}")


if __name__ == "__main__":
    main()
