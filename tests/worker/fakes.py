"""Stand-ins for the worker's collaborators: answer functions and an update recorder."""

import time

from core.worker import AnswerResult, JobView, Progress


class Updates:
    """An on_update callback that remembers every (job_id, event, text) in arrival order."""

    def __init__(self):
        self.seen: list[tuple[int, str, str]] = []

    async def __call__(self, job_id: int, event: str, text: str) -> None:
        self.seen.append((job_id, event, text))

    def events(self, job_id: int) -> list[str]:
        return [event for seen_id, event, _ in self.seen if seen_id == job_id]

    def texts(self, job_id: int, event: str) -> list[str]:
        return [text for seen_id, seen, text in self.seen if seen_id == job_id and seen == event]


def echo_answer(job: JobView, progress: Progress) -> AnswerResult:
    progress("thinking")
    return AnswerResult(text=f"You asked: {job.question}", sources=[{"id": "f1"}],
                        timings={"model_s": 0.01})


def three_step_answer(job: JobView, progress: Progress) -> AnswerResult:
    for step in ("looking at the photo", "retrieving facts", "writing the answer"):
        progress(step)
    return AnswerResult(text="done")


def blocking_answer(seconds: float):
    """An answer that holds its thread without yielding, like a model's forward pass."""

    def answer(job: JobView, progress: Progress) -> AnswerResult:
        time.sleep(seconds)
        return AnswerResult(text=f"slept {seconds} s")

    return answer
