"""Cut the small real subsets shipped in src/q2g/assets/data from the full datasets.

    python scripts/make_subsets.py --shared ../shared/data

Deterministic (seeded sample per file and MATH subject); rerunning gives identical files.
The records are byte-identical JSON lines of the originals; only a subset is kept.
"""

import argparse
import json
import random
import shutil
from collections import defaultdict
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "q2g" / "assets" / "data"
SIZES = {  # (file, per-stratum count)
    ("gsm8k", "train"): 240,
    ("gsm8k", "test"): 60,
    ("math", "train"): 120,
    ("math", "test"): 30,
}
MATH_MAIN = {"Algebra", "Counting & Probability"}  # the default subjects get the counts above
MATH_OTHER = 12  # other subjects: a few each, so every subject can be chosen offline
WIKI_BYTES = 160_000


def sample(lines, n, seed):
    idx = sorted(random.Random(seed).sample(range(len(lines)), min(n, len(lines))))
    return [lines[i] for i in idx]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shared", default="../shared/data")
    shared = Path(p.parse_args().shared)
    for (name, split), n in SIZES.items():
        lines = (shared / name / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
        if name == "gsm8k":
            keep = sample(lines, n, f"{name}/{split}")
        else:
            by_type = defaultdict(list)
            for line in lines:
                by_type[json.loads(line)["type"]].append(line)
            chosen = set()
            for t, rows in sorted(by_type.items()):
                k = n if t in MATH_MAIN else MATH_OTHER
                chosen.update(sample(rows, k, f"{name}/{split}/{t}"))
            keep = [line for line in lines if line in chosen]  # original order
        (OUT / name).mkdir(parents=True, exist_ok=True)
        (OUT / name / f"{split}.jsonl").write_text("\n".join(keep) + "\n", encoding="utf-8")
        shutil.copy(shared / name / "LICENSE", OUT / name / "LICENSE")
    raw = (shared / "wikitext" / "wiki.test.raw").read_bytes()
    cut = raw[:WIKI_BYTES]
    cut = cut[: cut.rfind(b"\r\n") + 2]  # whole rows only
    (OUT / "wikitext").mkdir(parents=True, exist_ok=True)
    (OUT / "wikitext" / "wiki.test.raw").write_bytes(cut)
    shutil.copy(shared / "wikitext" / "LICENSE-CC-BY-SA-3.0.txt", OUT / "wikitext" / "LICENSE-CC-BY-SA-3.0.txt")
    print("wrote", OUT)


if __name__ == "__main__":
    main()
