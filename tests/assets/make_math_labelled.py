"""Build tests/assets/math_labelled.jsonl: labelled MATH-style gradings (run once; output is committed).

    git clone https://github.com/huggingface/Math-Verify /tmp/Math-Verify   # Apache-2.0
    python tests/assets/make_math_labelled.py /tmp/Math-Verify/tests

Each line is {"text": model output, "gold": a MATH-style gold (bare LaTeX, as `last_boxed` gives
it), "expected": bool, "origin": where the case comes from}. Two sources:
- the `(gold, pred, expected)` cases of Math-Verify's test suite (commit 5d148cf), read with
  `ast` from the `@pytest.mark.parametrize` tables. A gold written as a solution or in `$..$`
  is reduced to what the data layer would store: its one `\\boxed{}`, or the text inside the
  delimiters. Left out, with the reason: cases run with settings q2g does not use (strict=False,
  allow_set_relation_comp=True, precision other than 6), the expression-only number tests
  (GSM8K style, with decimal commas that q2g reads as thousands separators by design), and
  golds made of several boxes (not a MATH gold).
- HAND: the forms issue #10 lists, written here, each with a near miss labelled False.
The Math-Verify rows are copied from its test suite, Copyright The HuggingFace Team, Apache-2.0.
"""

import ast
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "math_labelled.jsonl"
sys.path.insert(0, str(HERE.parents[1] / "src"))
from q2g.answers.extract import last_boxed  # noqa: E402  the data layer's reading of a gold
FILES = ["test_all.py", "test_numina_cases.py", "test_open_thoughts.py", "test_yujianll.py",
         "test_boxed.py", "test_strict.py"]
SKIP_TESTS = {"test_number_extraction": "expression-only number formats (GSM8K style, decimal commas)",
              "test_float_precision": "precision=5", "test_sqrt_precision": "precision=5",
              "test_symbols": "precision=5"}

# Single rows left out, with the reason (matched on the start of the model output).
EXCLUDE = {
    "Answer $ \n 9 \n $": "False only with the expression extractor off (match_types=['latex'])",
    "Answer \\( \n 9 \n \\)": "False only with the expression extractor off (match_types=['latex'])",
    "$1 + \\frac{1}{\\mathrm{e}}$": "labelled equal to 1 - 1/e: math-verify reads both as 1",
}

HAND = [  # (model output, gold, expected) for the forms of issue #10
    ("So the value is\n\nAnswer \\[ 7 \\]", "7", True),
    ("So the value is\n\nAnswer \\[ 8 \\]", "7", False),
    ("Therefore\n\\[\n\\frac{3}{4}\n\\]", "\\frac{3}{4}", True),
    ("Final answer: the smallest $k$ is 12.", "12", True),
    ("Final answer: the smallest $k$ is 13.", "12", False),
    ("Final Answer: The largest $n$ is $34$.", "34", True),
    ("The discount is 40 percent.\nThe answer is 40 percent.", "40\\%", True),
    ("The answer is 40 percent.", "40", True),
    ("The answer is 45 percent.", "40\\%", False),
    ("so the share is $\\boxed{40\\%}$.", "40", True),
    ("so the share is $\\boxed{40}$%.", "40\\%", True),
    ("so $\\boxed{y \\leq 3}$.", "y <= 3", True),
    ("so $\\boxed{y \\le 3}$.", "y \\leq 3", True),
    ("so $\\boxed{y < 3}$.", "y \\leq 3", False),
    ("so $\\boxed{x \\geq -1}$.", "x >= -1", True),
    ("so $\\boxed{x \\ge 1}$.", "x >= -1", False),
    ("so $\\boxed{x \\neq 2}$.", "x != 2", True),
    ("The answer is $y \\leq 3$.", "y<=3", True),
    ("The roots are $\\boxed{2}$ and $\\boxed{3}$.", "2, 3", True),
    ("The roots are $\\boxed{2}$ and $\\boxed{3}$.", "2, 4", False),
    ("The solutions are $\\boxed{-1}, \\boxed{5}$.", "-1,5", True),
    ("The pairs are $\\boxed{(1, 2)}$ and $\\boxed{(2, 1)}$.", "(1,2), (2,1)", True),
    ("First $\\boxed{4}$ is wrong; after checking, the answer is $\\boxed{5}$.", "5", True),
    ("We get $x = \\boxed{3}$ from the first equation, so the area is $\\boxed{12}$.", "12", True),
    ("Thus the matrix is $\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}$.",
     "\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", True),
    ("Thus the matrix is $\\begin{pmatrix} 1 & 2 \\\\ 3 & 5 \\end{pmatrix}$.",
     "\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", False),
    ("Thus the answer is $\\begin{pmatrix} 2 \\\\ -1 \\end{pmatrix}$.",
     "\\begin{pmatrix} 2 \\\\ -1 \\end{pmatrix}", True),
    ("Of the five, $\\text{Evelyn}$ is the fastest.", "\\text{Evelyn}", True),
    ("The answer is $\\text{(C)}$.", "\\text{(C)}", True),
    ("The answer is $\\text{(C)}$.", "\\text{(D)}", False),
    ("Hence the probability is $\\frac{1}{6}$.", "\\frac{1}{6}", True),
    ("Hence the probability is $\\frac{1}{6}$.", "\\frac{1}{3}", False),
    ("Putting it together, $x = \\frac{5}{2}$.", "\\frac52", True),
    ("The total is $1,\\!000$ dollars.\nFinal answer: $1000$", "1000", True),
    ("I could not solve it.", "7", False),
    ("Answer $$ 9 $$", "9", True),
    ("Answer \\( 9 \\)", "9", True),
    ("The angle is $90^\\circ$.", "90^\\circ", True),
    ("The interval is $(-\\infty, 3]$.", "(-\\infty,3]", True),
    ("The interval is $(-\\infty, 3)$.", "(-\\infty,3]", False),
]


def harvest(tests: Path):
    """(gold, pred, expected, origin) for every kept parametrize row, and the skipped count."""
    kept, skipped = [], {}
    for name in FILES:
        tree = ast.parse((tests / name).read_text())
        for fn in (n for n in tree.body if isinstance(n, ast.FunctionDef)):
            for args, rows in _tables(fn):
                for row in rows:
                    case, why = _case(fn.name, args, row)
                    if case is None:
                        skipped[why] = skipped.get(why, 0) + 1
                    else:
                        kept.append((*case, f"math-verify tests/{name}::{fn.name}"))
    return kept, skipped


def _tables(fn: ast.FunctionDef):
    for dec in fn.decorator_list:
        if isinstance(dec, ast.Call) and getattr(dec.func, "attr", "") == "parametrize":
            names = [a.strip() for a in ast.literal_eval(dec.args[0]).split(",")]
            if fn.name in SKIP_TESTS:  # some build their rows with f-strings: count, do not read
                yield names, [()] * len(dec.args[1].elts)
            else:
                yield names, ast.literal_eval(dec.args[1])


def _case(test: str, names: list[str], row: tuple):
    """The row as (gold, pred, expected), or (None, reason) when it is left out."""
    values = dict(zip(names, row))
    if test in SKIP_TESTS:
        return None, SKIP_TESTS[test]
    if values.get("strict", True) is not True or values.get("allow_set_relation_comp", False):
        return None, "strict=False or allow_set_relation_comp=True"
    if values.get("precision", 6) != 6:
        return None, "precision other than 6"
    if values["pred"] in EXCLUDE:
        return None, EXCLUDE[values["pred"]]
    gold = math_gold(values["gold"])
    if gold is None:
        return None, "gold made of several boxes"
    return (gold, values["pred"], bool(values.get("expected", values.get("result")))), None


def math_gold(gold: str) -> str | None:
    """What the data layer would store: the one `\\boxed{}` content, else the text inside `$..$`."""
    boxes = len(re.findall(r"\\(?:boxed|fbox)\{", gold))
    if boxes > 1:
        return None
    if boxes == 1:
        return last_boxed(gold)
    gold = gold.strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if gold.startswith(left) and gold.endswith(right) and len(gold) >= len(left) + len(right):
            gold = gold[len(left) : len(gold) - len(right)]
            break
    return re.sub(r"(?<!\\)\$", "", gold).strip()


def main() -> None:
    tests = Path(sys.argv[1])
    kept, skipped = harvest(tests)
    rows = [{"text": p, "gold": g, "expected": e, "origin": o} for g, p, e, o in kept]
    rows += [{"text": t, "gold": g, "expected": e, "origin": "hand: issue #10"} for t, g, e in HAND]
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"{len(rows)} cases ({len(kept)} from Math-Verify, {len(HAND)} by hand) -> {OUT}")
    for why, n in sorted(skipped.items()):
        print(f"  left out {n:>3}: {why}")


if __name__ == "__main__":
    main()
