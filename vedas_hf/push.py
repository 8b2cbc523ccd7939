"""Upload a Vedas checkpoint folder (from `vedas_hf.convert` or `trainer.save_model`) to the Hugging Face Hub.

    python -m vedas_hf.push runs/vedas-qwen2-vl-2b your-name/vedas-qwen2-vl-2b [--private] [--revision BRANCH]

The folder is checked before anything is sent: it must hold a Vedas `config.json` with `auto_map`, the two code
files that `trust_remote_code` runs, safetensors weights, and no pickle files (`*.bin`, `*.pt`, ...), so a pushed
repository always loads with `AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True)`.
Authentication is `huggingface_hub`'s (`hf auth login` or `HF_TOKEN`).
"""

import argparse
import json
from pathlib import Path

from huggingface_hub import HfApi


CODE_FILES = ("configuration_vedas.py", "modeling_vedas.py")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
VEDAS_MODEL_TYPES = ("vedas_qwen2_vl", "vedas_qwen2_5_vl")


def _is_leftover(relative: Path) -> bool:
    """Training-run leftovers that never belong in a model repository (Trainer checkpoints, logs, caches)."""
    top = relative.parts[0]
    return top.startswith("checkpoint-") or top in ("runs", ".cache") or relative.suffix == ".lock"


def check_folder(folder) -> list[str]:
    """Validate a checkpoint folder for upload; returns the relative paths that will be uploaded.

    Raises:
        ValueError: naming the problem (missing config/code/weights, not a Vedas config, pickle files present).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder; pass the output of vedas_hf.convert or trainer.save_model.")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{folder} has no config.json; adapters must be merged (merge_and_unload) before pushing.")
    config = json.loads(config_path.read_text())
    if config.get("model_type") not in VEDAS_MODEL_TYPES:
        raise ValueError(
            f"{config_path} has model_type={config.get('model_type')!r}, not one of {VEDAS_MODEL_TYPES}; convert the "
            "stock checkpoint first (python -m vedas_hf.convert)."
        )
    if "AutoModelForImageTextToText" not in (config.get("auto_map") or {}):
        raise ValueError(f"{config_path} has no auto_map for AutoModelForImageTextToText; save it with `import vedas_hf`.")
    missing = [name for name in CODE_FILES if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"{folder} lacks {missing}, the code trust_remote_code runs; re-save with `import vedas_hf`.")
    files = sorted(
        str(path.relative_to(folder)) for path in folder.rglob("*")
        if path.is_file() and not _is_leftover(path.relative_to(folder))
    )
    pickles = [name for name in files if name.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise ValueError(f"{folder} holds pickle files {pickles}; only safetensors are pushed. Remove them first.")
    if not any(name.endswith(".safetensors") for name in files):
        raise ValueError(f"{folder} has no *.safetensors weights.")
    return files


def push_to_hub(folder, repo_id: str, private: bool = False, revision: str | None = None,
                commit_message: str = "Upload Vedas checkpoint", token: str | None = None, api: HfApi | None = None):
    """Create `repo_id` (if needed) and upload `folder` to it, on branch `revision` (created if needed).

    Returns:
        The `huggingface_hub` commit info of the upload.
    """
    files = check_folder(folder)
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
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="Vedas checkpoint folder (vedas_hf.convert or trainer.save_model output)")
    parser.add_argument("repo_id", help="target repository, e.g. your-name/vedas-qwen2-vl-2b")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--revision", default=None, help="branch to push to (created if missing)")
    parser.add_argument("--message", default="Upload Vedas checkpoint", help="commit message")
    args = parser.parse_args(argv)
    info = push_to_hub(args.folder, args.repo_id, private=args.private, revision=args.revision,
                       commit_message=args.message)
    print(f"Pushed {args.folder} to {args.repo_id}: {getattr(info, 'commit_url', info)}")


if __name__ == "__main__":
    main()
