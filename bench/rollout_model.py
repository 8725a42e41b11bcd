"""The rollout model's harness: real rollouts of both loops, the model fitted to them and checked,
and what-ifs priced (the model itself: :mod:`tspo_fast.env.rollout_model`).

The sync loop (Search-R1's turn barrier) and the async loop (each trajectory on its own) of
:class:`tspo_fast.env.agent.SearchAgent` are replayed on a *trace* (every trajectory's turns: tokens
to prefill, tokens sampled, whether the turn ends in a search) against a continuous-batching
engine whose step costs ``base + per_seq * sequences + per_prefill_token * new prompt tokens``
and a retriever whose call costs ``latency + per_call + per_query * queries``.  Replaying runs no
language model, so the same trace can be priced with another engine's step cost (a GPU's, where
a decode step costs nearly the same for 1 or 200 sequences) or another retrieval latency.

``python bench/rollout_model.py [--slots 8]`` (CPU, the embedded default with vLLM, about 1 min;
``--slots``: the engine's ``rollout.max_num_seqs``):

1. runs real rollouts of both loops at 0, 50 and 200 ms of added retrieval latency (the
   retrieval server of ``bench/slow_server.py`` on loopback), logging every engine step;
2. fits the step cost on the logged steps and the retrieval cost on the logged calls;
3. replays each measured rollout on its own trace and prints the model's error;
4. prices the measured traces under what-ifs: a clairvoyant scheduler (trajectories with the
   longest remaining chain first, best number of engine slots), and a GPU-like engine whose
   step cost hardly depends on the number of sequences (``--gpu-step-ms``, ``--gpu-per-seq-ms``).

Everything here is a model: its figures are predictions, checked against the measured rollouts
of step 3, never measurements of a GPU.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Optional, Sequence

import numpy as np
from embedded import embedded_vllm
from slow_server import SlowServer

from tspo_fast.data import prompt_items
from tspo_fast.env.rollout_model import RetrievalCost, StepCost, Turn, fit_step_cost, simulate, trace_of
from tspo_fast.retrieval.http import HTTPRetriever
from tspo_fast.training.builders import build_agent


# ---------------------------------------------------------------------------------------------- CLI
def _measure(delays_ms: Sequence[float], seeds: Sequence[int], slots: Optional[int]):
    """Real rollouts of both loops at each delay: (records, step log, retrieval call log, the
    async loop's gaps between steps)."""
    cfg, tok, engine, train = embedded_vllm(slots)
    items = prompt_items(train[:cfg.train.prompts_per_step], tok)

    steps, calls, gaps, scheduled, computed = [], [], [], [], [0]
    # what each step ran, from vLLM's scheduler (in-process engine core): requests scheduled and
    # tokens computed (one per decoding request, the uncached prompt tokens of a prefilling one)
    try:
        scheduler = engine.llm.llm_engine.engine_core.engine_core.scheduler
    except AttributeError as e:
        engine.close()
        raise RuntimeError("rollout_model needs vLLM's engine core in this process (V1, InprocClient) to read "
                           f"what each step scheduled; this vLLM has no such path ({e})") from e
    schedule, step = scheduler.schedule, engine.step

    def logged_schedule(*a, **kw):
        out = schedule(*a, **kw)
        scheduled.append((len(out.num_scheduled_tokens), out.total_num_scheduled_tokens))
        computed[0] += out.total_num_scheduled_tokens - len(out.num_scheduled_tokens)
        return out

    prev = {"end": None}                       # the last step's end, while requests were left running

    def logged_step():
        scheduled.clear()
        t = time.perf_counter()
        if prev["end"] is not None:           # the loop's own work between two steps
            gaps.append(t - prev["end"])
        out = step()
        end = time.perf_counter()
        if len(scheduled) == 1 and scheduled[0][0] > 0:
            seqs, tokens = scheduled[0]
            steps.append((seqs, tokens - seqs, end - t))
        prev["end"] = end if engine.num_pending() > 0 else None
        return out

    scheduler.schedule, engine.step = logged_schedule, logged_step
    records = []
    try:
        for delay in delays_ms:
            with SlowServer(delay) as server:
                http = HTTPRetriever(server.url, timeout_s=30, retries=0)
                inner = http.retrieve

                def logged_retrieve(queries, topk, _inner=inner, _d=delay):
                    t = time.perf_counter()
                    out = _inner(queries, topk)
                    calls.append((_d, len(queries), time.perf_counter() - t))
                    return out

                http.retrieve = logged_retrieve
                for mode in ("sync", "async"):
                    c = copy.deepcopy(cfg)
                    c.rollout.mode = mode
                    agent = build_agent(c, engine, http, tok)
                    agent.rollout(items, seed=10_000)          # warm-up
                    for s in seeds:
                        prev["end"] = None
                        computed[0] = 0
                        b = agent.rollout(items, seed=s)
                        trace = trace_of(b)
                        # vLLM computes only the context past its cached prefix blocks (the group's shared
                        # prompt, earlier turns): the trace's prefill scaled to what the engine computed
                        share = computed[0] / max(sum(t.prefill for turns in trace for t in turns), 1)
                        trace = [[Turn(round(t.prefill * share), t.gen, t.search) for t in turns] for turns in trace]
                        records.append(dict(delay=delay, mode=mode, seed=s, trace=trace, prefill_share=share,
                                            total=b.stats.total_seconds, critical=b.stats.critical_path_seconds))
    finally:
        engine.close()
    return records, steps, calls, gaps


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--delays-ms", default="0,50,200")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--slots", type=int, default=None, help="rollout.max_num_seqs of the measured engine")
    # the what-if engine: a 7B model in bf16 on an H200 (assumptions, not measurements): a decode step
    # reads the weights once (15 GB at 4.8 TB/s = 3.2 ms; a few ms of launch and sampling on top),
    # each sequence adds its KV cache (28 layers x 2 x 4 heads x 128 x 2 bytes = 57 KB a token, 1.5k
    # tokens: 0.02 ms), a prefill token costs 2 x 7.6 GFLOP (0.03 ms at 500 TFLOP/s)
    ap.add_argument("--gpu-step-ms", type=float, default=8.0, help="what-if engine: ms of a step's fixed part")
    ap.add_argument("--gpu-per-seq-ms", type=float, default=0.02, help="what-if engine: ms added per sequence")
    ap.add_argument("--gpu-per-prefill-token-ms", type=float, default=0.03,
                    help="what-if engine: ms added per prefill token")
    ap.add_argument("--gpu-token-scale", default="1,8",
                    help="what-if traces: every turn's tokens x each of these (8: 64-token turns -> 512)")
    ap.add_argument("--gpu-copies", default="1,64",
                    help="what-if traces: the measured batch x each of these (40 trajectories x 64 = 2560, "
                         "Search-R1's 512 x 5)")
    ap.add_argument("--gpu-slots", type=int, default=256)
    args = ap.parse_args(argv)
    delays = [float(d) for d in args.delays_ms.split(",")]
    records, steps, calls, gaps = _measure(delays, list(range(1, args.seeds + 1)), args.slots)

    cost, r2 = fit_step_cost(steps)
    print(f"engine step fit over {len(steps)} logged steps: {cost.base * 1e3:.2f} ms + "
          f"{cost.per_seq * 1e3:.3f} ms/sequence + {cost.per_prefill_token * 1e3:.4f} ms/prefill token (R^2 {r2:.2f})")
    loop = statistics.mean(gaps) if gaps else 0.0
    print(f"prefill tokens vLLM computed / the traces' (the rest hit its prefix cache): "
          f"{statistics.mean(r['prefill_share'] for r in records):.2f}")
    print(f"async loop's own work between two engine steps: mean {loop * 1e3:.2f} ms over {len(gaps)} gaps")
    extra = [(n, dt - d / 1e3) for d, n, dt in calls]
    a = np.array([[1.0, n] for n, _ in extra])
    (per_call, per_query), *_ = np.linalg.lstsq(a, np.array([e for _, e in extra]), rcond=None)
    print(f"retrieval fit over {len(calls)} calls: delay + {per_call * 1e3:.2f} ms/call + "
          f"{per_query * 1e3:.3f} ms/query")

    def rcost(delay_ms: float, conc: int = 8) -> RetrievalCost:
        return RetrievalCost(delay_ms / 1e3, max(float(per_call), 0.0), max(float(per_query), 0.0), conc)

    print("\nmodel vs measured (mean over seeds; each rollout replayed on its own trace):")
    print("delay | loop  | measured | model | model error | measured critical path | model's")
    errors = []
    for d in delays:
        for mode in ("sync", "async"):
            rs = [r for r in records if r["delay"] == d and r["mode"] == mode]
            sims = [simulate(r["trace"], cost, rcost(d), mode, slots=args.slots, loop_overhead=loop) for r in rs]
            meas = statistics.mean(r["total"] for r in rs)
            model = statistics.mean(s.total for s in sims)
            errors += [(s.total - r["total"]) / r["total"] for s, r in zip(sims, rs)]
            print(f"{d:5.0f} | {mode:5s} | {meas:.3f} s  | {model:.3f} s | {100 * (model - meas) / meas:+5.1f}% | "
                  f"{statistics.mean(r['critical'] for r in rs):.3f} s | "
                  f"{statistics.mean(x.critical_path for x in sims):.3f} s")
    print(f"per-rollout model error: mean {100 * statistics.mean(errors):+.1f}%, "
          f"largest {100 * max(abs(e) for e in errors):.1f}%")

    print("\nwhat-ifs on the measured traces (model; speed-up = sync / async on the same traces):")
    print("delay | sync | async as shipped (earlier turns first) | speed-up | "
          "clairvoyant async (best slots) | speed-up")
    for d in delays:
        traces = [r["trace"] for r in records if r["delay"] == d]
        sync = statistics.mean(simulate(tr, cost, rcost(d), "sync", slots=args.slots).total for tr in traces)
        asy = statistics.mean(simulate(tr, cost, rcost(d), "async", slots=args.slots, loop_overhead=loop).total
                              for tr in traces)
        most = args.slots or max(len(tr) for tr in traces)      # never more slots than the measured engine
        best = min((statistics.mean(simulate(tr, cost, rcost(d), "async", slots=s, order="chain",
                                             loop_overhead=loop).total
                                    for tr in traces), s) for s in (2, 4, 6, 8, 12, 16, 24, 32, 40) if s <= most)
        print(f"{d:5.0f} | {sync:.3f} s | {asy:.3f} s | {sync / asy:.2f}x | {best[0]:.3f} s ({best[1]} slots) | "
              f"{sync / best[0]:.2f}x")

    gpu = StepCost(args.gpu_step_ms / 1e3, args.gpu_per_seq_ms / 1e3, args.gpu_per_prefill_token_ms / 1e3)
    print(f"\nGPU-like what-if (model only): step {args.gpu_step_ms} ms + {args.gpu_per_seq_ms} ms/sequence + "
          f"{args.gpu_per_prefill_token_ms} ms/prefill token, {args.gpu_slots} slots, no loop overhead; "
          f"the sync rollouts' traces, every turn's tokens x scale, the trajectories x copies")
    print("tokens x | trajectories | delay | sync | async | speed-up | engine busy sync / async")
    for k in (int(x) for x in args.gpu_token_scale.split(",")):
        for copies in (int(c) for c in args.gpu_copies.split(",")):
            for d in delays:
                traces = [[[Turn(t.prefill * k, t.gen * k, t.search) for t in turns]
                           for turns in r["trace"]] * copies
                          for r in records if r["delay"] == d and r["mode"] == "sync"]
                sy = [simulate(tr, gpu, rcost(d), "sync", slots=args.gpu_slots) for tr in traces]
                a_ = [simulate(tr, gpu, rcost(d), "async", slots=args.gpu_slots) for tr in traces]
                ms, ma = statistics.mean(x.total for x in sy), statistics.mean(x.total for x in a_)
                print(f"{k:8d} | {len(traces[0]):12d} | {d:5.0f} | {ms:.2f} s | {ma:.2f} s | {ms / ma:.2f}x | "
                      f"{statistics.mean(x.engine_busy / x.total for x in sy):.2f} / "
                      f"{statistics.mean(x.engine_busy / x.total for x in a_):.2f}")

if __name__ == "__main__":
    main()
