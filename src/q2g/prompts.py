"""Every prompt q2g uses, in one place: the teacher's, and the student's format.

The student format is the single source of truth for training *and* evaluation: finetune.py
builds its examples with `student_prompt_ids` + `student_target_ids`, and evaluation/pass_at_1.py
generates from `student_prompt_ids`, so the model is scored on exactly the format it was trained on.

Rules:
- A tokenizer with a chat template gets it (instruct teachers; chat students). Otherwise the
  plain format below is used (base models such as google/gemma-7b and Gemma 3 270M).
- BOS: a chat template writes its own BOS (Gemma's does), so its text is encoded without added
  special tokens; the plain format is encoded *with* them, which gives Gemma its `<bos>` and
  Qwen (which has no BOS) nothing.
- The student's target is the trace followed by its end token: the end-of-turn token of the
  chat template (Qwen `<|im_end|>`, Gemma `<end_of_turn>`), else EOS. It is trained, so the
  student learns to stop.
"""

from __future__ import annotations

TEACHER_SYSTEM = "You are a careful and patient math teacher."
TEACHER_INSTRUCTION = (
    "Solve the following problem step by step. Show all of your working: define what each "
    "quantity is, set up any equations before solving them, do every calculation and unit "
    "conversion explicitly, and check the result. End with a line of the form "
    '"The final answer is $\\boxed{{ANSWER}}$." where ANSWER is only the final answer, '
    "simplified.\n\nProblem:\n{problem}"
)
# How a trace states its final answer; the reference backend rewrites GSM8K's '#### N' to it.
FINAL_ANSWER_LINE = "The final answer is $\\boxed{{{answer}}}$."

STUDENT_TEMPLATE = "Problem:\n{problem}\n\nSolution:\n"
# A base student that does not stop at EOS tends to start the next problem: cut it there.
STUDENT_STOP_STRINGS = ("\nProblem:",)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def teacher_messages(problem: str) -> list[dict]:
    return [
        {"role": "system", "content": TEACHER_SYSTEM},
        {"role": "user", "content": TEACHER_INSTRUCTION.format(problem=problem)},
    ]


def teacher_prompt(tokenizer, problem: str) -> str:
    """The teacher's prompt text: its chat template if it has one, else a plain prompt."""
    if tokenizer is not None and has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(teacher_messages(problem), tokenize=False, add_generation_prompt=True)
    return f"{TEACHER_SYSTEM}\n\n{TEACHER_INSTRUCTION.format(problem=problem)}\n\nSolution:\n"


def teacher_prompt_ids(tokenizer, problem: str) -> list[int]:
    """Token ids of the teacher prompt, with the same BOS rule as the student's."""
    text = teacher_prompt(tokenizer, problem)
    return tokenizer(text, add_special_tokens=not has_chat_template(tokenizer))["input_ids"]


def student_prompt(tokenizer, problem: str) -> str:
    if has_chat_template(tokenizer):
        messages = [{"role": "user", "content": problem}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return STUDENT_TEMPLATE.format(problem=problem)


def student_prompt_ids(tokenizer, problem: str) -> list[int]:
    """Token ids of the student prompt, BOS rule applied (see module docstring)."""
    text = student_prompt(tokenizer, problem)
    return tokenizer(text, add_special_tokens=not has_chat_template(tokenizer))["input_ids"]


def end_of_turn_text(tokenizer) -> str:
    """The text that closes an answer: the chat template's end-of-turn marker, else EOS."""
    if has_chat_template(tokenizer):
        marker = "\x00q2g\x00"
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}], tokenize=False
        )
        tail = rendered.split(marker, 1)[1].strip()
        if tail:
            return tail
    if tokenizer.eos_token is None:
        raise ValueError("the student tokenizer has neither a chat template end-of-turn nor an EOS token")
    return tokenizer.eos_token


def end_token_ids(tokenizer) -> list[int]:
    """Ids that end a student answer (end-of-turn and EOS): generation stops on any of them."""
    ids = tokenizer(end_of_turn_text(tokenizer), add_special_tokens=False)["input_ids"]
    ids = ids[:1] if len(ids) == 1 else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def target_trace(trace: str) -> str:
    """The part of a trace the student learns: the trace without surrounding whitespace."""
    return trace.strip()


def student_target(tokenizer, trace: str) -> str:
    """The text the student is trained to produce (what `student_target_ids` encodes, for
    trainers that tokenize text themselves, e.g. `q2g export --format trl`)."""
    return target_trace(trace) + end_of_turn_text(tokenizer)


def student_target_ids(tokenizer, trace: str) -> list[int]:
    """Token ids the student is trained to produce: the trace, then its end token(s)."""
    ids = tokenizer(target_trace(trace), add_special_tokens=False)["input_ids"]
    return ids + tokenizer(end_of_turn_text(tokenizer), add_special_tokens=False)["input_ids"]
