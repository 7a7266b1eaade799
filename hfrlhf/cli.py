"""The ``hfrlhf`` command: ``hfrlhf sft|reward|dpo|kto|ppo [--config FILE.yaml] [--flag value ...]``.

It runs the same workflows as the scripts in ``recipes/`` (``hfrlhf dpo --config c.yaml`` does what
``python recipes/dpo_llama.py --config c.yaml`` does) from an installed package, and works under
``accelerate launch`` / ``torchrun`` too (``accelerate launch -m hfrlhf.cli dpo ...``).
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Sequence

from hfrlhf import __version__
from hfrlhf.workflows import METHODS, get_workflow

__all__ = ["main", "usage"]


def usage() -> str:
    """The top-level help text."""
    width = max(len(m) for m in METHODS)
    lines = ["usage: hfrlhf <method> [--config FILE.yaml] [--<argument> VALUE ...]", "",
             "Train with one of hfrlhf's workflows (the code behind recipes/*.py). Methods:"]
    lines += [f"  {m:<{width}}  {doc}" for m, doc in METHODS.items()]
    lines += ["", "Every argument of the method's config, ModelArguments and ScriptArguments is a flag; values in",
              "--config are defaults that flags override. 'hfrlhf <method> --help' lists them all.",
              "Example: hfrlhf dpo --config recipes/configs/dpo_llama.yaml --max_steps 10"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(f"hfrlhf {__version__}")
        return 0
    method, rest = argv[0], argv[1:]
    if method not in METHODS:
        close = difflib.get_close_matches(method, list(METHODS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(f"hfrlhf: unknown method {method!r}{hint}\n\n{usage()}", file=sys.stderr)
        return 2
    from hfrlhf.workflows.args import parse_args

    workflow = get_workflow(method)
    script_args, training_args, model_args = parse_args(workflow.ARGUMENTS, rest, prog=f"hfrlhf {method}")
    workflow.run(script_args, training_args, model_args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
