"""`python -m bot` as the tests run it in a subprocess: the real entry point (settings from the
environment, signal handlers, adapters, gallery, worker), with two test-only stand-ins:

- TEST_ANSWER_S: the answer function computes with torch this long, never checking in (as a
  model does inside one forward pass), then answers; no model is loaded;
- TEST_DISCORD_API: discord.py talks to this local base URL instead of discord.com.
"""

import logging
import os
import sys
import time

import torch

from core.worker import AnswerResult


def slow_answer(job, progress) -> AnswerResult:
    progress("Thinking.")
    matrix = torch.rand(256, 256)
    until = time.monotonic() + float(os.environ["TEST_ANSWER_S"])
    while time.monotonic() < until:
        matrix = torch.tanh(matrix @ matrix)
    return AnswerResult(f"Answer to: {job.question}")


if __name__ == "__main__":
    if os.environ.get("TEST_DISCORD_API"):
        import discord.http

        discord.http.Route.BASE = os.environ["TEST_DISCORD_API"]
    from bot import __main__ as entry
    from core.settings import load_settings

    if os.environ.get("TEST_ANSWER_S"):
        logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
        sys.exit(entry.run(load_settings(), answer_fn=slow_answer))
    entry.main([])
