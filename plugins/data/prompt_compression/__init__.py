"""Prompt pruning, prompt summary and soft-prompt compression (data › input compression).

This package's ``__init__`` is its entry point (``[project.entry-points.effinfer]``): it registers
every technique of the family through the public ``effinfer_register_techniques`` hook.
"""

from effinfer.core import hookimpl


@hookimpl
def effinfer_register_techniques(register):
    from effinfer.plugins.data.prompt_compression.abstractive_summary import AbstractiveSummary
    from effinfer.plugins.data.prompt_compression.extractive_summary import ExtractiveSummary
    from effinfer.plugins.data.prompt_compression.llmlingua import LLMLingua
    from effinfer.plugins.data.prompt_compression.llmlingua2 import LLMLingua2
    from effinfer.plugins.data.prompt_compression.longllmlingua import LongLLMLingua
    from effinfer.plugins.data.prompt_compression.soft_prompt import SoftPrompt

    for technique in (LLMLingua, LongLLMLingua, LLMLingua2, ExtractiveSummary, AbstractiveSummary, SoftPrompt):
        register(technique)
