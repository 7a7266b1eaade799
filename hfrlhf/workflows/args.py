"""Command-line and YAML arguments shared by every workflow, recipe and the ``hfrlhf`` command.

A run is described by three dataclasses: :class:`ScriptArguments` (data, evaluation, plot, merge, Hub
card), the trainer's config (a ``TrainingArguments`` subclass such as ``DPOConfig``) and
:class:`~hfrlhf.models.loading.ModelArguments`. :class:`ArgumentParser` is an ``HfArgumentParser`` over
them that also takes ``--config run.yaml``: the file's values become the defaults and flags given on the
command line win over them. One flat mapping of field names, as TRL's scripts take it:

.. code-block:: yaml

    model_name_or_path: smollm2-135m-instruct
    use_peft: true
    learning_rate: 5.0e-6
    beta: 0.1

>>> from hfrlhf.models.loading import ModelArguments
>>> from hfrlhf.trainers.base import HfrlhfConfig
>>> parser = ArgumentParser((ScriptArguments, HfrlhfConfig, ModelArguments))
>>> script, train, model = parser.parse(["--output_dir", "out", "--use_peft", "--lora_r", "8", "--bf16", "false"])
>>> model.use_peft, model.lora_r, train.output_dir, script.plot
(True, 8, 'out', True)
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import enum
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml
from transformers import HfArgumentParser

__all__ = ["ScriptArguments", "ArgumentParser", "parse_args", "to_yaml", "save_yaml", "SECRET_FIELDS"]

SECRET_FIELDS = ("hub_token",)
"""Fields never written to a file, a log or a model card."""


@dataclass
class ScriptArguments:
    """What a run trains on and what it leaves behind, besides the trainer's config and the model."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Data: a .jsonl/.json/.parquet file, a saved dataset folder or a Hub dataset id. "
                          "Default: the example file shipped with hfrlhf for this method."},
    )
    dataset_format: str = field(
        default="auto", metadata={"help": "Source schema (see hfrlhf.data.formats.FORMATS), or 'auto' to detect it."}
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on (Hub / DatasetDict data)."})
    dataset_test_split: str | None = field(
        default=None, metadata={"help": "Split to evaluate on (Hub / DatasetDict data); see also eval_fraction."}
    )
    eval_fraction: float = field(
        default=0.0,
        metadata={"help": "Hold out this fraction of the training rows for evaluation (used when there is no "
                          "dataset_test_split). 0 = no held-out set."},
    )
    eval_before_train: bool = field(
        default=True,
        metadata={"help": "With an evaluation set, evaluate before training too and print before vs after."},
    )
    plot: bool = field(default=True, metadata={"help": "Write training_curves.png into output_dir at the end."})
    merge_adapter: bool = field(
        default=False,
        metadata={"help": "After LoRA training, also merge the adapter into the base weights and save a full "
                          "model (safetensors) in output_dir/merged."},
    )
    base_model_id: str | None = field(
        default=None,
        metadata={"help": "Hub id recorded as base_model in the model card when the model was loaded from a "
                          "local folder (default: the model's Hub id, or nothing for a local folder)."},
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")


class ArgumentParser(HfArgumentParser):
    """``HfArgumentParser`` that also reads ``--config FILE.yaml`` (values there are defaults; flags win).

    Unknown keys in the file are an error that names the closest known argument, so a typo never silently
    leaves a default in place. A field that several dataclasses share (``trust_remote_code`` in a config
    and in ``ModelArguments``) is one flag whose value goes to each of them.
    """

    @staticmethod
    def _parse_dataclass_field(parser: argparse.ArgumentParser, field: dataclasses.Field) -> None:
        if f"--{field.name}" in parser._option_string_actions:
            return  # declared by an earlier dataclass: one flag feeds both
        HfArgumentParser._parse_dataclass_field(parser, field)

    def __init__(self, dataclass_types: Sequence[type] | type, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(dataclass_types, **kwargs)
        for dtype in self.dataclass_types:
            if "config" in {f.name for f in dataclasses.fields(dtype)}:
                raise ValueError(f"{dtype.__name__} has a field named 'config', which --config reserves")
        for action in self._actions:  # argparse %-formats help texts: a lone "30%" would break --help
            if action.help:
                action.help = re.sub(r"%%|%(?!\()", "%%", action.help)  # "%%" stays, a lone "%" doubles
        self.add_argument("--config", default=None, metavar="FILE.yaml",
                          help="YAML file of argument values; command-line flags override them.")

    def apply_config(self, values: dict[str, Any], source: str = "config") -> None:
        """Make ``values`` (field name -> value) the defaults of their arguments."""
        known: dict[str, argparse.Action] = {}
        for action in self._actions:
            if action.dest not in (argparse.SUPPRESS, "help", "config"):
                known.setdefault(action.dest, action)
        unknown = [k for k in values if k not in known]
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, list(known), n=1)
                hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ValueError(f"{source}: unknown argument(s) {', '.join(hints)}")
        defaults = {}
        for key, value in values.items():
            action = known[key]
            if action.nargs in ("+", "*") and value is not None and not isinstance(value, list):
                value = [value]  # a single value for a list field
            defaults[key] = value
            action.required = False
        self.set_defaults(**defaults)

    def parse(self, args: Sequence[str] | None = None) -> tuple[Any, ...]:
        """Parse ``args`` (default: ``sys.argv[1:]``) into one instance per dataclass, in order."""
        argv = list(sys.argv[1:] if args is None else args)
        pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
        pre.add_argument("--config", default=None)
        known, _ = pre.parse_known_args(argv)
        if known.config:
            self.apply_config(load_yaml(known.config), source=known.config)
        namespace, remaining = self.parse_known_args(argv)
        if remaining:
            flags = sorted({o for a in self._actions for o in a.option_strings})
            hints = []
            for item in remaining:
                close = difflib.get_close_matches(item, flags, n=1) if item.startswith("--") else []
                hints.append(item + (f" (did you mean {close[0]}?)" if close else ""))
            self.error(f"unrecognized arguments: {' '.join(hints)}")
        outputs = []
        for dtype in self.dataclass_types:
            names = [f.name for f in dataclasses.fields(dtype) if f.init and hasattr(namespace, f.name)]
            outputs.append(dtype(**{name: getattr(namespace, name) for name in names}))
        return tuple(outputs)


def load_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a flat YAML mapping of argument values (an empty file is an empty mapping)."""
    with open(path, encoding="utf-8") as f:
        values = yaml.safe_load(f)
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of argument names to values, got {type(values).__name__}")
    return values


def parse_args(dataclass_types: Sequence[type], args: Sequence[str] | None = None, *, prog: str | None = None
               ) -> tuple[Any, ...]:
    """Parse the command line (with ``--config``) into ``(script_args, training_args, model_args)``."""
    return ArgumentParser(dataclass_types, prog=prog).parse(args)


def _plain(value: Any) -> Any:
    """A YAML-safe copy of ``value``: enums by value, dataclasses and tuples as mappings and lists."""
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot write a {type(value).__name__} to YAML")


def _default(f: dataclasses.Field, reference: Any) -> Any:
    if reference is not None:
        return getattr(reference, f.name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def to_yaml(*objs: Any) -> str:
    """The values of ``objs`` that differ from their defaults, as one flat YAML mapping.

    Parsing the result with ``--config`` gives back equal dataclasses. Secrets (:data:`SECRET_FIELDS`) are
    never written.

    >>> print(to_yaml(ScriptArguments(dataset_name="data.jsonl", eval_fraction=0.25)).strip())
    dataset_name: data.jsonl
    eval_fraction: 0.25
    """
    out: dict[str, Any] = {}
    for obj in objs:
        try:  # defaults as __post_init__ leaves them, so derived values are not written
            reference = type(obj)()
        except (TypeError, ValueError):
            reference = None
        for f in dataclasses.fields(obj):
            if not f.init or f.name in SECRET_FIELDS or f.name.endswith("_token"):
                continue
            value = getattr(obj, f.name)
            default = _default(f, reference)
            try:
                plain = _plain(value)
            except TypeError:
                continue  # objects (callables, configs) have no YAML form; they are not command-line values
            if default is not dataclasses.MISSING:
                try:
                    if plain == _plain(default):
                        continue
                except TypeError:
                    pass
            out[f.name] = plain
    return yaml.safe_dump(out, sort_keys=False, allow_unicode=True)


def save_yaml(path: str | os.PathLike[str], *objs: Any) -> None:
    """Write :func:`to_yaml` of ``objs`` to ``path`` (the run's arguments, for ``--config`` to repeat it)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(to_yaml(*objs))
