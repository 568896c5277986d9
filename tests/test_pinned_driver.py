"""Pinned behaviour of the driver's bookkeeping: members padded to the device count, the
largest chunk a memory budget holds, the steady-state step time over the timed calls only."""

import types

import jax
import jax.numpy as jnp
from conftest import tiny_config

from altlearn import driver


def test_without_a_budget_the_members_are_padded_to_a_multiple_of_the_device_count():
    keys = driver.seed_keys(range(12))
    assert driver.chunk_size(None, keys, {}, 0, 8) == 16
    assert driver.chunk_size(None, keys[:8], {}, 0, 8) == 8
    assert driver.chunk_size(None, keys[:3], {}, 0, 8) == 8
    assert driver.chunk_size(None, keys, {}, 0, 1) == 12


def _need(program, keys, hparams, n):
    """Bytes of the n-member program by XLA's memory analysis (as the driver reads it)."""
    compiled = jax.jit(jax.vmap(program)).lower(keys[:n], {k: v[:n] for k, v in hparams.items()})
    m = compiled.compile().memory_analysis()
    return m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes


def test_a_memory_budget_gives_the_largest_chunk_of_whole_device_multiples_that_fits():
    """The need of n members is fixed + n x per (from the one- and two-member programs): the
    chunk is the most members, a multiple of the device count, whose need fits the budget, at
    least one per device and at most every member (padded)."""
    keys = driver.seed_keys(range(12))
    hparams = {"a": jnp.linspace(0.0, 1.0, 12)}
    shared = jnp.arange(2.0**15)  # a part every member shares: the fixed need

    def program(key, hp):
        return jnp.cumsum(jnp.full((4096,), hp["a"]) + key[0]) + jnp.cumsum(shared)[:4096]

    one, two = (_need(program, keys, hparams, n) for n in (1, 2))
    per, fixed = two - one, 2 * one - two
    assert 0 < per < fixed
    for fits, devices, chunk in [(5.5, 1, 5), (5.5, 2, 4), (3.5, 4, 4), (40.0, 2, 12)]:
        budget_mb = (fixed + fits * per) / 2**20
        assert driver.chunk_size(program, keys, hparams, budget_mb, devices) == chunk, fits


def test_step_seconds_is_the_mean_step_time_of_the_timed_calls(monkeypatch):
    """After the warm-up call, whole chunks of 21 steps (20 rounded up to whole periods of 3)
    are timed until they add up to PROBE_SECONDS and there are at least two: here 0.25 s then
    0.5 s, so 0.75 s over 2 x 21 steps."""
    clock = iter([0.0, 0.25, 1.0, 1.5, 2.0, 2.75, 3.0, 4.0])
    monkeypatch.setattr(driver, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    seconds = driver.step_seconds(tiny_config("backprop"), [0], period=3)
    assert seconds == 0.75 / (2 * 21)


def test_the_members_are_sharded_over_every_device_from_two_on(monkeypatch):
    """With two devices the members' arrays are laid out over both (a one-axis mesh), three
    members padded to a chunk of four; every member's curve comes back."""
    devices = jax.devices()[:2]
    monkeypatch.setattr(jax, "devices", lambda: devices)
    layouts = []
    global_arrays = driver.global_arrays

    def spy(args, sharding):
        layouts.append(sharding)
        return global_arrays(args, sharding)

    monkeypatch.setattr(driver, "global_arrays", spy)
    config = tiny_config(steps=2)
    runs = driver.run(config, seeds=[0, 1, 2], eval_at=())
    assert runs.chunk_size == 4 and len(layouts) == 1
    assert layouts[0] is not None and layouts[0].mesh.devices.size == 2
    assert runs.curves["train_loss"].shape == (3, 2)


def test_a_budget_in_seconds_buys_that_many_steady_state_steps(monkeypatch):
    """seconds / step_seconds whole steps, at least one."""
    monkeypatch.setattr(driver, "step_seconds", lambda config, seeds: 0.004)
    config = tiny_config()
    assert driver.budget_steps(config, [0], seconds=1.0) == 250
    assert driver.budget_steps(config, [0], seconds=0.001) == 1
