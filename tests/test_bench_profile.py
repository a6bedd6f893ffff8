"""The profile ranking of ``BENCH_PROFILE=1`` (bench/profile.py): pure logic over py-spy's collapsed stacks."""

from bench.profile import render, top_functions


def test_the_ranking_gives_each_function_its_inclusive_and_self_share() -> None:
    lines = [
        "main (svc/__main__.py:10);run (asyncio/runners.py:118);_process (consumer/delivery.py:80) 6",
        "main (svc/__main__.py:10);run (asyncio/runners.py:118);record (common/store.py:700) 3",
        "main (svc/__main__.py:10);run (asyncio/runners.py:118) 1",
        "not a stack line",
    ]
    top = {func: (inc, own) for func, inc, own in top_functions(lines)}
    assert top["main (__main__.py)"] == (100.0, 0.0)
    assert top["run (runners.py)"] == (100.0, 10.0)
    assert top["_process (delivery.py)"] == (60.0, 60.0)
    assert top["record (store.py)"] == (30.0, 30.0)
    assert "_process (delivery.py)" in render("consumer-1", top_functions(lines))


def test_a_recursive_function_counts_once_per_stack() -> None:
    lines = ["f (m.py:1);f (m.py:2);f (m.py:3) 4", "g (m.py:9) 4"]
    top = {func: (inc, own) for func, inc, own in top_functions(lines)}
    assert top["f (m.py)"] == (50.0, 50.0)
    assert top_functions([]) == []
