"""Data: benchmark files -> problem records (loaders), the holdout split and the leakage check (splits), the strict JSONL reader (jsonl), the benchmarks' names (sources)."""
