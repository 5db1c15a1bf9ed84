"""The typed state of a call and a step (`core.step_state`) and the
gradient arithmetic decided from it (`exchange.arithmetic`); in-process."""

from __future__ import annotations

import threading

import pytest

from transparent_dist.core import step_state, world
from transparent_dist.core.step_state import StepState


@pytest.fixture(autouse=True)
def _fresh_state():
    step_state.reset()
    yield
    step_state.reset()


def test_a_misspelt_fact_is_an_error_not_false():
    with pytest.raises(AttributeError):
        step_state.current().fiting  # noqa: B018 - the read must fail
    with pytest.raises(TypeError), step_state.within(fiting=True):
        pass
    with pytest.raises(TypeError):
        step_state.declare(sumed=True)
    assert step_state.current() == StepState()


def test_within_restores_only_its_own_facts():
    with step_state.within(fitting=True, own_train_step=True) as state:
        assert state.fitting and step_state.current().own_train_step
        with step_state.within(samples=8, divided=False, summed=False):
            with step_state.within(scaling=True):
                step_state.declare(divided=True)  # what `divide_loss` does
            # Declared inside `scaling`: it outlives it, not the step.
            assert step_state.current().divided and not step_state.current().scaling
        assert step_state.current() == StepState(fitting=True, own_train_step=True)
    assert step_state.current() == StepState()


def test_a_declaration_outside_any_block_stays_until_used():
    step_state.declare(summed=True)  # a custom loop's vector target
    assert step_state.current().summed
    with step_state.within(samples=4, divided=False, summed=False):
        assert not step_state.current().summed  # a framework step starts afresh
    assert step_state.current().summed


def test_a_new_thread_starts_from_the_defaults():
    seen = []
    with step_state.within(fitting=True, keras_call=True):
        thread = threading.Thread(target=lambda: seen.append(step_state.current()))
        thread.start()
        thread.join()
    assert seen == [StepState()]


def test_the_arithmetic_of_each_kind_of_step(monkeypatch):
    from transparent_dist.tf import exchange

    monkeypatch.setattr(world, "_WORLD", world.World(rank=0, size=2))
    # A Keras train step: weighted by its samples; divided where the loss was.
    rule = exchange.arithmetic(StepState(samples=16))
    assert rule == exchange.Arithmetic(weight=16, divided=False, times_ranks=False)
    rule = exchange.arithmetic(StepState(samples=16, divided=True))
    assert rule == exchange.Arithmetic(weight=16, divided=True, times_ranks=False)
    # A custom loop: a plain mean; of a summed target, the sum over ranks.
    assert exchange.arithmetic(StepState()) == exchange.Arithmetic()
    rule = exchange.arithmetic(StepState(samples=16, summed=True))
    assert rule == exchange.Arithmetic(weight=None, divided=False, times_ranks=True)


def test_the_loss_is_divided_only_in_a_step_of_a_native_exchange(monkeypatch):
    from transparent_dist.tf import exchange

    monkeypatch.setattr(world, "_WORLD", world.World(rank=0, size=4))
    monkeypatch.setattr(exchange, "_PATH", {"native": True})
    assert exchange.divide_loss(8.0) == 8.0  # no step: a custom loop
    with exchange.step(5):
        assert exchange.divide_loss(8.0) == 2.0
        assert step_state.current().divided
    assert not step_state.current().divided
    monkeypatch.setattr(exchange, "_PATH", {"native": False})
    with exchange.step(5):
        assert exchange.divide_loss(8.0) == 8.0  # the numpy path takes whole gradients
        assert not step_state.current().divided


@pytest.mark.mpi
def test_a_fit_loads_the_native_op_before_its_first_trace(tmp_path):
    """tests/jobs/exchange_ready.py: the load (a collective, maybe a
    compile) ran eagerly, and the traced step saw the fit's facts."""
    from conftest import JOBS, load_ranks, run

    run(["-m", "transparent_dist", str(JOBS / "exchange_ready.py"), str(tmp_path)], ranks=2).check()
    for result in load_ranks(tmp_path, "ready", 2):
        assert result["load_inside_trace"] is False
        assert result["step"] == {
            "fitting": True,
            "own_train_step": True,
            "in_step": True,
            "samples_known": True,
        }
        assert result["after_fit"] is True
