"""Stage 1 with the seed's command line: teacher traces for GSM8K and MATH.

    python generate_traces.py --teacher Qwen/Qwen2.5-7B-Instruct --datasets gsm8k math

Same as `q2g generate`; see `python generate_traces.py --help`.
"""

import sys

if __name__ == "__main__":
    from q2g.cli import main

    sys.exit(main(["generate", *sys.argv[1:]]))
