"""Grounded Q&A on this CPU, in one run: answer quality of the default (extractive) answerer,
of SmolLM2 ranking the same sentences (PrFlashAttention + SAQ, and plain SDPA + DynamicCache) and
of quoting the top fact; out-of-scope handling; false refusals on the real photos; first-answer
and follow-up latency of each, and the KV bytes the model paths hold per conversation.

    python bench/qa.py [--cases 0] [--latency-cases 30] [--dump features.json]

Data: bench/data/qa_eval.json (in-scope cases with required facts, required phrases and known
wrong claims; out-of-scope and hostile cases; two-turn conversations).
- correct: the answer states a required phrase and cites a required fact;
- unsupported/wrong: a known wrong claim matches, or a shown sentence has a number its cited
  sources (or the car's record) do not hold;
- repeat: a sentence or an 8-word phrase said twice.
"""

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from core.context import AppContext  # noqa: E402
from core.images import decode_image  # noqa: E402
from core.qa.backends import EmbeddedBackend, ExtractiveBackend  # noqa: E402
from core.qa.claims import quantities, strip_citations  # noqa: E402
from core.qa.compose import SCOPE_REPLY, first_repeat  # noqa: E402
from core.qa.pipeline import AnswerPipeline  # noqa: E402
from core.qa.retrieval import KnowledgeBase  # noqa: E402
from core.qa.vision import VisionTagger  # noqa: E402
from core.settings import Settings  # noqa: E402
from core.vlm.loader import load_smollm2  # noqa: E402

EVAL = ROOT / "bench" / "data" / "qa_eval.json"
VEHICLES = ROOT.parent / "shared" / "data" / "vehicles"


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


def correct(text: str, sources: list[dict], case: dict) -> bool:
    lowered = text.lower()
    states = any(phrase.lower() in lowered for phrase in case["required_phrases"])
    return states and any(s["id"] in case["required_facts"] for s in sources)


def lead_correct(text: str, sources: list[dict], case: dict) -> bool:
    """The first paragraph a person reads (after any note about the photo) answers."""
    paragraphs = [p for p in text.split("\n\n") if not p.startswith("I could not tell")]
    lead = paragraphs[0] if paragraphs else ""
    cited = {int(n) for n in re.findall(r"\[(\d+)\]", lead)}
    return correct(lead, [s for s in sources if s["n"] in cited], case)


def wrong(text: str, sources: list[dict], case: dict, kb: KnowledgeBase) -> bool:
    """A known wrong claim, or a shown number that is in none of the sources it cites."""
    body = text.split("\n\nSources:")[0]
    if any(re.search(pattern, body, re.IGNORECASE) for pattern in case.get("wrong_claims", [])):
        return True
    cited_text = {s["n"]: kb.fact(s["id"]).title + ". " + kb.fact(s["id"]).text for s in sources}
    for line in body.split("\n"):
        sentence, cited = strip_citations(line.lstrip("• "))
        if not cited or sentence.startswith("Our library's record"):
            continue
        held = [q for n in cited if n in cited_text for q in quantities(cited_text[n])]
        if any(not any(q.matches(h) for h in held) for q in quantities(sentence)):
            return True
    return False


def capturing(runner: AnswerPipeline, features: list):
    """runner.rank, also recording each candidate's ranking features (for --dump)."""
    rank = runner.rank

    def recorded(question, candidates, facts, draft):
        vectors = runner.checker.vectors([question, *(c.text for c in candidates)])
        similarity = (vectors[1:] @ vectors[0]).tolist()
        features.append([
            {"text": c.text, "fact": c.source.fact_id, "similarity": sim,
             "fact_score": facts[c.source.number - 1][1] if c.source.number else None,
             "lm": None if draft.scores is None else draft.scores[i]}
            for i, (c, sim) in enumerate(zip(candidates, similarity, strict=True))
        ])  # fmt: skip
        return rank(question, candidates, facts, draft)

    return recorded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=0, help="in-scope cases (0: all)")
    parser.add_argument("--model-cases", type=int, default=0,
                        help="in-scope cases the SmolLM2 rows answer too (0: all)")  # fmt: skip
    parser.add_argument("--latency-cases", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 because the 2 cores are shared")  # fmt: skip
    parser.add_argument("--dump", type=Path, help="write per-candidate features (calibration)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "qa-cpu.txt")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    data = json.loads(EVAL.read_text(encoding="utf-8"))
    cases = data["cases"][: args.cases] if args.cases else data["cases"]
    workdir = Path(tempfile.mkdtemp(prefix="qa-bench-"))
    ctx = AppContext.open(Settings(data_dir=workdir, database_url=None))
    kb = KnowledgeBase.default(cache_dir=workdir / "cache")
    tagger = VisionTagger(ctx)
    model, tokenizer = load_smollm2()

    def photo(name: str | None) -> bytes | None:
        return (VEHICLES / name).read_bytes() if name else None

    def pipeline(backend) -> AnswerPipeline:
        return AnswerPipeline(ctx, backend, kb, tagger)

    default = pipeline(ExtractiveBackend())
    ranked = pipeline(EmbeddedBackend(loaded=(model, tokenizer)))
    baseline = pipeline(EmbeddedBackend(prblock=False, saq=False, loaded=(model, tokenizer)))
    runners = {"default": default, "rank": ranked, "baseline": baseline}
    features: list = []
    if args.dump:
        ranked.rank = capturing(ranked, features)
    for runner in runners.values():
        runner.answer(photo(cases[0]["photo"]), cases[0]["question"])
    log(f"loaded in {time.perf_counter() - started:.0f} s")

    # Quality: every in-scope case with the default and the retrieval-only peers.
    marks: dict[str, list[tuple[bool, bool, bool]]] = {}
    dumped = []
    answers = {}
    for number, case in enumerate(cases, 1):
        image = photo(case["photo"])
        answer = default.answer(image, case["question"])
        answers[case["id"]] = answer
        models = not args.model_cases or number <= args.model_cases
        by_model = ranked.answer(image, case["question"]) if models else None
        plain = baseline.answer(image, case["question"]) if models else None
        facts = default.retrieve(case["question"], answer.evidence)
        top = facts[0][0] if facts else None
        quoted = f"{top.text} [1]\n\nSources: [1] {top.title}" if top else ""
        top_sources = [{"n": 1, "id": top.id}] if top else []
        rows = {
            "default: extractive (MiniLM + retrieval)": (answer.text, answer.sources),
            "SmolLM2 ranks (PrFlashAttention + SAQ)": by_model
            and (by_model.text, by_model.sources),
            "SmolLM2 ranks (SDPA + DynamicCache)": plain and (plain.text, plain.sources),
            "retrieval only: top fact quoted": (quoted, top_sources),
        }
        for label, shown in rows.items():
            if shown is None:
                continue
            text, sources = shown
            marks.setdefault(label, []).append((
                correct(text, sources, case), wrong(text, sources, case, kb),
                first_repeat(text) is not None, lead_correct(text, sources, case),
            ))  # fmt: skip
        ok = marks["default: extractive (MiniLM + retrieval)"][-1]
        log(f"{number}/{len(cases)} {answer.timings.get('total_s', 0):.1f} s "
            f"{'ok' if ok[0] else 'MISS'}{' WRONG' if ok[1] else ''} {case['id']}")  # fmt: skip
        if args.dump and by_model is not None:
            dumped.append({"case": case, "answer": by_model.text, "sources": by_model.sources,
                           "refused": answer.refused,
                           "relevance": kb.relevance(case["question"]),
                           "features": features[-1] if features else None})  # fmt: skip

    # Out of scope: each must get the one polite sentence (or, for a foreign question, an
    # answer), never invented content and never the question parroted back.
    scope_ok = []
    for case in data["out_of_scope"]:
        answer = default.answer(photo(case["photo"]), case["question"])
        declined = answer.text == SCOPE_REPLY or answer.refused
        parroted = case["question"].lower() in answer.text.lower()
        scope_ok.append((case["kind"], declined and not parroted))
        if args.dump:
            dumped.append({"out_of_scope": case, "answer": answer.text,
                           "relevance": kb.relevance(case["question"])})  # fmt: skip

    # Photos: how many of the 1,600 real car and pickup photos the gate refuses.
    real = sorted(VEHICLES.glob("*/*.jpg"))
    gate = VisionTagger()
    gate.model = tagger.model
    refused = sum(
        not gate.describe(decode_image(p.read_bytes(), ctx.settings.max_image_pixels)).is_car
        for p in real
    )

    # Latency: first answers, the configurations taking turns on the same cases.
    latency: dict[str, list[float]] = {label: [] for label in runners}
    for case in cases[: args.latency_cases]:
        for label, runner in runners.items():
            answer = runner.answer(photo(case["photo"]), case["question"])
            latency[label].append(answer.timings["total_s"])

    # Follow-ups: two-turn conversations, each configuration holding its own KV caches.
    turns = {label: {"first": [], "follow": [], "bytes": [], "prefilled": [], "ok": []}
             for label in latency}  # fmt: skip
    for number, talk in enumerate(data["follow_ups"]):
        for label, runner in runners.items():
            image = photo(talk["photo"])
            key = f"{label}-{number}"
            first = runner.answer(image, talk["first"]["question"], conversation_id=key)
            history = [(talk["first"]["question"], first.text)]
            follow = runner.answer(image, talk["follow_up"]["question"], history=history,
                                   conversation_id=key)  # fmt: skip
            held = turns[label]
            held["first"].append(first.timings["total_s"])
            held["follow"].append(follow.timings["total_s"])
            held["bytes"].append(follow.timings.get("kv_bytes", 0))
            held["prefilled"].append([t.timings.get("prefilled_tokens", 0)
                                      for t in (first, follow)])  # fmt: skip
            held["ok"].append(correct(follow.text, follow.sources, talk["follow_up"]))

    lines = [
        f"Grounded Q&A on this CPU ({os.cpu_count()} cores, {args.threads} torch thread(s), "
        f"load average {os.getloadavg()[0]:.1f} at the end); SmolLM2-135M-Instruct for the model "
        "paths, 3 facts an answer (2 new ones a follow-up)",
        "",
        f"Answer quality ({len(cases)} in-scope cases of bench/data/qa_eval.json"
        + (f"; the SmolLM2 rows on the first {args.model_cases}" if args.model_cases else "") + ")",
        f"{'answerer':<42}{'correct':>9}{'lead correct':>14}{'unsupported/wrong':>19}"
        f"{'repeats':>9}",
    ]
    if args.model_cases and args.model_cases < len(cases):
        subset = ("default: extractive (MiniLM + retrieval)", "retrieval only: top fact quoted")
        for label in subset:
            marks[f"{label.split(':')[0]}, first {args.model_cases}"] = marks[label][
                : args.model_cases
            ]
    for label, rows in marks.items():
        n = len(rows)
        lines.append(
            f"{label:<42}{sum(r[0] for r in rows) / n:>9.1%}{sum(r[3] for r in rows) / n:>14.1%}"
            f"{sum(r[1] for r in rows):>13}/{n:<5}{sum(r[2] for r in rows):>9}"
        )
    kinds = sorted({kind for kind, _ in scope_ok})
    lines += [
        "",
        "Out of scope (declined in one sentence, nothing invented, not parroted): "
        + ", ".join(
            f"{kind} {sum(ok for k, ok in scope_ok if k == kind)}/"
            f"{sum(k == kind for k, _ in scope_ok)}" for kind in kinds
        ),
        f"False refusals on the {len(real)} real car and pickup photos: {refused} "
        f"({refused / len(real):.2%})",
        "",
        f"Latency, s ({len(latency['default'])} first answers; {len(data['follow_ups'])} "
        "two-turn conversations)",
        f"{'configuration':<34}{'first p50':>10}{'p95':>7}{'follow-up p50':>15}{'p95':>7}"
        f"{'prefilled first/follow':>24}{'KV bytes held':>15}{'convs/GiB':>11}",
    ]
    names = {"default": "extractive (default)", "rank": "SmolLM2 + PrFlashAttention + SAQ",
             "baseline": "SmolLM2 + SDPA + DynamicCache"}  # fmt: skip
    for label, times in latency.items():
        held = turns[label]
        kv = statistics.mean(held["bytes"]) if held["bytes"] else 0
        prefilled = held["prefilled"]
        first_tokens = statistics.mean(p[0] for p in prefilled)
        follow_tokens = statistics.mean(p[1] for p in prefilled)
        lines.append(
            f"{names[label]:<34}{statistics.median(times):>10.2f}{percentile(times, 0.95):>7.2f}"
            f"{statistics.median(held['follow']):>15.2f}{percentile(held['follow'], 0.95):>7.2f}"
            + (f"{first_tokens:>15.0f}/{follow_tokens:<8.0f}{kv / 2**20:>12.1f} MiB"
               f"{2**30 / kv:>11.0f}" if kv else f"{'no model':>24}{'-':>15}{'-':>11}")
        )
    base = statistics.median(latency["baseline"])
    p50 = {label: statistics.median(times) for label, times in latency.items()}
    lines += [
        "",
        f"First-answer p50 speed-up against SmolLM2 + SDPA + DynamicCache: default "
        f"{base / p50['default']:.2f}x, SmolLM2 + PrFlashAttention + SAQ {base / p50['rank']:.2f}x",
        "Follow-up p50 / first-answer p50: " + ", ".join(
            f"{names[label]} {statistics.median(turns[label]['follow']) / p50[label]:.2f}"
            for label in runners
        ),
        "Follow-ups correct: " + ", ".join(
            f"{names[label]} {sum(turns[label]['ok'])}/{len(turns[label]['ok'])}" for label in turns
        ),
        f"Bench wall time {time.perf_counter() - started:.0f} s.",
    ]
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table + "\n", encoding="utf-8")
    if args.dump:
        args.dump.write_text(json.dumps(dumped, indent=1, default=str), encoding="utf-8")


if __name__ == "__main__":
    main()
