"""Evaluation of an in-memory model: pass@1, held-out loss, WikiText perplexity (used by finetune each epoch and by q2g evaluate)."""
