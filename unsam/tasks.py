"""The training tasks, named once.

A leaf module (no ``unsam`` imports), so that the data side (ATS sampler, prompt sampling), the
model side and the trainer name the same tasks without importing each other: ``"whole"`` is
whole-image segmentation, the others train the prompt path with that prompt type.
"""

WHOLE_TASK = "whole"
PROMPT_TASKS = ("point", "box", "mask")
TASKS = (WHOLE_TASK,) + PROMPT_TASKS

__all__ = ["WHOLE_TASK", "PROMPT_TASKS", "TASKS"]
