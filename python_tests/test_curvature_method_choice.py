"""The online choice of a product's path (curvature_method_choice.OnlineChoice), on scripted
timings: the order of the trials, pruning, fixed costs, failures and the final choice."""

import pytest

from gradience_kernels.curvature_method_choice import OnlineChoice


def run(choice, b, candidates, times, fixed=None, calls=20):
    """Calls next/record with per-candidate scripted times (a list per candidate, consumed
    in order) until next() returns the choice; returns the candidates run on trial."""
    seq = []
    for _ in range(calls):
        c = choice.next(b, candidates, fixed)
        if b in choice.choices:  # this call runs the choice: not a trial
            return seq
        seq.append(c)
        choice.record(b, c, times[c].pop(0))
    raise AssertionError(f"not decided after {calls} calls: {seq}")


def test_interleaved_trials_then_the_fastest():
    ch = OnlineChoice(trials=2, prune=1.5)
    seq = run(ch, 8, ["a", "b"], {"a": [1.0, 0.8], "b": [1.2, 0.7]})
    assert seq == ["a", "b", "a", "b"]  # round robin, each twice
    assert ch.choices == {8: "b"} and ch.next(8, ["a", "b"]) == "b"
    assert ch.timings[8] == {"a": [1.0, 0.8], "b": [1.2, 0.7]}
    ch.record(8, "a", 0.1)  # after the choice: ignored
    assert ch.timings[8]["a"] == [1.0, 0.8] and ch.best_time(8) == 0.7


def test_a_clearly_slower_candidate_gets_one_trial():
    ch = OnlineChoice(trials=3, prune=1.5)
    seq = run(ch, 1, ["a", "b"], {"a": [1.0, 1.1, 0.9], "b": [2.0]})
    assert seq == ["a", "b", "a", "a"] and ch.choices[1] == "a"
    assert ch.best_time(1) == 0.9 and ch.best_time(2) is None


def test_fixed_cost_competes_without_calls():
    ch = OnlineChoice(trials=2, prune=1.5)
    # the loop's cost (0.5) beats both measured paths: chosen, never run
    seq = run(ch, 16, ["a", "b"], {"a": [0.6, 0.6], "b": [0.7, 0.65]}, fixed={"loop": 0.5})
    assert seq == ["a", "b", "a", "b"] and ch.choices[16] == "loop"
    assert ch.next(16, ["a", "b"], {"loop": 0.5}) == "loop"
    # a fixed cost far below makes the candidates' second trials pointless (pruned)
    ch2 = OnlineChoice(trials=2, prune=1.5)
    seq = run(ch2, 16, ["a", "b"], {"a": [1.0], "b": [1.0]}, fixed={"loop": 0.5})
    assert seq == ["a", "b"] and ch2.choices[16] == "loop"


def test_batch_sizes_are_independent():
    ch = OnlineChoice()
    run(ch, 1, ["a", "b"], {"a": [1.0, 1.0], "b": [1.2, 1.2]})
    run(ch, 16, ["a", "b"], {"a": [1.0, 1.0], "b": [0.5, 0.5]})
    assert ch.choices == {1: "a", 16: "b"}


def test_drop_reopens_and_single_candidate_is_chosen_at_once():
    ch = OnlineChoice()
    assert run(ch, 4, ["a", "b"], {"a": [1.0], "b": [0.5, 0.5]}) == ["a", "b", "b"]
    assert ch.choices[4] == "b"
    ch.drop("b")  # it failed on some input
    assert 4 not in ch.choices and "b" not in ch.timings[4]
    assert ch.next(4, ["a"]) == "a" and ch.choices[4] == "a"
    ch.record(4, "a", 9.0)  # decided: not recorded
    assert ch.timings[4]["a"] == [1.0]
    # a choice whose candidate disappeared from the list is not returned
    ch.choices[4] = "b"
    assert ch.next(4, ["a"]) == "a"


def test_bad_arguments():
    with pytest.raises(ValueError, match="trials: expected >= 1, got 0"):
        OnlineChoice(trials=0)
    with pytest.raises(ValueError, match="prune: expected >= 1, got 0.5"):
        OnlineChoice(prune=0.5)
    with pytest.raises(ValueError, match="candidates: expected at least one"):
        OnlineChoice().next(1, [])


def test_drop_at_batch_sizes_and_reopen():
    ch = OnlineChoice()
    for b in (1, 4):
        run(ch, b, ["a", "b"], {"a": [1.0, 1.0], "b": [0.5, 0.5]})
    ch.drop("b", min_size=2)  # failed only batched: single choice and timings stay
    assert ch.choices == {1: "b"} and ch.timings[1]["b"] == [0.5, 0.5]
    assert "b" not in ch.timings[4]
    ch.choices[4] = "loop"
    ch.reopen("loop")
    assert ch.choices == {1: "b"} and ch.timings[4] == {"a": [1.0]}
