"""The GPU proof of q2g in two parts, each one GPU-machine call of at most 6 minutes (issue 27).

    python benchmarks/gpu_proof.py --part shape --tokenizer .dev/gemma-tok --out $OUT
    python benchmarks/gpu_proof.py --part outcome --gguf /tmp/gemma.gguf --data-dir .dev/data --out $OUT
    python benchmarks/gpu_proof.py --part shape --rehearse --out /tmp/proof    # CPU, tiny models, 1-3 min

--part shape needs no weights from outside the checkout (random bf16 models of Gemma-7B / Gemma-2B
shape; --tokenizer: the real Gemma tokenizer folder, carried, so lengths are the real ones):
  train_ckpt_on / train_ckpt_off  q2g vs TRL's SFTTrainer at the seed's settings (batch 8 x accum 4,
      length 1024, LoRA r16 q/v, lr 2e-4) with gradient checkpointing equal on both (off only where
      q2g's plan says it fits): real (non-pad) tokens/s, max_memory_reserved and _allocated, the plan;
  decoding  static batches vs q2g's refill at batch 128 on 512 prompts, bf16 weights + autocast;
  liger     q2g's loss with Liger vs without, where liger_kernel imports on CUDA;
  sweep_oom a trial that runs out of GPU memory, then one that fits, in one process.
--part outcome, the real Gemma 3 270M (the GGUF, checked by sha256, converted here):
  conversion  fp32 WikiText token perplexity of the packaged excerpt's first 4,096 tokens (the CPU's
      known 16.6) and q2g.demo_model.check_demo_model;
  traces + finetune  the seed's settings in bf16 on the whole GSM8K train split's reference traces,
      one epoch; pass@1 on 500 official test problems at batch 128 before and after, the held-out
      loss, the WikiText change, every step finite.
Each section is a subprocess whose output streams into OUT/<part>.log as it runs; OUT/<part>.json
(and .md) are rewritten after every section, so a call cut short brings back what finished. Work
files go to a scratch folder outside OUT; OUT gets 3 files per part (6 for both), no subfolder.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # gemma-3-270m-q4_k_m.gguf
KNOWN_PPL = 16.607  # fp32, the packaged WikiText's first 4,096 tokens, windows 1024/512 (README's demo)
SEED = dict(lora_r=16, lora_alpha=32, lora_dropout=0.05, lr=2e-4, batch_size=8, grad_accum=4, max_seq_len=1024)
_CHILD: list = []  # the running section's process (SIGTERM: killed with us)


def sh(cmd: list[str], timeout: float, log: Path) -> None:
    """Run `cmd`, its output appended to `log` as it comes; a failure raises with the log's last line."""
    cmd = [str(c) for c in cmd]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO / "tests"), str(BENCH)])}
    env["PYTHONPATH"] += os.pathsep + os.environ.get("PYTHONPATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        _CHILD[:] = [proc]
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise RuntimeError(f"timed out after {timeout:.0f} s (log: {log.name})") from None
        finally:
            _CHILD.clear()
    if rc:
        tail = [x for x in log.read_text(errors="replace").splitlines() if x.strip()][-1:]
        raise RuntimeError(f"exit {rc}: {tail} (log: {log.name})")


def py(script: str, *args) -> list[str]:
    return [sys.executable, str(BENCH / script), *map(str, args)]


def q2g(*args) -> list[str]:
    return [sys.executable, "-m", "q2g.cli", *map(str, args)]


def flags(d: dict) -> list[str]:
    return [x for k, v in d.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def shape_args(args) -> list[str]:
    if args.rehearse:
        return ["--random-shape", "tiny", "--batch-size", "2", "--grad-accum", "1", "--seq-len", "256"]
    out = ["--random-shape", "gemma-7b", "--device", "cuda"]
    out += ["--batch-size", SEED["batch_size"], "--grad-accum", SEED["grad_accum"], "--seq-len", SEED["max_seq_len"]]
    return out + (["--tokenizer", args.tokenizer] if args.tokenizer else [])


def vs_trl(args, ckpt: str) -> dict:
    """q2g vs TRL at equal checkpointing (train_vs_trl.py), with the ratios the targets name."""
    js = args.scratch / f"train_{ckpt}.json"
    steps = ["--steps", 1 if args.rehearse else 2, "--warmup", 1, "--gradient-checkpointing", ckpt]
    extra = ["--skip-unless-fits"] if ckpt == "off" else []
    sh(py("train_vs_trl.py", *shape_args(args), *steps, *extra, "--json", js), args.left(), args.log)
    r = json.loads(js.read_text())
    if "skipped" in r:
        return r
    q, t = r["q2g"], r["trl"]
    mem = "peak_reserved_mib" if "peak_reserved_mib" in q else "peak_rss_mib"
    reserved_gb = q[mem] * 2**20 / 1e9
    return {
        "q2g": q, "trl": t, "memory": mem,
        "speedup": q["tokens_per_s"] / t["tokens_per_s"],
        "memory_ratio": q[mem] / t[mem],
        "plan_gb": q["plan_gb"], "plan_chunk": q["plan_chunk"], "reserved_gb": reserved_gb,
        "allocated_gb": q.get("peak_allocated_mib", 0) * 2**20 / 1e9 or None,
        "plan_error": q["plan_gb"] / reserved_gb - 1,
    }  # fmt: skip


def decoding(args) -> dict:
    n, batch, new, share = (8, 4, 8, 0.05) if args.rehearse else (512, 128, 256, 0.01)
    js = args.scratch / "decoding.json"
    shape = ["--random-shape", "tiny"] if args.rehearse else ["--random-shape", "gemma-2b", "--device", "cuda"]
    shape += ["--tokenizer", args.tokenizer] if args.tokenizer and not args.rehearse else []
    cmd = py("eval_speed.py", *shape, "--precision", "bf16", "--problems", n, "--batch-size", batch)
    cmd += ["--new-tokens", new, "--end-share", share, "--heldout", 0, "--ppl-tokens", 0, "--reps", 1, "--json", js]
    sh(cmd, args.left(), args.log)
    got = json.loads(js.read_text())
    static, refill = got["pass1"]
    count = got["problems"]  # what was decoded: the rates divide by it

    def rates(row):
        return {"problems_per_s": count / row["seconds"], "new_tokens_per_s": row["tokens"] / row["seconds"]}

    speedup = static["seconds"] / refill["seconds"]
    return {"prompts": count, "batch": got["batch_size"], "precision": got["precision"], "static": rates(static),
            "refill": rates(refill), "speedup": speedup, "same_tokens": refill["same"]}  # fmt: skip


def liger(args) -> dict:
    import importlib.util

    if args.rehearse or importlib.util.find_spec("liger_kernel") is None:
        return {"skipped": "rehearsal (CPU): no Liger" if args.rehearse else "liger-kernel not installed"}
    rows = {}
    for fused in ("liger", "never"):
        js = args.scratch / f"liger_{fused}.json"
        cmd = py("train_vs_trl.py", *shape_args(args), "--steps", 2, "--warmup", 1, "--trainers", "q2g")
        sh([*cmd, "--gradient-checkpointing", "on", "--fused", fused, "--json", js], args.left(), args.log)
        rows[fused] = json.loads(js.read_text())["q2g"]
    on, off = rows["liger"], rows["never"]
    return {"on": on, "off": off, "speedup": on["tokens_per_s"] / off["tokens_per_s"],
            "memory_ratio": on["peak_reserved_mib"] / off["peak_reserved_mib"]}  # fmt: skip


def sweep_oom(args) -> dict:
    js = args.scratch / "oom.json"
    if args.rehearse:
        cmd = py("oom_recovery.py", "--random-shape", "tiny", "--seq-len", 256, "--oom-batch", 4, "--batch-size", 2)
        cmd += ["--simulate-oom"]
    else:
        cmd = py("oom_recovery.py", *shape_args(args)[:4], "--oom-batch", 2 * SEED["batch_size"], "--seq-len", 1024)
        cmd += ["--batch-size", SEED["batch_size"]] + (["--tokenizer", args.tokenizer] if args.tokenizer else [])
    sh([*cmd, "--json", js], args.left(), args.log)
    return json.loads(js.read_text())


def conversion(args) -> dict:
    js = args.scratch / "conversion.json"
    sh([sys.executable, __file__, "--check-conversion", args.model, "--device", args.device, "--json", js],
       args.left(), args.log)  # fmt: skip
    return json.loads(js.read_text())


def check_conversion(model_dir: str, device: str, js: str) -> None:
    """fp32 perplexity on the known value's 4,096 tokens, and check_demo_model, on `device`."""
    import torch

    from q2g.data.loaders import load_wikitext
    from q2g.demo_model import check_demo_model
    from q2g.errors import RunFailed
    from q2g.evaluation.perplexity import q2g_perplexity
    from q2g.models import load_model, load_tokenizer

    model, tok = load_model(model_dir, torch.float32, device).eval(), load_tokenizer(model_dir)
    text = load_wikitext("packaged")
    ppl = q2g_perplexity(model, tok, text, 1024, 512, max_tokens=4096, progress=False)["token_perplexity"]
    try:
        check, why = check_demo_model(model, tok), ""
    except RunFailed as e:
        check, why = None, str(e)[:200]
    res = {
        "ppl_4096_fp32": ppl,
        "known": KNOWN_PPL,
        "ppl_error": ppl / KNOWN_PPL - 1,
        "demo_check_ok": check is not None,
    }
    Path(js).write_text(json.dumps({**res, "demo_check": check or why}, indent=1))


def traces(args) -> dict:
    gen = ["generate", "--backend", "reference", "--teacher", "reference", "--datasets", "gsm8k"]
    gen += ["--holdout", "official-test", "--data-dir", args.data_dir, "--out", args.scratch / "dataset"]
    sh(q2g(*gen, *(["--limit", "12"] if args.rehearse else [])), args.left(), args.log)
    n = sum(1 for _ in open(args.scratch / "dataset" / "traces.jsonl"))
    return {"traces": n}


def finetune(args) -> dict:
    import importlib.util

    ck = args.scratch / "checkpoints"
    s = {
        **SEED,
        "epochs": 1,
        "eval_limit": 500,
        "eval_batch_size": 128,
        "eval_max_new_tokens": 512,
        "precision": "bf16",
    }
    if args.rehearse:
        s.update(batch_size=2, grad_accum=1, max_seq_len=256, eval_limit=4, eval_batch_size=4, eval_max_new_tokens=8)
        s.update(precision="fp32", ppl_max_tokens=64, ppl_max_length=64, ppl_stride=32)
    optim = "adamw_8bit" if importlib.util.find_spec("bitsandbytes") and not args.rehearse else "adamw"
    ft = ["finetune", "--base-model", args.model, "--traces", args.scratch / "dataset", "--out", ck]
    ft += ["--data-dir", args.data_dir, "--target-modules", "q_proj", "v_proj", "--optim", optim, *flags(s)]
    sh(q2g(*ft), args.left(), args.log)
    rows = [json.loads(line) for line in (ck / "metrics.jsonl").read_text().splitlines()]
    base, last = rows[0], rows[-1]
    losses = [r["train_loss"] for r in rows[1:] if r.get("train_loss") is not None]
    return {
        "settings": {**s, "optim": optim},
        "pass@1_before": base["pass@1"], "pass@1_after": last["pass@1"],
        "heldout_loss_before": base.get("heldout_loss"), "heldout_loss_after": last.get("heldout_loss"),
        "ppl_before": base["token_perplexity"], "ppl_after": last["token_perplexity"], "ppl_change": last["ppl_change"],
        "train_loss": last.get("train_loss"), "nonfinite_skips": last.get("nonfinite_skips", 0),
        "all_steps_finite": bool(losses) and all(map(math.isfinite, losses)) and not last.get("nonfinite_skips"),
    }  # fmt: skip


# (section, function, seconds it needs at least on a GPU): most telling first; one that would not
# finish in what is left of --budget is skipped (said in its row), not started and cut
PARTS = {
    "shape": [("train_ckpt_on", lambda a: vs_trl(a, "on"), 60), ("decoding", decoding, 40),
              ("sweep_oom", sweep_oom, 40), ("train_ckpt_off", lambda a: vs_trl(a, "off"), 60), ("liger", liger, 60)],
    "outcome": [("conversion", conversion, 20), ("traces", traces, 10), ("finetune", finetune, 120)],
}  # fmt: skip


def f(v, fmt=".4g") -> str:
    if v is None or isinstance(v, bool):
        return "n/a" if v is None else "yes" if v else "NO"
    return format(v, fmt) if isinstance(v, (int, float)) else str(v)


def rows(name: str, s: dict) -> list[tuple[str, str]]:
    """The (item, value) rows of a finished section in the markdown table."""
    if "skipped" in s:
        return [("skipped", s["skipped"])]
    if name.startswith("train_ckpt"):
        q, t = s["q2g"], s["trl"]
        return [
            ("real tok/s q2g / TRL", f"{f(q['tokens_per_s'], '.0f')} / {f(t['tokens_per_s'], '.0f')} ({f(s['speedup'], '.2f')}x)"),
            (f"{s['memory']} q2g / TRL", f"{f(q[s['memory']], '.0f')} / {f(t[s['memory']], '.0f')} ({f(s['memory_ratio'], '.2f')}x)"),
            ("q2g plan / reserved / allocated GB", f"{f(s['plan_gb'], '.2f')} / {f(s['reserved_gb'], '.2f')} / {f(s['allocated_gb'], '.2f')} (plan {s['plan_error']:+.0%}, chunk {s['plan_chunk']})"),
            ("checkpointing q2g / TRL", f"{f(q['gradient_checkpointing'])} / {f(t['gradient_checkpointing'])}"),
            ("q2g loss path", str(q.get("loss_path"))),
        ]  # fmt: skip
    if name == "decoding":
        return [
            (f"static: problems/s, new tok/s ({s['prompts']} prompts, batch {s['batch']}, {s['precision']})",
             f"{f(s['static']['problems_per_s'], '.2f')}, {f(s['static']['new_tokens_per_s'], '.0f')}"),
            ("refill: problems/s, new tok/s", f"{f(s['refill']['problems_per_s'], '.2f')}, {f(s['refill']['new_tokens_per_s'], '.0f')}"),
            ("refill / static", f"{f(s['speedup'], '.2f')}x (same tokens: {s['same_tokens']})"),
        ]  # fmt: skip
    if name == "liger":
        return [("tok/s, reserved: on / off", f"{f(s['speedup'], '.2f')}x, {f(s['memory_ratio'], '.2f')}x")]
    if name == "sweep_oom":
        t1, t2 = s["trial_1"], s["trial_2"]
        return [
            ("trial 1 (no checkpointing)", f"batch {t1['batch']}: {t1['failed'] or 'did not fail'}"),
            ("trial 2 after free", f"batch {t2['batch']}: {t2['steps']} steps, finite {f(t2['finite'])}, peak reserved MiB {f(t2.get('peak_reserved_mib'), '.0f')}"),
        ]  # fmt: skip
    if name == "conversion":
        return [
            ("WikiText 4,096 tokens fp32 (known)", f"{f(s['ppl_4096_fp32'])} ({s['known']}, {s['ppl_error']:+.1%})"),
            ("check_demo_model", "OK" if s["demo_check_ok"] else f"BROKEN: {s['demo_check']}"),
        ]
    if name == "traces":
        return [("reference traces", str(s["traces"]))]
    keys = ("pass@1_before", "pass@1_after", "heldout_loss_before", "heldout_loss_after", "ppl_change")
    return [(k, f(s[k])) for k in (*keys, "all_steps_finite")]


def markdown(res: dict) -> str:
    lines = [
        f"# q2g GPU proof, part {res['part']} ({res['env']})",
        "",
        "| section | item | value |",
        "| --- | --- | --- |",
    ]
    for name, sec in res["sections"].items():
        if "failed" in sec or "running" in sec:
            lines.append(
                f"| {name} | {'FAILED' if 'failed' in sec else 'CUT SHORT'} | {sec.get('failed', 'still running')} |"
            )
            continue
        lines += [f"| {name} | {item} | {value} |" for item, value in rows(name, sec)]
    return "\n".join(lines) + f"\n\nwall: {res['wall_s']:.0f} s\n"


def save(res: dict, out: Path, part: str) -> None:
    for suffix, text in (("json", json.dumps(res, indent=1, default=str)), ("md", markdown(res))):
        tmp = out / f".{part}.{suffix}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / f"{part}.{suffix}")


def prepare(args, p) -> None:
    """Scratch outside --out, the tiny model for a rehearsal, the GGUF checked and converted."""
    out = Path(args.out).resolve()
    args.scratch = Path(args.scratch or tempfile.mkdtemp(prefix=f"q2g-proof-{args.part}-")).resolve()
    if args.scratch == out or out in args.scratch.parents:
        p.error(f"--scratch {args.scratch} is inside --out {out}: only result files go there")
    args.scratch.mkdir(parents=True, exist_ok=True)
    if args.rehearse:
        from helpers import build_tiny

        args.model = str(build_tiny("gemma3", args.scratch / "tiny-gemma3"))
        args.device, args.data_dir, args.tokenizer = "cpu", "packaged", None
    elif args.part == "outcome":
        if args.gguf:
            args.model = convert_gguf(Path(args.gguf), args.scratch / "gemma-3-270m")
        if not args.model:
            p.error("--part outcome needs --model or --gguf (or --rehearse)")


def convert_gguf(gguf: Path, target: Path) -> str:
    """The reassembled GGUF, checked by its sha256, as an fp32 safetensors folder (as
    q2g.demo_model.demo_gemma_dir does; transformers >= 5.24, see docs/gpu.md)."""
    import hashlib

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    digest = hashlib.sha256()
    with open(gguf, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != GGUF_SHA256:
        raise SystemExit(f"{gguf}: sha256 {digest.hexdigest()} is not {GGUF_SHA256} (a piece missing or cut?)")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer, model.is_quantized = None, False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(target)
    tok.save_pretrained(target)
    return str(target)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=sorted(PARTS))
    p.add_argument("--out", help="where the 3 result files go (no subfolder is made)")
    p.add_argument("--scratch", help="work folder, outside --out (default: a new temporary folder)")
    p.add_argument("--rehearse", action="store_true", help="the CPU, tiny models, packaged data")
    p.add_argument("--tokenizer", help="shape: the real Gemma tokenizer folder (lengths); default the tiny one")
    p.add_argument("--model", help="outcome: a converted Gemma 3 270M folder")
    p.add_argument("--gguf", help="outcome: or the reassembled GGUF, checked and converted first")
    p.add_argument("--data-dir", default="../shared/data", help="outcome: folder with gsm8k/ and wikitext/")
    p.add_argument("--device", default="cuda")
    p.add_argument("--budget", type=float, default=330, help="seconds for the whole part (docs/gpu.md: 210 / 270)")
    p.add_argument("--check-conversion", help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.check_conversion:
        check_conversion(args.check_conversion, args.device, args.json)
        return 0
    if not (args.part and args.out):
        p.error("--part and --out are required")
    t0 = time.time()
    args.left = lambda: max(5.0, args.budget - (time.time() - t0))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.log = out / f"{args.part}.log"
    signal.signal(signal.SIGTERM, lambda *_: (_CHILD and os.killpg(_CHILD[0].pid, signal.SIGKILL), sys.exit(143)))
    sys.path.insert(0, str(REPO / "tests"))
    prepare(args, p)
    import torch

    env = f"torch {torch.__version__}, {torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}"
    res = {"part": args.part, "env": env + (", CPU rehearsal, tiny models" if args.rehearse else ""), "sections": {}}
    for name, fn, least in PARTS[args.part]:
        res["sections"][name], res["wall_s"] = {"running": True}, time.time() - t0
        save(res, out, args.part)
        try:
            if not args.rehearse and args.left() < least:
                res["sections"][name] = {"skipped": f"{args.left():.0f} s of --budget left, needs ~{least} s"}
            else:
                res["sections"][name] = fn(args)
        except (RuntimeError, OSError, KeyError, ValueError, json.JSONDecodeError) as e:
            res["sections"][name] = {"failed": str(e)[:300]}
        res["wall_s"] = time.time() - t0
        save(res, out, args.part)
        print(f"[gpu_proof] {args.part}/{name}: {res['wall_s']:.0f} s", flush=True)
    print(markdown(res))
    return 0 if not any("failed" in s for s in res["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
