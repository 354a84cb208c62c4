"""Distillation beside the cross-entropy (issues 28-29): `--distill chunk-likelihood` (chunk_kl, data)
learns the teacher's stored log-probs of its own traces; `--distill on-policy` (onpolicy,
onpolicy_data, teacher_score) has the teacher score the student's own samples. Both compare the two
models over byte-aligned chunks (q2g.alignment), so teacher and student may tokenize differently."""
