"""Model cards and pushing trained weights (a LoRA adapter alone, or a full model) to the Hugging Face Hub.

The card is a README.md with YAML metadata the Hub reads (``base_model``, ``library_name``, ``tags``,
``datasets``) and a body saying how the model was trained, with which hyperparameters and to what
final metrics. A Hub token is taken from the caller (or the usual ``HF_TOKEN`` / ``hf auth login``
lookup inside ``huggingface_hub``) and never reaches the card, a log line or a file.

>>> card = ModelCard(method="dpo", base_model="HuggingFaceTB/SmolLM2-135M-Instruct", adapter=True,
...                  datasets=["trl-lib/ultrafeedback_binarized"], hyperparameters={"beta": 0.1},
...                  metrics={"eval_rewards/accuracies": 0.75})
>>> meta = card_metadata(card.render())
>>> meta["library_name"], meta["base_model"], meta["tags"][:2]
('peft', 'HuggingFaceTB/SmolLM2-135M-Instruct', ['hfrlhf', 'dpo'])
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import yaml

from hfrlhf.models.bundled import is_bundled_name

__all__ = [
    "BUNDLED_HUB_ID",
    "ModelCard",
    "card_metadata",
    "base_model_id",
    "files_to_push",
    "push_to_hub",
]

logger = logging.getLogger(__name__)

BUNDLED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The Hub id of the model hfrlhf bundles for offline use."""

METHOD_NAMES = {
    "sft": "supervised fine-tuning with a completion-only loss",
    "reward": "reward modelling on human preferences (Bradley-Terry and friends)",
    "dpo": "Direct Preference Optimization (DPO, arXiv:2305.18290) and its family of losses",
    "kto": "Kahneman-Tversky Optimization (KTO, arXiv:2402.01306)",
    "ppo": "PPO against a reward with a KL penalty to the reference (arXiv:2203.02155)",
}

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
               "model.safetensors.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")
EXTRA_FILES = ("README.md", "training_curves.png")


def base_model_id(name_or_path: str, override: str | None = None) -> str | None:
    """The Hub id to record as ``base_model``: the override, the bundled model's id, a Hub id as given, or
    None for a local folder (a path is no Hub id).

    >>> base_model_id("smollm2-135m-instruct"), base_model_id("meta-llama/Llama-3.2-1B")
    ('HuggingFaceTB/SmolLM2-135M-Instruct', 'meta-llama/Llama-3.2-1B')
    """
    if override:
        return override
    if is_bundled_name(name_or_path):
        return BUNDLED_HUB_ID
    if os.path.exists(name_or_path):
        return None
    return name_or_path


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value)


@dataclass
class ModelCard:
    """What a model card says about one training run.

    Attributes:
        method: ``"sft"``, ``"reward"``, ``"dpo"``, ``"kto"`` or ``"ppo"``.
        base_model: Hub id of the model trained from (None: not recorded).
        adapter: True when the weights are a LoRA adapter (``library_name: peft``).
        datasets: Hub ids of the training data (local files go in ``data_description``).
        hyperparameters: name -> value, shown in a table (never secrets: the caller filters them).
        metrics: final metrics, name -> value.
        metrics_before: the same metrics before training, when measured.
        repo_id: the repository the card is pushed to (for the usage snippet).
        data_description: a sentence about the data when it is not on the Hub.
        reward_model: True for a sequence classifier (a reward model), False for a causal LM.
        quantized: True when the base was loaded in 4 or 8 bits for training (QLoRA).
        location: where the weights are when there is no ``repo_id`` (a local folder, for the usage snippet).
    """

    method: str
    base_model: str | None
    adapter: bool
    datasets: list[str] = field(default_factory=list)
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    metrics_before: dict[str, float] | None = None
    repo_id: str | None = None
    data_description: str | None = None
    reward_model: bool = False
    quantized: bool = False
    location: str | None = None

    def metadata(self) -> dict[str, Any]:
        """The YAML front matter the Hub reads."""
        tags = ["hfrlhf", self.method]
        if self.adapter:
            tags += ["lora", "peft"]
        if self.quantized:
            tags.append("qlora")
        tags += ["reward-model"] if self.reward_model else []
        meta: dict[str, Any] = {}
        if self.base_model:
            meta["base_model"] = self.base_model
        meta["library_name"] = "peft" if self.adapter else "transformers"
        meta["pipeline_tag"] = "text-classification" if self.reward_model else "text-generation"
        meta["tags"] = tags
        if self.datasets:
            meta["datasets"] = list(self.datasets)
        return meta

    def render(self) -> str:
        """The README.md text: YAML metadata, then the card body."""
        front = yaml.safe_dump(self.metadata(), sort_keys=False, allow_unicode=True).strip()
        name = self.repo_id or self.location or "path/to/this/folder"
        what = "A LoRA adapter for" if self.adapter else "A fine-tuned version of"
        base = f"`{self.base_model}`" if self.base_model else "a local base model"
        lines = [
            "---", front, "---", "",
            f"# {self.repo_id.split('/')[-1] if self.repo_id else self.method.upper() + ' model'}", "",
            f"{what} {base}, trained with {METHOD_NAMES.get(self.method, self.method)} using hfrlhf.", "",
        ]
        if self.datasets or self.data_description:
            data = ", ".join(f"`{d}`" for d in self.datasets) or self.data_description
            lines += [f"Training data: {data}.", ""]
        lines += ["## Usage", "", "```python", *self._usage(name), "```", ""]
        if self.hyperparameters:
            lines += ["## Training hyperparameters", "", "| name | value |", "|---|---|"]
            lines += [f"| {k} | {_fmt(v)} |" for k, v in self.hyperparameters.items()]
            lines.append("")
        if self.metrics:
            lines += ["## Results", ""]
            if self.metrics_before:
                lines += ["| metric | before training | after training |", "|---|---|---|"]
                lines += [f"| {k} | {_fmt(self.metrics_before[k]) if k in self.metrics_before else '-'} | {_fmt(v)} |"
                          for k, v in self.metrics.items()]
            else:
                lines += ["| metric | value |", "|---|---|"]
                lines += [f"| {k} | {_fmt(v)} |" for k, v in self.metrics.items()]
            lines.append("")
        lines += ["## Framework versions", "", *[f"- {k}: {v}" for k, v in _versions().items()], ""]
        return "\n".join(lines)

    def _usage(self, name: str) -> list[str]:
        if self.adapter:
            cls = "AutoPeftModelForSequenceClassification" if self.reward_model else "AutoPeftModelForCausalLM"
            load = [f"from peft import {cls}", "from transformers import AutoTokenizer", "",
                    f'model = {cls}.from_pretrained("{name}")']
        else:
            cls = "AutoModelForSequenceClassification" if self.reward_model else "AutoModelForCausalLM"
            load = [f"from transformers import AutoTokenizer, {cls}", "", f'model = {cls}.from_pretrained("{name}")']
        return [*load, f'tokenizer = AutoTokenizer.from_pretrained("{name}")']

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write the card as ``folder/README.md`` (replacing the generic one peft writes)."""
        path = Path(folder) / "README.md"
        path.write_text(self.render(), encoding="utf-8")
        return path


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("hfrlhf", "transformers", "peft", "torch", "datasets"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    return out


def card_metadata(text: str) -> dict[str, Any]:
    """The YAML front matter of a model card's text (empty when there is none)."""
    if not text.startswith("---"):
        return {}
    _, front, _ = text.split("---", 2)
    return yaml.safe_load(front) or {}


def files_to_push(folder: str | os.PathLike[str]) -> list[Path]:
    """The files of ``folder`` that belong in a model repository.

    With an ``adapter_config.json`` only the adapter goes (never the base weights); otherwise the full
    model's config and safetensors weights. Tokenizer files, the card and the training plot go along; the
    trainer's state, its pickled arguments and checkpoints stay behind.
    """
    folder = Path(folder)
    weights = ADAPTER_FILES if (folder / "adapter_config.json").is_file() else MODEL_FILES
    patterns = (*weights, *TOKENIZER_FILES, *EXTRA_FILES)
    files = sorted(p for p in folder.iterdir() if p.is_file() and any(fnmatch(p.name, pat) for pat in patterns))
    if not any(any(fnmatch(p.name, w) for w in weights) for p in files):
        raise FileNotFoundError(f"{folder}: no model or adapter weights to push (looked for {', '.join(weights)})")
    return files


def push_to_hub(
    folder: str | os.PathLike[str],
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload model trained with hfrlhf",
    files: Iterable[Path] | None = None,
) -> str:
    """Create (if needed) the model repository ``repo_id`` and upload the :func:`files_to_push` of ``folder``.

    The files are copied into a clean temporary folder first, so nothing else in ``folder`` can be
    uploaded by accident. The endpoint is ``huggingface_hub``'s (``HF_ENDPOINT`` changes it).

    Returns:
        The repository's URL.
    """
    from huggingface_hub import HfApi

    files = list(files) if files is not None else files_to_push(folder)
    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hfrlhf-push-") as stage:
        for path in files:
            shutil.copy2(path, Path(stage) / path.name)
        api.upload_folder(repo_id=repo_id, folder_path=stage, commit_message=commit_message, revision=revision,
                          repo_type="model")
    logger.info("pushed %d files to %s", len(files), repo_id)
    return str(url)
