"""Stage 1: teacher traces, kept when the answer is right (stage: the run loop and main; config, records, summary, shards, outputs)."""
