"""The data layer: load any supported schema -> canonical records -> token ids -> batches.

>>> from hfrlhf.data import load
>>> load([{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}]).column_names
['prompt', 'chosen', 'rejected']
"""

from hfrlhf.data.collators import (
    ListwiseCollator,
    PairwiseCollator,
    PointwiseCollator,
    PromptCollator,
    SFTCollator,
    UnpairedCollator,
    build_batch,
)
from hfrlhf.data.convert import (
    listwise_to_pairs,
    pairs_to_listwise,
    pairs_to_sft,
    pointwise_to_listwise,
    pointwise_to_pairs,
    to_prompts,
    unpair,
)
from hfrlhf.data.errors import DataError
from hfrlhf.data.formats import (
    EXAMPLES_DIR,
    FORMATS,
    KINDS,
    ValidationReport,
    convert_kind,
    detect_format,
    load,
    record_kind,
    validate,
)
from hfrlhf.data.tokenize import (
    tokenize_dataset,
    tokenize_prompt_completion,
    tokenize_prompt_completions,
    tokenize_text,
)

__all__ = [
    "EXAMPLES_DIR", "FORMATS", "KINDS", "tokenize_prompt_completions",
    "DataError", "ListwiseCollator", "PairwiseCollator", "PointwiseCollator", "PromptCollator", "SFTCollator",
    "UnpairedCollator", "ValidationReport", "build_batch", "convert_kind", "detect_format", "listwise_to_pairs",
    "load", "pairs_to_listwise", "pairs_to_sft", "pointwise_to_listwise", "pointwise_to_pairs", "record_kind",
    "to_prompts", "tokenize_dataset", "tokenize_prompt_completion", "tokenize_text", "unpair", "validate",
]
