"""ftlab: theory and practice of language-model fine-tuning in one toolkit."""

__version__ = "0.1.0"
