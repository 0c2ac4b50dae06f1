"""Grounded Q&A on this CPU: answer latency of the embedded backend with and without
PrFlashAttention / SAQ, and answer quality against a retrieval-only baseline.

    python bench/qa.py [--latency-cases 10] [--cases 0] [--out bench/results/qa-cpu.txt]

Quality runs every case of bench/data/qa_cases.json with the default backend (PrFlashAttention
and SAQ on). An answer is correct when it states the required fact (one of its required phrases)
and cites that fact among its sources. The retrieval-only baseline answers with the top fact.
Latency: the first `--latency-cases` cases, for each configuration in turn, after one warm-up
answer (PrFlashAttention compiles its prefill kernel once per padded prompt length).
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from core.context import AppContext  # noqa: E402
from core.qa.backends import EmbeddedBackend  # noqa: E402
from core.qa.pipeline import AnswerPipeline  # noqa: E402
from core.qa.retrieval import KnowledgeBase  # noqa: E402
from core.qa.vision import VisionTagger  # noqa: E402
from core.settings import Settings  # noqa: E402
from core.vlm.loader import load_smollm2  # noqa: E402

CASES = ROOT / "bench" / "data" / "qa_cases.json"
VEHICLES = ROOT.parent / "shared" / "data" / "vehicles"
CONFIGS = [  # (label, PrFlashAttention, SAQ)
    ("SDPA + DynamicCache (baseline)", False, False),
    ("PrFlashAttention", True, False),
    ("SAQ cache", False, True),
    ("PrFlashAttention + SAQ (default)", True, True),
]


def states(text: str, case: dict) -> bool:
    lowered = text.lower()
    return any(phrase.lower() in lowered for phrase in case["required_phrases"])


def cites(sources: list[dict], case: dict) -> bool:
    return any(source["id"] == case["required_fact"] for source in sources)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-cases", type=int, default=10)
    parser.add_argument("--cases", type=int, default=0, help="quality cases (0: all)")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads; 1 because the 2 cores are shared and spinning threads thrash",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "qa-cpu.txt")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cases = json.loads(CASES.read_text(encoding="utf-8"))
    cases = cases[: args.cases] if args.cases else cases
    photos = {case["photo"]: (VEHICLES / case["photo"]).read_bytes() for case in cases}
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="qa-bench-"))
    ctx = AppContext.open(Settings(data_dir=workdir, database_url=None))
    kb = KnowledgeBase.default(cache_dir=workdir / "cache")
    tagger = VisionTagger(ctx)
    model, tokenizer = load_smollm2()
    log(f"loaded in {time.perf_counter() - started:.0f} s")

    def pipeline(prblock: bool, saq: bool) -> AnswerPipeline:
        backend = EmbeddedBackend(prblock=prblock, saq=saq, loaded=(model, tokenizer))
        return AnswerPipeline(ctx, backend, kb, tagger)

    # Quality: every case, with the default configuration.
    default = pipeline(True, True)
    default.answer(photos[cases[0]["photo"]], cases[0]["question"])  # warm-up (compiles)
    answers = []
    for number, case in enumerate(cases, start=1):
        answer = default.answer(photos[case["photo"]], case["question"])
        answers.append(answer)
        log(f"{number}/{len(cases)} {answer.timings['total_s']:.1f} s "
            f"{'ok' if states(answer.text, case) and cites(answer.sources, case) else 'MISS'} "
            f"{case['required_fact']}")  # fmt: skip

    # Latency: every configuration on the same cases, one after the other, after a warm-up.
    latency_cases = cases[: args.latency_cases]
    latencies, tokens = {}, {}
    for label, prblock, saq in CONFIGS:
        runner = pipeline(prblock, saq)
        runner.answer(photos[latency_cases[0]["photo"]], latency_cases[0]["question"])
        timed = [runner.answer(photos[c["photo"]], c["question"]) for c in latency_cases]
        latencies[label] = [a.timings["total_s"] for a in timed]
        tokens[label] = [a.timings.get("new_tokens", 0) for a in timed]
        log(f"{label}: p50 {statistics.median(latencies[label]):.1f} s")

    retrieved = [
        default.retrieve(c["question"], a.evidence) for c, a in zip(cases, answers, strict=True)
    ]
    quality = {
        "retrieval only (answer = top fact)": [
            bool(facts)
            and states(f"{facts[0][0].title}: {facts[0][0].text}", case)
            and facts[0][0].id == case["required_fact"]
            for case, facts in zip(cases, retrieved, strict=True)
        ],
        "SmolLM2 reply alone (no quoted fact)": [
            states(a.model_text, case)
            and any(
                f"[{s['n']}]" in a.model_text and s["id"] == case["required_fact"]
                for s in a.sources
            )
            for case, a in zip(cases, answers, strict=True)
        ],
        "SmolLM2 answer, cited + key fact (default)": [
            states(a.text, case) and cites(a.sources, case)
            for case, a in zip(cases, answers, strict=True)
        ],
    }
    top3 = sum(
        any(f.id == c["required_fact"] for f, _ in facts)
        for c, facts in zip(cases, retrieved, strict=True)
    )
    gate = sum(a.evidence is not None and a.evidence.is_car for a in answers)

    base = statistics.median(latencies[CONFIGS[0][0]])
    lines = [
        f"Grounded Q&A on this CPU ({os.cpu_count()} cores shared with other jobs, "
        f"{args.threads} torch thread(s), load average {os.getloadavg()[0]:.1f} at the end)",
        "SmolLM2-135M-Instruct, greedy, max_new_tokens 128, 3 facts per prompt",
        "",
        f"Latency per answer (photo -> answer, {len(latency_cases)} cases, after a warm-up)",
        f"{'configuration':<36}{'p50 s':>8}{'p95 s':>8}{'tokens':>8}{'p50 vs baseline':>17}",
    ]
    for label, _, _ in CONFIGS:
        p50 = statistics.median(latencies[label])
        lines.append(
            f"{label:<36}{p50:>8.1f}{percentile(latencies[label], 0.95):>8.1f}"
            f"{statistics.mean(tokens[label]):>8.0f}{base / p50:>16.2f}x"
        )
    lines += [
        "",
        f"Answer quality ({len(cases)} cases: states the required fact and cites it)",
        f"{'answerer':<44}{'correct':>10}{'share':>8}",
    ]
    for label, marks in quality.items():
        lines.append(f"{label:<44}{sum(marks):>6}/{len(marks):<3}{sum(marks) / len(marks):>8.0%}")
    lines += [
        "",
        f"Retrieval: required fact in the top 3 for {top3}/{len(cases)} questions. "
        f"Car gate: {gate}/{len(cases)} case photos pass.",
        f"Bench wall time {time.perf_counter() - started:.0f} s.",
    ]
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
