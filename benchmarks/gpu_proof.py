"""One GPU proof of q2g, one command: writes gpu_proof.md + gpu_proof.json (issue 17, item 6).

    python benchmarks/gpu_proof.py --gguf /tmp/gemma.gguf --data-dir .dev/data --out $OUT/proof  # <= 10 min, H100/H200
    python benchmarks/gpu_proof.py --rehearse --out /tmp/proof      # the same script on the CPU, tiny models, ~2 min

Sections (each a subprocess through q2g's CLI or a benchmark script, so refactors inside q2g do
not break it; a failing section is reported as failed and the others still run):
  a. conversion check: the base model's WikiText token perplexity (the baseline row of b) beside
     the known value for the Gemma 3 270M GGUF (16.6, transformers 5.24 on the CPU);
  b. the seed's finetune settings in bf16 on real GSM8K (reference traces of the whole train
     split, official test holdout): 1 epoch, pass@1 on 500 test problems before/after, held-out
     loss, WikiText perplexity and its change, no non-finite step;
  c. a Gemma-7B-shaped random bf16 model, q2g vs TRL's SFTTrainer (benchmarks/train_vs_trl.py),
     10 steps each: real tokens/s, peak max_memory_allocated, q2g's memory plan beside the peak;
  d. pass@1 decoding at batch 128, static batches vs refill (benchmarks/eval_speed.py);
  e. the Liger loss on vs off (train_vs_trl's q2g path), where liger_kernel is installed.
--rehearse swaps in the tiny test models, the packaged data and a few steps, on the CPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # gemma-3-270m-q4_k_m.gguf
KNOWN_PPL = 16.6  # Gemma 3 270M Q4_K_M GGUF, converted by transformers 5.24 (see docs/gpu.md)
SEED = dict(lora_r=16, lora_alpha=32, lora_dropout=0.05, lr=2e-4, batch_size=8, grad_accum=4, max_seq_len=1024)


def flags(d: dict) -> list[str]:
    return [x for k, v in d.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def sh(cmd: list[str], timeout: float, log: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    log.write_text(f"$ {' '.join(cmd)}\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    if proc.returncode:
        raise RuntimeError(f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]} (log: {log})")
    return proc


def q2g(*args) -> list[str]:
    return [sys.executable, "-m", "q2g.cli", *args]


def section_ab(args, out: Path) -> dict:
    """a + b: reference traces of GSM8K train, then one epoch of the seed's finetune settings."""
    ds, ck = out / "dataset", out / "checkpoints"
    gen = ["generate", "--backend", "reference", "--teacher", "reference", "--datasets", "gsm8k"]
    gen += ["--holdout", "official-test", "--data-dir", args.data_dir, "--out", str(ds)]
    sh(q2g(*gen, *(["--limit", "12"] if args.rehearse else [])), args.timeout, out / "generate.log")
    settings = {**SEED, "epochs": 1, "eval_limit": 500, "eval_max_new_tokens": 512, "precision": "bf16"}
    if args.rehearse:
        settings.update(
            batch_size=2, grad_accum=1, max_seq_len=256, eval_limit=4, eval_max_new_tokens=8, precision="fp32"
        )
        settings.update(ppl_max_tokens=64, ppl_max_length=64, ppl_stride=32)
    optim = "adamw_8bit" if importlib.util.find_spec("bitsandbytes") and not args.rehearse else "adamw"
    ft = ["finetune", "--base-model", args.model, "--traces", str(ds), "--out", str(ck), "--data-dir", args.data_dir]
    ft += ["--target-modules", "q_proj", "v_proj", "--optim", optim, *flags(settings)]
    sh(q2g(*ft), args.timeout, out / "finetune.log")
    rows = [json.loads(line) for line in (ck / "metrics.jsonl").read_text().splitlines()]
    base, last = rows[0], rows[-1]
    finite = all(math.isfinite(r["train_loss"]) for r in rows[1:] if r.get("train_loss") is not None)
    return {
        "a": {"token_perplexity": base["token_perplexity"], "known": None if args.rehearse else KNOWN_PPL},
        "b": {
            "settings": {**settings, "optim": optim},
            "pass@1_before": base["pass@1"],
            "pass@1_after": last["pass@1"],
            "heldout_loss_before": base.get("heldout_loss"),
            "heldout_loss_after": last.get("heldout_loss"),
            "ppl_before": base["token_perplexity"],
            "ppl_after": last["token_perplexity"],
            "ppl_change": last["ppl_change"],
            "train_loss": last.get("train_loss"),
            "nonfinite_skips": last.get("nonfinite_skips", 0),
            "all_steps_finite": finite and not last.get("nonfinite_skips"),
        },
    }


def train_vs_trl(args, out: Path, name: str, extra: list[str]) -> dict:
    if args.rehearse:
        shape = ["--tiny", "--batch-size", "2", "--seq-len", "128", "--steps", "2"]
    else:
        shape = ["--random-shape", "gemma-7b", *flags({k: SEED[k] for k in ("batch_size", "grad_accum")})]
        shape += ["--seq-len", str(SEED["max_seq_len"]), "--steps", "10"]
    cmd = [sys.executable, str(REPO / "benchmarks" / "train_vs_trl.py"), "--device", args.device, *shape, *extra]
    sh([*cmd, "--json", str(out / f"{name}.json")], args.timeout, out / f"{name}.log")
    return json.loads((out / f"{name}.json").read_text())


def section_c(args, out: Path) -> dict:
    r = train_vs_trl(args, out, "c_train_vs_trl", [])
    mem = "peak_gpu_mib" if args.device.startswith("cuda") else "peak_rss_mib"
    q, t = r["q2g"], r["trl"]
    return {
        "q2g": q,
        "trl": t,
        "speedup": q["tokens_per_s"] / t["tokens_per_s"],
        "memory_ratio": q[mem] / t[mem],
        "plan_gb": q["plan_gb"],
        "peak_gb": q[mem] * 2**20 / 1e9,
        "plan_error": q["plan_gb"] / (q[mem] * 2**20 / 1e9) - 1,
    }


def section_d(args, out: Path) -> dict:
    """pass@1 decoding, static batches (HF generate) vs q2g's refill loop, from eval_speed.py's JSON."""
    n, batch, new = (8, 4, 8) if args.rehearse else (256, 128, 512)
    cmd = [sys.executable, str(REPO / "benchmarks" / "eval_speed.py"), "--model", args.model, "--device", args.device]
    cmd += ["--problems", str(n), "--batch-size", str(batch), "--new-tokens", str(new)]
    cmd += ["--heldout", "0", "--ppl-tokens", "0", "--reps", "1", "--json", str(out / "d_decoding.json")]
    sh(cmd, args.timeout, out / "d_decoding.log")
    static, refill = json.loads((out / "d_decoding.json").read_text())["pass1"]

    def rates(row):
        return {"problems_per_s": n / row["seconds"], "new_tokens_per_s": row["tokens"] / row["seconds"]}

    speedup = static["seconds"] / refill["seconds"]
    return {
        "static": {**rates(static), "x_static": 1.0, "same_tokens": ""},
        "refill": {**rates(refill), "x_static": speedup, "same_tokens": refill["same"]},
        "speedup": speedup,
    }


def section_e(args, out: Path) -> dict:
    if importlib.util.find_spec("liger_kernel") is None or not args.device.startswith("cuda"):
        return {"skipped": "liger-kernel not installed" if not args.rehearse else "rehearsal (CPU): no Liger"}
    return {"note": "q2g's default picks Liger on CUDA when installed; see c.q2g.loss_path", "c": "see section c"}


def markdown(res: dict, args) -> str:
    def f(v, fmt=".4g"):
        if v is None or isinstance(v, bool):
            return "n/a" if v is None else "yes" if v else "NO"
        return format(v, fmt) if isinstance(v, (int, float)) else str(v)

    lines = [f"# q2g GPU proof ({'CPU rehearsal, tiny models' if args.rehearse else args.device})", ""]
    lines += [f"model: {args.model}; {res['env']}", "", "| section | item | value |", "| --- | --- | --- |"]
    for key, title in (
        ("a", "a conversion"),
        ("b", "b seed 1 epoch"),
        ("c", "c 7B-shape vs TRL"),
        ("d", "d decoding"),
        ("e", "e Liger"),
    ):
        sec = res.get(key)
        if isinstance(sec, dict) and "failed" in sec:
            lines.append(f"| {title} | FAILED | {sec['failed']} |")
            continue
        if key == "a":
            lines.append(
                f"| {title} | WikiText token perplexity (known) | {f(sec['token_perplexity'])} ({f(sec['known'])}) |"
            )
        elif key == "b":
            for k in (
                "pass@1_before",
                "pass@1_after",
                "heldout_loss_before",
                "heldout_loss_after",
                "ppl_change",
                "all_steps_finite",
            ):
                lines.append(f"| {title} | {k} | {f(sec[k])} |")
        elif key == "c":
            lines.append(
                f"| {title} | real tok/s q2g / TRL | {f(sec['q2g']['tokens_per_s'], '.0f')} / {f(sec['trl']['tokens_per_s'], '.0f')} ({f(sec['speedup'], '.2f')}x) |"
            )
            lines.append(f"| {title} | peak memory ratio q2g / TRL | {f(sec['memory_ratio'], '.2f')} |")
            lines.append(
                f"| {title} | plan estimate / measured peak GB | {f(sec['plan_gb'], '.2f')} / {f(sec['peak_gb'], '.2f')} ({sec['plan_error']:+.0%}) |"
            )
            lines.append(f"| {title} | q2g loss path | {sec['q2g'].get('loss_path')} |")
        elif key == "d":
            for k in ("static", "refill"):
                r = sec[k]
                lines.append(
                    f"| {title} | {k}: problems/s, generated tok/s | {f(r['problems_per_s'], '.2f')}, {f(r['new_tokens_per_s'], '.0f')} |"
                )
            lines.append(f"| {title} | refill / static | {f(sec['speedup'], '.2f')}x |")
        else:
            lines.append(f"| {title} | Liger on vs off | {sec.get('skipped') or sec.get('note')} |")
    return "\n".join(lines) + "\n"


def convert_gguf(gguf: Path, target: Path) -> str:
    """The reassembled GGUF, checked by its sha256, as a bf16 safetensors folder (as q2g's
    models.demo_gemma_dir does; needs transformers >= 5.24, see docs/gpu.md)."""
    import hashlib

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    digest = hashlib.sha256()
    with open(gguf, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != GGUF_SHA256:
        raise SystemExit(f"{gguf}: sha256 {digest.hexdigest()} is not {GGUF_SHA256} (a piece missing or cut?)")
    if not (target / "model.safetensors").exists():
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
        model.hf_quantizer, model.is_quantized = None, False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(target)
        tok.save_pretrained(target)
    return str(target)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="the Gemma 3 270M folder (converted from the GGUF, see docs/gpu.md)")
    p.add_argument("--gguf", help="or: the reassembled gemma-3-270m-q4_k_m.gguf, checked and converted first")
    p.add_argument("--data-dir", default="../shared/data", help="folder with gsm8k/ and wikitext/")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default="gpu_proof")
    p.add_argument("--rehearse", action="store_true", help="CPU, tiny models, packaged data: checks the script")
    p.add_argument("--timeout", type=float, default=540, help="seconds per section")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.rehearse:
        sys.path.insert(0, str(REPO / "tests"))
        from helpers import build_tiny

        args.model = str(build_tiny("gemma3", Path(tempfile.mkdtemp()) / "tiny-gemma3"))
        args.device, args.data_dir = "cpu", "packaged"
    if args.gguf and not args.rehearse:
        args.model = convert_gguf(Path(args.gguf), out / "gemma-3-270m")
    if not args.model:
        p.error("--model or --gguf is required (or --rehearse)")
    import torch

    env = f"torch {torch.__version__}, {torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}"
    res, t0 = {"env": env}, time.time()
    for keys, fn in (("ab", section_ab), ("c", section_c), ("d", section_d), ("e", section_e)):
        try:
            got = fn(args, out)
            res.update(got if keys == "ab" else {keys: got})
        except (RuntimeError, subprocess.TimeoutExpired, OSError, KeyError, ValueError) as e:
            res.update({k: {"failed": str(e)[:300]} for k in keys})
        print(f"[gpu_proof] {keys}: {time.time() - t0:.0f} s", flush=True)
    res["wall_s"] = time.time() - t0
    (out / "gpu_proof.json").write_text(json.dumps(res, indent=1, default=str))
    (out / "gpu_proof.md").write_text(markdown(res, args))
    print(markdown(res, args))
    return 0 if not any(isinstance(v, dict) and "failed" in v for v in res.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
