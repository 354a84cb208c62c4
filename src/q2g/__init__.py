"""q2g: transfer math reasoning from a Qwen teacher into a Gemma student.

Stages, in the order data flows: data -> generate (teacher traces) -> finetune (LoRA, calls
evaluate every epoch) -> report. `q2g --help` lists the commands.
"""

__version__ = "0.1.0"
