"""Steps side by side only within memory: the gate lets two steps overlap when their expected peaks
fit the budget together, serialises them when they do not, and runs a step larger than the whole
budget alone (real threads, as doit -n runs steps)."""
from __future__ import annotations

import threading
import time

from compiler.memory import Gate


def overlapped(budget: int, needs: list, watch: int | None = None) -> bool:
    """Whether any two steps ran at once (or, with `watch`, any step beside needs[watch])."""
    gate, running, seen = Gate(budget), set(), [False]
    lock = threading.Lock()

    def step(i, need):
        with gate.hold(need):
            with lock:
                running.add(i)
                if len(running) > 1 and (watch is None or watch in running):
                    seen[0] = True
            time.sleep(0.2)
            with lock:
                running.discard(i)

    threads = [threading.Thread(target=step, args=(i, n)) for i, n in enumerate(needs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return seen[0]


def test_steps_that_fit_together_overlap():
    assert overlapped(100, [40, 40])


def test_steps_whose_peaks_exceed_the_budget_never_run_together():
    assert not overlapped(100, [60, 60])
    assert not overlapped(100, [150, 10])  # larger than the budget: alone, and it still runs


def test_a_step_that_runs_alone_excludes_every_other():
    assert not overlapped(100, [None, 1, 1], watch=0)
    assert not overlapped(100, [1, None, 1], watch=1)
