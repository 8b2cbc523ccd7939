"""Mutation check: apply one-line bugs to the method's core, run the tests that should notice, fail if one survives.

    python tests/mutations.py            # every mutation (about 3 minutes on 2 CPU cores)
    python tests/mutations.py --list     # the mutations and the tests that must catch them

Each mutation is applied to a copy of the package in a temporary folder (the working tree is never changed) and the
tests run against that copy (`PYTHONPATH` puts it before the installed package). The unmutated copy is run first:
its tests must pass, or every "caught" would mean nothing. A mutation whose target line is no longer in the source
is an error too (the list has to follow the code).
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELING = "modeling/modeling_vedas.py"
CONFIGURATION = "modeling/configuration_vedas.py"
REFERENCE = "tests/test_reference.py"
COMPONENTS = "tests/test_components.py"

# (name, file, original text, mutated text, tests that must fail)
MUTATIONS = [
    ("eq. 5: replay the least salient visual tokens", MODELING,
     "scores = saliency.gather(1, visual_pos).masked_fill(", "scores = (-saliency).gather(1, visual_pos).masked_fill(",
     [REFERENCE]),
    ("eq. 6: b(t) summed instead of averaged", MODELING,
     "pooled = (pooled_weights * pooled_visual).sum(dim=1) / count.to(visual.dtype)",
     "pooled = (pooled_weights * pooled_visual).sum(dim=1)", [REFERENCE]),
    ("eq. 6: uniform weights instead of the softmax of the saliency", MODELING,
     "weights = _replay_weights(top.values, index_valid)",
     "weights = index_valid.float() / index_valid.sum(-1, keepdim=True).clamp(min=1)", [REFERENCE]),
    ("eq. 10: route the bottom-alpha tokens", MODELING,
     "chunk_scores = scores[:, start:end].masked_fill(", "chunk_scores = (-scores[:, start:end]).masked_fill(",
     [REFERENCE]),
    ("eq. 1: latent chain detached between steps", MODELING,
     "latent = last_hidden.unsqueeze(1).to(prompt_embeds.dtype)  # eq. 1",
     "latent = last_hidden.detach().unsqueeze(1).to(prompt_embeds.dtype)", [REFERENCE]),
    ("positions after the prompt off by one", MODELING,
     "positions = (full_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -new_len:] + rope_deltas",
     "positions = (full_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -new_len:] + rope_deltas + 1", [REFERENCE]),
    ("eq. 12: gate e(d) ignored", MODELING,
     "output = output.scatter_add(1, scatter_index, refined * self.router.gate[depth].to(refined.dtype))",
     "output = output.scatter_add(1, scatter_index, refined)", [REFERENCE]),
    ("eq. 11: router score scale dropped", MODELING,
     "scale = (torch.sigmoid(logits.gather(1, index)) * valid)",
     "scale = (torch.ones_like(logits.gather(1, index)) * valid)", [REFERENCE]),
    ("eq. 4: saliency of the last layer only", MODELING,
     "return torch.stack([rows[i] for i in sorted(rows)]).mean(0).nan_to_num(0.0)",
     "return rows[max(rows)].nan_to_num(0.0)", [REFERENCE]),
    ("eq. 15: cosine schedule reversed", CONFIGURATION,
     "value = alpha_end + (alpha_start - alpha_end) / 2 * (1 + math.cos(math.pi * layer_idx / num_layers))",
     "value = alpha_start + (alpha_end - alpha_start) / 2 * (1 + math.cos(math.pi * layer_idx / num_layers))",
     [REFERENCE]),
    ("table 5d: rearranged positions restart at 0 in every chunk", MODELING,
     "offset = past[2].sum(dim=1, keepdim=True) if past is not None else 0", "offset = 0", [REFERENCE]),
    ("no-collapse rule removed: b(t) pools the visual features with their gradient", MODELING,
     "pooled_visual = visual if self.config.recon_grad_to_vision else visual.detach()", "pooled_visual = visual",
     [REFERENCE, COMPONENTS]),
    ("no-collapse rule removed: b(t)'s weights take their gradient from the saliency (keys of the visual tokens)",
     MODELING, "saliency, visual_pos, visual_valid, visited, prompt_embeds, active, top_k, detached_saliency",
     "saliency, visual_pos, visual_valid, visited, prompt_embeds, active, top_k, None", [REFERENCE, COMPONENTS]),
    ("eq. 7: the sparsest window instead of the densest", MODELING,
     "flat = int(sums.flatten().argmax())", "flat = int(sums.flatten().argmin())", [REFERENCE]),
]
# one backbone is enough to catch a one-line bug in shared code, and halves the time
PYTEST_FILTER = "not qwen2_5_vl"


def make_copy(root: str) -> str:
    """The package (with `modeling/` at `vedas_hf/modeling`) and the tests under `root`; returns the import root."""
    src = os.path.join(root, "src")
    shutil.copytree(os.path.join(REPO, "vedas_hf"), os.path.join(src, "vedas_hf"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(os.path.join(REPO, "modeling"), os.path.join(src, "vedas_hf", "modeling"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(os.path.join(REPO, "tests"), os.path.join(root, "tests"), ignore=shutil.ignore_patterns("__pycache__"))
    return src


def copy_path(src: str, path: str) -> str:
    """Where a repository path (`modeling/...`) lives in the copy."""
    return os.path.join(src, "vedas_hf", path) if path.startswith("modeling/") else os.path.join(src, path)


def run_tests(root: str, src: str, tests: list) -> tuple[bool, list]:
    """Run `tests` against the copy, stopping at the first failure; returns (passed, the failed test)."""
    env = {**os.environ, "PYTHONPATH": src, "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", PYTEST_FILTER, *tests]
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
    failed = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("FAILED ")]
    return result.returncode == 0, failed


def check_copy_imports_itself(root: str, src: str) -> None:
    env = {**os.environ, "PYTHONPATH": src}
    found = subprocess.run([sys.executable, "-c", "import vedas_hf.modeling.modeling_vedas as m; print(m.__file__)"],
                           cwd=root, env=env, capture_output=True, text=True, check=True).stdout.strip()
    if not found.startswith(src):
        raise SystemExit(f"the tests would import {found}, not the mutated copy under {src}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="print the mutations and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, path, _, _, tests in MUTATIONS:
            print(f"{name}  [{path}; caught by {', '.join(tests)}]")
        return 0
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        src = make_copy(root)
        check_copy_imports_itself(root, src)
        all_tests = sorted({t for *_, tests in MUTATIONS for t in tests})
        passed, failed = run_tests(root, src, all_tests)
        if not passed:
            print(f"the unmutated code fails {failed or 'the tests'}: fix that first")
            return 1
        survivors = []
        for name, path, original, mutated, tests in MUTATIONS:
            target = copy_path(src, path)
            with open(target) as f:
                source = f.read()
            if source.count(original) != 1:
                print(f"ERROR {name}: the line to mutate occurs {source.count(original)} times in {path}: "
                      f"update MUTATIONS")
                return 1
            with open(target, "w") as f:
                f.write(source.replace(original, mutated))
            try:
                passed, failed = run_tests(root, src, tests)
            finally:
                with open(target, "w") as f:
                    f.write(source)
            if passed:
                survivors.append(name)
                print(f"SURVIVED {name}")
            else:
                print(f"caught   {name}: {len(failed)} failed, e.g. {', '.join(failed[:2])}")
    minutes = (time.perf_counter() - start) / 60
    print(f"{len(MUTATIONS) - len(survivors)} of {len(MUTATIONS)} mutations caught in {minutes:.1f} min")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
