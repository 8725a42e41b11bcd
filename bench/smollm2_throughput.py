"""CPU throughput of configs/smollm2.yaml (SmolLM2-135M-Instruct) against this machine's own limits.

    python bench/smollm2_throughput.py --steps 3 --out runs/smollm2_throughput.json

1. **Limits, measured in the same run**: ``lscpu``'s vector flags (AVX2, AVX-512, AVX512-BF16,
   AMX), the rate of ``torch.mm`` in float32 and bfloat16 (a 1024^3 product and the model's own
   shape, 1024 tokens x 576 -> 1536), and the memory bandwidth of a 256 MiB copy (what bounds
   decoding: every decode step reads all the weights once).
2. **Phases, through the user's command**: ``tspo-fast train`` for ``--steps`` steps per variant
   (no evaluation, no checkpoint), its ``metrics.jsonl`` read back; the first step is a warm-up
   and is left out.  Variants (``VARIANTS``): ``before`` is what the issue measured (every
   other setting from configs/tiny.yaml: full fine-tuning, the reference pass of kl 0.001, top-3
   passages of 200 tokens, 4 turns of 64 tokens, and vLLM's linear layers on ``F.linear``, as the
   engine ran then); ``smollm2`` is configs/smollm2.yaml; the others change one or two things of it
   (the rollout engine's dtype or GEMMs, the async loop, the KL pass, LoRA on every layer, the
   frozen layers run in every pass instead of once a step: ``no_share``, each group's prompt run
   once: ``share_prompts``).
3. **Ratios**: rollout generated tokens/s against the decode bound ``bandwidth / weight bytes x
   concurrent sequences`` and the compute bound ``mm rate / (2 x parameters)`` (the smaller binds);
   the log-prob pass and the update against the float32 ``mm`` rate, from their FLOPs
   (2 N per token forward; backward 2 N for the input gradients of the layers above the lowest
   trainable one plus 2 N_trainable for weight gradients; with ``model.lora.share_frozen`` the
   frozen layers' forward is counted once, in the phase whose pass runs first: the log-prob pass
   with KL, the update without).
4. **The engine alone** (``engine_profile``, last; ``--no-engine`` leaves it out): vLLM's prefill
   and decode rates on one sequence and on a step's worth of them, which tell where the
   rollout's time goes, once with each ``rollout.cpu_gemm`` (vLLM's packed oneDNN GEMMs, and
   ``F.linear``) (``--limits-only`` with it: the limits and the engine, no training).

Every timing depends on what else the machine runs: the script records ``os.getloadavg()``
before and after each run.  A speed claim needs a quiet machine.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from typing import Dict, List

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)            # the analysis imports tspo_fast, also from a checkout that is not installed
TINY_ROLLOUT = ["retrieval.topk=3", "rollout.max_turns=4", "rollout.max_new_tokens_per_turn=64",
                "rollout.max_obs_tokens=200", "rollout.max_response_tokens=768", "data.max_prompt_tokens=512"]
#: name -> --set overrides of configs/smollm2.yaml
VARIANTS: Dict[str, List[str]] = {
    "before": ["model.lora.rank=0", "loss.kl_coef=0.001", "train.lr=3e-6", "train.max_tokens_per_micro=8192",
               "rollout.cpu_gemm=linear", *TINY_ROLLOUT],
    "smollm2": [],
    "smollm2+linear_gemm": ["rollout.cpu_gemm=linear"],
    "smollm2+async": ["rollout.mode=async"],
    "smollm2+no_share": ["model.lora.share_frozen=false"],
    "smollm2+kl": ["loss.kl_coef=0.001"],
    "smollm2+kl+no_share": ["loss.kl_coef=0.001", "model.lora.share_frozen=false"],
    "smollm2+share_prompts": ["train.share_prompts=true"],
    "smollm2+kl+share_prompts": ["loss.kl_coef=0.001", "train.share_prompts=true"],
    "smollm2+lora_all_layers": ["model.lora.top_layers=0"],
    "smollm2+bf16_rollout": ["rollout.dtype=bfloat16"],
}
FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")


def cpu_flags() -> Dict[str, object]:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = set(info.get("Flags", "").split())
    return {"model": info.get("Model name", "").strip(), "cpus": info.get("CPU(s)", "").strip(),
            **{f: f in flags for f in FLAGS}}


def mm_rate(dtype: torch.dtype, m: int, k: int, n: int, seconds: float = 2.0) -> float:
    """GFLOP/s of ``torch.mm`` (m x k) @ (k x n) in ``dtype``, best of the calls in ``seconds``."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    torch.mm(a, b)
    best, t_end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * m * k * n / best / 1e9


def copy_bandwidth(mib: int = 256, seconds: float = 2.0) -> float:
    """GB/s of a ``mib`` MiB tensor copy (read + write), best of the copies in ``seconds``."""
    x = torch.ones(mib * 2 ** 20 // 4)
    y = torch.empty_like(x)
    y.copy_(x)
    best, t_end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        y.copy_(x)
        best = min(best, time.perf_counter() - t0)
    return 2 * x.numel() * 4 / best / 1e9


def limits() -> Dict[str, object]:
    """The machine's limits, each printed as it is measured (a bf16 product without AVX512-BF16
    runs at a few GFLOP/s: 1024^3 keeps it to seconds)."""
    out: Dict[str, object] = {"lscpu": cpu_flags(), "torch_threads": torch.get_num_threads()}
    print(json.dumps(out), flush=True)
    for key, fn in (("mm_fp32_1024_gflops", lambda: mm_rate(torch.float32, 1024, 1024, 1024)),
                    ("mm_bf16_1024_gflops", lambda: mm_rate(torch.bfloat16, 1024, 1024, 1024)),
                    ("mm_fp32_model_gflops", lambda: mm_rate(torch.float32, 1024, 576, 1536)),
                    # a decode step's products: 20 rows (one per sequence), a layer's and the head's shape
                    ("mm_fp32_decode_layer_gflops", lambda: mm_rate(torch.float32, 20, 576, 1536)),
                    ("mm_fp32_decode_head_gflops", lambda: mm_rate(torch.float32, 20, 576, 49152)),
                    ("mm_bf16_model_gflops", lambda: mm_rate(torch.bfloat16, 1024, 576, 1536)),
                    ("copy_gb_per_s", copy_bandwidth)):
        out[key] = fn()
        print(f"{key}: {out[key]:.2f}", flush=True)
    return out


def engine_profile(model: str = "smollm2-135m-instruct", prompt_tokens: int = 151, new_tokens: int = 48,
                   batch: int = 20, cpu_gemm: str = "packed") -> Dict[str, Dict[str, float]]:
    """Where the rollout's time goes: vLLM alone (the engine the trainer builds, fp32, prefix
    caching on, ``rollout.cpu_gemm`` = ``cpu_gemm``) on prompts of ``prompt_tokens`` tokens. ``prefill_*`` asks for one token (the
    prompt's forward pass); ``decode_*`` then asks for ``new_tokens`` on the same prompts, whose
    prefill the prefix cache now holds, so it times decoding (``ignore_eos``: every sequence runs
    to the end); last, ``torch.profiler`` over 16 decode steps of ``batch`` sequences gives the
    six operators with the largest share of the time."""
    from vllm import SamplingParams

    from tspo_fast.engines.vllm import VLLMEngine
    from tspo_fast.models import resolve_model_path
    engine = VLLMEngine(resolve_model_path(model), dtype="float32", max_model_len=1024, seed=0, cpu_gemm=cpu_gemm)
    llm = engine.llm
    base = [100 + (7 * j) % 1000 for j in range(prompt_tokens - 1)]
    out: Dict[str, Dict[str, float]] = {}

    def prompts_of(n: int, first: int) -> List[dict]:
        """``n`` prompts that start with the tokens ``first``, ``first + 1``, ...: prompts of another
        ``first`` share no block of the prefix cache with them."""
        return [{"prompt_token_ids": [first + i] + base} for i in range(n)]

    def timed(name: str, n: int, tokens: int, first: int) -> None:
        prompts = prompts_of(n, first)
        params = SamplingParams(max_tokens=tokens, temperature=1.0, ignore_eos=True, seed=1)
        t0 = time.perf_counter()
        done = llm.generate(prompts, params, use_tqdm=False)
        dt = time.perf_counter() - t0
        gen = sum(len(o.outputs[0].token_ids) for o in done)
        out[name] = {"sequences": n, "prompt_tokens": prompt_tokens, "new_tokens": tokens, "s": dt,
                     "prompt_tokens_per_s": n * prompt_tokens / dt, "generated_tokens_per_s": gen / dt,
                     "s_per_decode_step": dt / tokens}
        print(cpu_gemm, name, json.dumps(out[name]), flush=True)

    timed("warm-up", 4, 4, first=2000)
    for n, first in ((1, 3000), (batch, 4000)):
        timed(f"prefill_{n}", n, 1, first)                # nothing cached
        timed(f"decode_{n}", n, new_tokens, first)        # the same prompts: their prefill is cached
    # where a decode step of ``batch`` sequences spends its time: the operators' self time
    prompts = prompts_of(batch, 5000)
    llm.generate(prompts, SamplingParams(max_tokens=1), use_tqdm=False)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        llm.generate(prompts, SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True), use_tqdm=False)
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ops)
    out[f"decode_{batch}_profile"] = {e.key: e.self_cpu_time_total / total for e in ops[:6]}
    print(cpu_gemm, f"decode_{batch}_profile (share of self time)", json.dumps(out[f"decode_{batch}_profile"]), flush=True)
    engine.close()                 # the next profile starts its own engine in this process
    return out


def run_variant(name: str, overrides: List[str], steps: int, out_root: str, prompts: int) -> Dict[str, object]:
    out = os.path.join(out_root, name)
    sets = [f"output_dir={out}", f"train.total_steps={steps}", "train.eval_every=0", "train.checkpoint_every=0",
            f"train.prompts_per_step={prompts}", f"train.mini_batch_prompts={prompts}", *overrides]
    cmd = [sys.executable, "-m", "tspo_fast.train", "--config", "configs/smollm2.yaml", "--no-plot"]
    cmd += [a for s in sets for a in ("--set", s)]
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1")
    env.pop("TRITON_INTERPRET", None)
    shutil.rmtree(out, ignore_errors=True)      # a fresh run: the trainer appends to an old metrics.jsonl
    os.makedirs(out, exist_ok=True)
    log = os.path.join(out, "train.log")
    load0, t0 = os.getloadavg(), time.time()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(p.pid, 0)            # this run's own peak resident memory
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        with open(log) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"{name}: {' '.join(cmd)} exited {code} (peak RSS {usage.ru_maxrss / 2**20:.1f} GiB; "
                           f"-9 is the OOM killer's):\n{tail}")
    return {"overrides": overrides, "wall_s": round(time.time() - t0, 1), "loadavg_before": load0,
            "loadavg_after": os.getloadavg(), "peak_rss_gib": usage.ru_maxrss / 2 ** 20,
            **summarize(os.path.join(out, "metrics.jsonl"), steps)}


def summarize(metrics: str, steps: int) -> Dict[str, object]:
    """Means over a run's last ``steps`` step rows of ``metrics`` (a ``metrics.jsonl``), the first
    of them (the warm-up) left out."""
    rows = [json.loads(line) for line in open(metrics)]
    rows = [r for r in rows if "time/step" in r][-steps:]
    rows = rows[1:] or rows                                        # skip the warm-up
    mean = lambda k: sum(r.get(k, 0.0) for r in rows) / len(rows)
    gen = mean("train/tokens_per_s") * mean("time/step")          # generated (trained) tokens per step
    return {"steps_measured": len(rows), "time": {k: round(mean(k), 3) for k in rows[0] if k.startswith("time/")},
            "generated_tokens_per_step": gen, "rollout_tokens_per_s": gen / max(mean("time/rollout"), 1e-9),
            "mismatch_mean_abs": mean("mismatch/mean_abs"), "reward_mean": mean("reward/mean"),
            "response_tokens": mean("rollout/response_tokens"), "micro_batches": mean("train/micro_batches"),
            "train_tokens": mean("train/tokens")}


def model_counts(path: str, top_layers: int) -> Dict[str, float]:
    from transformers import AutoConfig
    c = AutoConfig.from_pretrained(path)
    h, f, L, kv = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_key_value_heads
    hd = h // c.num_attention_heads
    layer = 2 * h * h + 2 * h * kv * hd + 3 * h * f
    return {"layers": L, "per_layer": layer, "body": L * layer, "head": c.vocab_size * h,
            "weight_bytes_fp32": 4 * (L * layer + c.vocab_size * h), "top_layers": top_layers or L}


def ratios(lim: Dict[str, object], runs: Dict[str, Dict], counts: Dict[str, float], seqs: int) -> Dict[str, Dict]:
    out = {}
    mm = float(lim["mm_fp32_model_gflops"]) * 1e9
    bw = float(lim["copy_gb_per_s"]) * 1e9 / 2          # a copy moves 2 bytes per byte read
    per_token = 2 * (counts["body"] + counts["head"])
    decode_bound = min(bw / counts["weight_bytes_fp32"] * seqs, mm / per_token)
    for name, r in runs.items():
        full = "model.lora.rank=0" in r["overrides"]
        top = counts["layers"] if full or "model.lora.top_layers=0" in r["overrides"] else counts["top_layers"]
        tokens = r["train_tokens"]
        ref = "loss.kl_coef=0.001" in r["overrides"]      # the one log-prob pass: pi_ref (pi_old: on-policy, none)
        fwd = 2 * (counts["body"] + counts["head"]) * tokens
        shared = top < counts["layers"] and "model.lora.share_frozen=false" not in r["overrides"]
        # the update's forward: from the kept trunk when the log-prob pass computed it
        fwd_update = 2 * (top * counts["per_layer"] + counts["head"]) * tokens if shared and ref else fwd
        bwd = 2 * (top * counts["per_layer"] + counts["head"]) * tokens          # input gradients
        bwd += 2 * (counts["body"] + counts["head"]) * tokens if full else 0.0    # weight gradients (LoRA: ~0)
        t = r["time"]
        out[name] = {"rollout_tokens_per_s": r["rollout_tokens_per_s"],
                     "rollout_vs_decode_bound": r["rollout_tokens_per_s"] / decode_bound,
                     "logprobs_vs_mm": fwd / max(t.get("time/logprobs", 0.0), 1e-9) / mm if ref else None,
                     "update_vs_mm": (fwd_update + bwd) / max(t["time/update"], 1e-9) / mm}
    out["_bounds"] = {"decode_tokens_per_s": decode_bound, "fp32_mm_flops": mm, "bandwidth_bytes_per_s": bw}
    return out


def analyse(result: Dict[str, object], prompts: int) -> None:
    """The model's counts, each run's ratios to the limits, and the speed-ups against ``before``,
    into ``result`` (from its ``limits`` and ``runs``)."""
    from tspo_fast.models import resolve_model_path
    runs = result["runs"]
    counts = model_counts(resolve_model_path("smollm2-135m-instruct"), 16)
    result["model"] = counts
    result["ratios"] = ratios(result["limits"], runs, counts, seqs=prompts * 5)
    base = runs.get("before")
    per_token = lambda r: ((r["time"].get("time/logprobs", 0.0) + r["time"]["time/update"])
                           / max(r["generated_tokens_per_step"], 1e-9))
    if base:
        result["speedup_vs_before"] = {
            n: {"rollout_tokens_per_s": r["rollout_tokens_per_s"] / max(base["rollout_tokens_per_s"], 1e-9),
                # None: no log-prob pass (on-policy, no KL; the phase only plans the micro-batches)
                "logprobs": (base["time"].get("time/logprobs", 0) / r["time"]["time/logprobs"]
                             if r["time"].get("time/logprobs", 0) > 0.1 else None),
                "update_per_token": (base["time"]["time/update"] / base["generated_tokens_per_step"])
                / max(r["time"]["time/update"] / max(r["generated_tokens_per_step"], 1e-9), 1e-9),
                "logprobs_plus_update_per_token": per_token(base) / max(per_token(r), 1e-9)}
            for n, r in runs.items()}


def resummarize(path: str, steps: int, prompts: int) -> None:
    """Recompute a result file's run summaries from the runs' own ``metrics.jsonl`` (each run's last
    ``steps`` steps), then its ratios and speed-ups; the file is rewritten."""
    result = json.load(open(path))
    root = os.path.join(os.path.dirname(os.path.abspath(path)), "smollm2_throughput")
    for name, run in result["runs"].items():
        run.update(summarize(os.path.join(root, name, "metrics.jsonl"), steps))
    analyse(result, prompts)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3, help="steps per variant (the first is a warm-up)")
    ap.add_argument("--prompts", type=int, default=8, help="questions per step (x rollout.n rollouts)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--limits-only", action="store_true")
    ap.add_argument("--no-engine", action="store_true", help="leave out the profile of vLLM alone (engine_profile)")
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "smollm2_throughput.json"))
    ap.add_argument("--resummarize", action="store_true",
                    help="only recompute --out's summaries from its runs' metrics.jsonl (--steps, --prompts as run)")
    args = ap.parse_args(argv)
    if args.resummarize:
        return resummarize(args.out, args.steps, args.prompts)
    result: Dict[str, object] = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                                 "machine": platform.node(), "python": platform.python_version(),
                                 "torch": torch.__version__, "loadavg": os.getloadavg(), "limits": limits()}
    print(json.dumps(result, indent=1), flush=True)
    if not args.limits_only:
        runs = {}
        for name in args.variants:
            try:
                runs[name] = run_variant(name, VARIANTS[name], args.steps, os.path.join(os.path.dirname(args.out),
                                                                                       "smollm2_throughput"), args.prompts)
            except RuntimeError as e:                  # recorded, and the other variants still run
                result.setdefault("failed", {})[name] = str(e)
                print(f"{name} FAILED: {e}", file=sys.stderr, flush=True)
                continue
            print(name, json.dumps(runs[name]), flush=True)
        result["runs"] = runs
        _write(args.out, result)            # the runs are kept whatever the analysis does
        analyse(result, args.prompts)
    if not args.no_engine:          # last: the engine stays in this process until it exits
        result["engine"] = {g: engine_profile(batch=args.prompts * 5, cpu_gemm=g) for g in ("packed", "linear")}
    _write(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("runs",)}, indent=1))


def _write(path: str, result: Dict[str, object]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
