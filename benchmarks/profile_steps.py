"""Where the time of latent `generate` and of a training step goes, by phase and component, next to stock.

    python benchmarks/profile_steps.py [--mode generate|train] [--device cpu|cuda] [--size tiny|small|2b] ...

Wraps the Vedas model's methods with timers (exclusive time: a component's own time minus the wrapped components it
calls) and, in a second untimed run, counts the dispatched aten ops of each component. Rows are phases (the routed
prompt pass, the latent steps, decoding, the reconstruction, backward), columns the components:

  stock layers   the backbone's decoder layers (`super().forward`) and the Vedas layer's own glue
  routing        `_route`: router scores, top-alpha, the restricted pass over the selected tokens, mixing (eq. 10-12)
  saliency       `_last_token_attention` / `_detached_saliency`: the last token's attention row (eq. 4)
  text glue      the text model's forward outside its layers (masks, rotary embedding, final norm)
  vision tower   `get_image_features` (the prompt's images; in the reconstruction phase, the crops)
  replay / loop  `_replay_tokens` (eqs. 5-6) and `_implicit_phase`'s own work (positions, masks, concatenations)
  other          everything else in the phase (HF's generation loop, logits, lm_head, loss, crop cutting, ...)

`--mode generate`: the workload of `bench_generate.py` at batch 1 (`--visual-tokens`, `--new-tokens`, T_r). The
per-latent-step and per-decoding-step rows divide the phase by T_r and by the decoded tokens. `--mode train`: one
optimizer step of `bench_train.py`'s batch. Both also profile the stock model on the same input for comparison.
On CUDA every timer synchronises, which serialises the GPU: use it for proportions, not for latency.
"""

import collections
import contextlib
import functools
import time

from _common import base_parser, build_model, finish_args, print_header, prompt_batch, synchronize, table

import torch
from torch.utils._python_dispatch import TorchDispatchMode


COMPONENTS = ("stock layers", "routing", "saliency", "text glue", "vision tower", "replay / loop", "other")


class Profile:
    """Exclusive time and op counts per (phase, component), from wrappers installed on a model's methods."""

    def __init__(self, device):
        self.device = device
        self.time = collections.defaultdict(float)
        self.ops = collections.Counter()
        self.calls = collections.Counter()  # calls that set a phase, per phase (timed runs only)
        self.stack = []  # [phase, component, start, children_time]
        self.counting = False

    def key(self):
        return (self.stack[-1][0], self.stack[-1][1]) if self.stack else ("other", "other")

    @contextlib.contextmanager
    def region(self, component, phase=None):
        synchronize(self.device)
        outer_phase = self.stack[-1][0] if self.stack else "other"
        entry = [phase or outer_phase, component, time.perf_counter(), 0.0]
        if phase is not None and not self.counting:
            self.calls[phase] += 1
        self.stack.append(entry)
        try:
            yield
        finally:
            synchronize(self.device)
            elapsed = time.perf_counter() - entry[2]
            self.stack.pop()
            if not self.counting:
                self.time[(entry[0], entry[1])] += elapsed - entry[3]
                if self.stack:
                    self.stack[-1][3] += elapsed

    def wrap(self, owner, name, component, phase_of=None):
        """Replace `owner.name` (a class or an instance attribute) by a timed version."""
        original = getattr(owner, name)
        profile = self

        @functools.wraps(original)  # keeps the signature (transformers inspects some of these)
        def timed(*args, **kwargs):
            phase = phase_of(*args, **kwargs) if phase_of else None
            with profile.region(component, phase):
                return original(*args, **kwargs)

        setattr(owner, name, timed)

    def top_level(self, phase):
        """Time a whole call as `phase` / other (its wrapped components are subtracted)."""
        return self.region("other", phase)


class _OpCounter(TorchDispatchMode):
    def __init__(self, profile):
        super().__init__()
        self.profile = profile

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.profile.ops[self.profile.key()] += 1
        return func(*args, **(kwargs or {}))


def _class_defining(model, name):
    return next(cls for cls in type(model).__mro__ if name in vars(cls))


def instrument(model, profile):
    """Install the timers on the Vedas model `model` (its classes are patched: one model per process)."""
    language = model.model.language_model
    layer_cls = _class_defining(language.layers[0], "_route")
    mixin = _class_defining(model, "_implicit_phase")
    profile.wrap(_class_defining(language.layers[0], "forward"), "forward", "stock layers")
    profile.wrap(layer_cls, "_route", "routing")
    profile.wrap(layer_cls, "_last_token_attention", "saliency")
    profile.wrap(layer_cls, "_detached_saliency", "saliency")
    profile.wrap(language, "forward", "text glue")
    profile.wrap(model.model, "get_image_features", "vision tower")
    profile.wrap(mixin, "_replay_tokens", "replay / loop")
    profile.wrap(mixin, "_implicit_phase", "replay / loop")

    def pass_phase(self, embeds, positions, full_mask, cache, router_cache, eligible, chunks, chunk_index, *a, **k):
        return "prompt pass (routed)" if chunk_index == 0 else "latent steps"

    profile.wrap(mixin, "_routed_pass", "other", pass_phase)
    profile.wrap(mixin, "_reconstruction_losses", "other", lambda *a, **k: "reconstruction")

    def stock_phase(self, **inputs):
        ids = inputs.get("input_ids")
        return "decoding steps" if ids is not None and ids.shape[1] == 1 else None

    profile.wrap(mixin, "_stock_forward", "other", stock_phase)


def run_profile(profile, fn, reps):
    fn()  # warmup
    profile.time.clear(), profile.ops.clear(), profile.calls.clear()
    for _ in range(reps):
        fn()
    timed = {key: value / reps for key, value in profile.time.items()}
    calls = {phase: count / reps for phase, count in profile.calls.items()}
    profile.counting = True
    with _OpCounter(profile):
        fn()
    profile.counting = False
    return timed, dict(profile.ops), calls


def report(title, timed, ops, per=()):
    """Print the phase x component table; `per` (label, phase, calls) rows divide a phase by its calls."""
    phases = sorted({phase for phase, _ in timed}, key=lambda p: -sum(v for (q, _), v in timed.items() if q == p))
    rows = []
    for phase in phases:
        cells = [f"{timed.get((phase, c), 0) * 1e3:.2f} / {ops.get((phase, c), 0)}" for c in COMPONENTS]
        total = sum(v for (q, _), v in timed.items() if q == phase)
        count = sum(v for (q, _), v in ops.items() if q == phase)
        rows.append([phase, *cells, f"{total * 1e3:.2f} / {count}"])
    for label, phase, n in per:
        if n:
            total = sum(v for (q, _), v in timed.items() if q == phase) / n
            count = sum(v for (q, _), v in ops.items() if q == phase) / n
            rows.append([label, *(f"{timed.get((phase, c), 0) / n * 1e3:.2f} / {ops.get((phase, c), 0) / n:.0f}"
                                  for c in COMPONENTS), f"{total * 1e3:.2f} / {count:.0f}"])
    print(f"\n{title} (ms per call / aten ops; exclusive)")
    print(table(["phase", *COMPONENTS, "total"], rows))
    return {f"{p}|{c}": {"ms": timed.get((p, c), 0) * 1e3, "ops": ops.get((p, c), 0)} for p in phases
            for c in COMPONENTS}


def main():
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("generate", "train"), default="generate")
    parser.add_argument("--latent-steps", type=int, default=4, help="T_r")
    parser.add_argument("--top-k", type=int, default=32, help="K")
    parser.add_argument("--router-top-k", type=int, default=32, help="alpha")
    parser.add_argument("--visual-tokens", type=int, default=64, help="generate: merged visual tokens of the image")
    parser.add_argument("--new-tokens", type=int, default=32, help="generate: answer length (forced)")
    parser.add_argument("--batch", type=int, default=8, help="train: records per step")
    parser.add_argument("--digit-size", type=int, default=None, help="train: digit tile side (default as bench_train)")
    parser.add_argument("--recon-crop-size", type=int, default=None, help="train: recon_crop_size for the Vedas step")
    parser.add_argument("--reps", type=int, default=None, help="profiled calls to average (default 20 / 3)")
    args = finish_args(parser.parse_args())
    steps, new = args.latent_steps, args.new_tokens
    if args.reps is None:
        args.reps = 20 if args.mode == "generate" else 3
    if args.mode == "train":
        args.digit_size = args.digit_size or (224 if args.size == "2b" else 64)
        cell = 28 if args.size == "2b" else 8
        args.visual_tokens = (3 * args.digit_size // cell + 1) * (args.digit_size // cell + 1)
    built = build_model(args, num_latent_steps=steps, replay_top_k=args.top_k, router_top_k=args.router_top_k)
    model = built.model
    profile = Profile(args.device)
    instrument(model, profile)
    results = {}
    if args.mode == "generate":
        inputs = prompt_batch(built, 1, device=args.device)
        print_header("profile_steps (generate)", args, built, {
            "prompt": f"{inputs['input_ids'].shape[1]} tokens ({built.visual_tokens} visual), answer {new} tokens, "
                      f"T_r={steps}, K={args.top_k}, batch 1, mean of {args.reps} calls",
        })
        for label, latent in (("stock generate", 0), ("vedas generate", steps)):
            def call(latent=latent):
                with torch.no_grad(), profile.top_level("other"):
                    model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                   num_latent_steps=latent)

            timed, ops, calls = run_profile(profile, call, args.reps)
            per = [(f"per {name[:-1]}", name, calls.get(name, 0)) for name in ("latent steps", "decoding steps")]
            results[label] = report(label, timed, ops, per)
    else:
        from bench_train import training_batch

        model.train()
        batch, stock_batch = training_batch(built, args)
        if args.recon_crop_size:
            model.config.recon_crop_size = args.recon_crop_size
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
        print_header("profile_steps (train)", args, built, {
            "batch": f"{args.batch} x {batch['input_ids'].shape[1]} tokens, T_r={steps}, K={args.top_k}, "
                     f"mean of {args.reps} steps",
        })
        for label, inputs in (("stock step", stock_batch), ("vedas step", batch)):
            def call(inputs=inputs):
                optimizer.zero_grad(set_to_none=True)
                with profile.top_level("forward (rest)"):
                    loss = model(**inputs).loss
                with profile.top_level("backward"):
                    loss.backward()
                with profile.top_level("optimizer"):
                    optimizer.step()

            timed, ops, _ = run_profile(profile, call, args.reps)
            results[label] = report(label, timed, ops)
    if args.json:
        from _common import write_json

        write_json(args.json, {"benchmark": f"profile_{args.mode}", "args": vars(args), "profile": results})


if __name__ == "__main__":
    main()
