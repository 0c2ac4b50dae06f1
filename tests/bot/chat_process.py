"""`talkmosaic chat` as the tests run it in a subprocess, with one test-only stand-in: the
answer runs torch for up to a minute and never checks in (an answer that cannot be stopped)."""

import sys
import time

import torch

import bot.terminal
from core.cli import main


def stubborn_answer(_self, _job, _progress):
    matrix = torch.rand(256, 256)
    until = time.monotonic() + 60
    while time.monotonic() < until:
        matrix = torch.tanh(matrix @ matrix)
    raise RuntimeError("not reached in the test")


if __name__ == "__main__":
    bot.terminal.LazyPipeline.load = lambda _self: None
    bot.terminal.LazyPipeline.__call__ = stubborn_answer
    sys.exit(main(["chat"]))
