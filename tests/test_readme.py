"""The README's Python snippets run as written (doctest-style): the files they name are prepared first."""

import contextlib
import io
import os
import re

from vedas_hf.testing import make_tiny_checkpoint


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_snippets(path):
    with open(path) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def test_readme_quickstart_runs_and_prints_the_answer_and_the_trace(tmp_path, monkeypatch):
    snippets = python_snippets(os.path.join(REPO, "README.md"))
    assert snippets, "the README has no Python snippet"
    monkeypatch.chdir(tmp_path)
    # what `python examples/sft.py` would leave there (untrained here: the snippet's mechanics are under test)
    make_tiny_checkpoint(tmp_path / "runs" / "vedas-tiny-digits" / "final", seed=0, replay_top_k=4, router_top_k=2,
                         recon_window=2, num_latent_steps=2)
    for snippet in snippets:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(snippet, "README.md", "exec"), {"__name__": "readme"})
        lines = printed.getvalue().splitlines()
        # the answer line, then one line per latent step: its replayed visual tokens (K = 4) and the window box
        assert len(lines) >= 3
        steps = [line for line in lines if re.match(r"^\d+ \[", line)]
        assert [line.split()[0] for line in steps] == ["0", "1"]
        assert all(len(re.search(r"\[(.*?)\]", line).group(1).split(",")) == 4 for line in steps)


def test_generate_doc_snippets_run_in_order(tmp_path, monkeypatch):
    """docs/generate.md: the loading snippet, then the pipeline snippet that continues it."""
    snippets = python_snippets(os.path.join(REPO, "docs", "generate.md"))
    assert len(snippets) >= 2
    monkeypatch.chdir(tmp_path)
    make_tiny_checkpoint(tmp_path / "runs" / "vedas-tiny-digits" / "final", seed=0, replay_top_k=4, router_top_k=2,
                         recon_window=2, num_latent_steps=2)
    namespace = {"__name__": "docs"}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        for snippet in snippets:
            exec(compile(snippet, "docs/generate.md", "exec"), namespace)
    assert namespace["out"].shape[0] == 1 and printed.getvalue().strip()
    assert isinstance(namespace["pipe"](text=namespace["messages"], max_new_tokens=2, return_full_text=False,
                                        generate_kwargs={"num_latent_steps": 2})[0]["generated_text"], str)
