"""hfrlhf: RLHF as transformers.Trainer subclasses."""

__version__ = "0.1.0"
