"""Stage 2 with the seed's command line: LoRA fine-tuning of the student on validated traces.

    python finetune.py --base-model google/gemma-7b --traces dataset/ --epochs 3

Same as `q2g finetune`; see `python finetune.py --help`.
"""

import sys

if __name__ == "__main__":
    from q2g.cli import main

    sys.exit(main(["finetune", *sys.argv[1:]]))
