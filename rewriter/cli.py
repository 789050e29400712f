"""The ``rewriter`` command.

    rewriter report hf:gpt2                      # build GPT-2 (random weights), optimize, print the report
    rewriter report hf:llama --layers 2 --hidden 256 --json report.json
    rewriter report my_models.py:make --device cuda --dtype bfloat16
    rewriter passes                              # the passes, one line each

``report`` runs the passes without Inductor unless ``--inductor`` is given: the report is the same
and it is much quicker to produce. Progress goes to stderr, the report to stdout.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager

import torch

__all__ = ["main"]

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rewriter", description="Find and rewrite the attention and linear "
                                "subgraphs of a PyTorch model; print what was done.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("report", help="optimize a model and print the report pass by pass")
    r.add_argument("target", help="hf:MODEL_TYPE (e.g. hf:gpt2) or path/to/file.py:factory")
    r.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE")
    r.add_argument("--device", default="cpu", help="device to run on (cpu, cuda, cuda:1); default cpu")
    r.add_argument("--dtype", default="float32", choices=sorted(_DTYPES), help="model and input dtype")
    r.add_argument("--passes", help="comma-separated pass names to run (default: the mode's passes)")
    r.add_argument("--mode", default="exact", choices=["exact", "fast", "max"])
    r.add_argument("--estimate-for", metavar="GPU", help="device for cost estimates (H100, H200, A100); "
                   "default: the device run on")
    r.add_argument("--inductor", action="store_true", help="also compile with Inductor")
    r.add_argument("--no-validate", action="store_true", help="skip checking each rewrite against the original")
    r.add_argument("--cuda-graphs", action="store_true", help="with --inductor: run the compiled graphs as "
                   "CUDA graphs (one launch per graph)")
    r.add_argument("--measure", action="store_true", help="also time each rewritten site and the whole model "
                   "against the original on the device run on")
    r.add_argument("--batch", type=int, default=1, help="hf: batch size of the example input (default 1)")
    r.add_argument("--seq", type=int, default=128, help="hf: sequence length of the example input (default 128)")
    r.add_argument("--layers", type=int, help="hf: number of layers (shrink the model)")
    r.add_argument("--hidden", type=int, help="hf: hidden size (shrink the model)")
    r.add_argument("--heads", type=int, help="hf: attention heads")
    sub.add_parser("passes", help="list the passes")
    return p


@contextmanager
def _step(text: str):
    from rich.console import Console

    console = Console(stderr=True)
    with console.status(text):
        yield
    console.print(f"[dim]{text} done[/dim]")


def _config(args):
    from .config import Config
    from .passes import pass_names

    enable, disable = (), ()
    if args.passes:
        chosen = [p.strip() for p in args.passes.split(",") if p.strip()]
        unknown = [p for p in chosen if p not in pass_names()]
        if unknown:
            raise ValueError(f"unknown pass(es) {', '.join(unknown)}; known: {', '.join(pass_names())}")
        enable = tuple(chosen)
        disable = tuple(p for p in pass_names() if p not in chosen)
    return Config(mode=args.mode, enable=tuple(p for p in enable if p not in _defaults(args.mode)),
                  disable=disable, inductor=args.inductor, validate=not args.no_validate, device=args.estimate_for,
                  measure=args.measure, cuda_graphs=args.cuda_graphs)


def _defaults(mode: str) -> list[str]:
    from .config import Config

    return Config(mode=mode).active_passes()


def _report(args) -> int:
    from .api import optimize
    from .targets import load_target

    config = _config(args)
    dtype = _DTYPES[args.dtype]
    with _step(f"building {args.target}"):
        target = load_target(args.target, batch=args.batch, seq=args.seq, layers=args.layers, hidden=args.hidden,
                             heads=args.heads)
        model = target.model.to(device=args.device, dtype=dtype).eval()
        move = lambda t: t.to(args.device, dtype if t.is_floating_point() else t.dtype) \
            if isinstance(t, torch.Tensor) else t
        inputs = tuple(move(a) for a in target.args)
        kwargs = {k: move(v) for k, v in target.kwargs.items()}
    with _step("capturing, rewriting and checking" + (", compiling" if args.inductor else "")
               + (", timing" if args.measure else "")):
        optimized = optimize(model, inputs, example_kwargs=kwargs, config=config)
    print(optimized.report.render())
    if args.json:
        with open(args.json, "w") as f:
            f.write(optimized.report.to_json())
        print(f"report written to {args.json}", file=sys.stderr)
    return 0


def _passes() -> int:
    from .passes import all_passes

    for p in all_passes():
        modes = "opt-in" if not p.modes else "/".join(p.modes)
        print(f"{p.name:<12} {'exact' if p.exact else 'lossy':<6} {modes:<16} {p.description}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "passes":
            return _passes()
        return _report(args)
    except (ValueError, TypeError, ImportError) as exc:
        print(f"rewriter: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
