"""qa-lab: rigorous, repeatable comparisons of vanilla, RAG, LoRA and RAG+LoRA LLMs on QA."""

__version__ = "0.1.0"
