"""Stage 2: LoRA fine-tuning of the student on validated traces, with baseline and per-epoch evaluation."""
