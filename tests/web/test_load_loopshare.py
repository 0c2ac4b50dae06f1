"""A burst of requests answered from memory shares the loop: once a loop turn has spent its
slice, the rest of the burst waits for later turns, so other callbacks run in between."""

import asyncio

from bot.loopshare import LoopShare


async def test_a_burst_is_spread_over_loop_turns_of_one_slice_each():
    clock = [0.0]
    share = LoopShare(slice_s=0.025, clock=lambda: clock[0])
    turn = [0]
    ran_in_turn: list[int] = []
    loop = asyncio.get_running_loop()

    def count_turns() -> None:
        # call_soon from a callback lands in the next turn: one tick per loop turn.
        turn[0] += 1
        if len(ran_in_turn) < 10:
            loop.call_soon(count_turns)

    async def request() -> None:
        await share.wait_turn()
        ran_in_turn.append(turn[0])
        clock[0] += 0.01  # 10 ms of handler work, without yielding

    loop.call_soon(count_turns)
    await asyncio.gather(*(request() for _ in range(10)))
    per_turn = [ran_in_turn.count(t) for t in sorted(set(ran_in_turn))]
    assert sum(per_turn) == 10
    # 0, 10 and 20 ms fit in a 25 ms slice; the fourth waits for the next turn.
    assert max(per_turn) == 3 and len(per_turn) >= 4


async def test_requests_within_the_slice_do_not_wait():
    share = LoopShare(slice_s=1.0, clock=lambda: 0.0)
    turn = [0]
    asyncio.get_running_loop().call_soon(lambda: turn.__setitem__(0, 1))
    for _ in range(50):
        await share.wait_turn()
    assert turn[0] == 0  # fifty requests, and the loop never had to turn
