"""Sweep axes (altlearn/sweep.py): the SPEC forms, numeric against structural keys, the grid,
and clear errors for bad input."""

import numpy as np
import pytest

from altlearn import config as config_lib
from altlearn import sweep
from altlearn.config import base_config


@pytest.fixture
def config():
    return base_config(rule="node_perturbation", model="mlp", data="digits")


def test_spec_forms_mean_what_numpy_means():
    assert sweep.parse_values("k", "[1e-3, 3e-3,1e-2]") == (1e-3, 3e-3, 1e-2)
    np.testing.assert_allclose(sweep.parse_values("k", "linspace(0,1,5)"), np.linspace(0, 1, 5))
    np.testing.assert_allclose(sweep.parse_values("k", "logspace(-4,-2,3)"), [1e-4, 1e-3, 1e-2])
    a = sweep.parse_values("k", "uniform(0.1,0.2,4)", seed=3)
    assert len(a) == 4 and all(0.1 <= v <= 0.2 for v in a)
    assert a == sweep.parse_values("k", "uniform(0.1,0.2,4)", seed=3)  # seeded
    assert a != sweep.parse_values("k", "uniform(0.1,0.2,4)", seed=4)
    b = sweep.parse_values("k", "loguniform(1e-4,1e-2,6)")
    assert all(1e-4 <= v <= 1e-2 for v in b)
    assert sweep.parse_values("k", "[backprop, node_perturbation]") == (
        "backprop",
        "node_perturbation",
    )


def test_numeric_and_structural_axes_and_the_grid(config):
    lr = sweep.parse_axis(config, "optimizer.learning_rate=logspace(-4,-2,3)")
    sigma = sweep.parse_axis(config, "rule.sigma=[1e-3,1e-2]")
    widths = sweep.parse_axis(config, "model.widths=[(64,),(128,128)]")
    assert lr.numeric and sigma.numeric and not widths.numeric
    structural, numeric = sweep.points([lr, widths, sigma])
    assert structural == [{"model.widths": (64,)}, {"model.widths": (128, 128)}]
    assert len(numeric) == 6 and numeric[0] == {
        "optimizer.learning_rate": 1e-4,
        "rule.sigma": 1e-3,
    }
    assert "optimizer.learning_rate" in sweep.sweepable(config)


@pytest.mark.parametrize(
    "flag, message",
    [
        ("rule.sgima=[1,2]", "unknown config key 'rule.sgima'; the numeric .vmapped. keys"),
        ("rule.sigma=range(1,2)", "malformed SPEC; valid forms: \\[v1,v2,...\\], linspace"),
        ("rule.sigma=linspace(0,1,0)", "n must be an integer >= 1"),
        ("rule.sigma=linspace(0,1)", "takes \\(a,b,n\\)"),
        ("rule.sigma=loguniform(0,1,3)", "loguniform needs a, b > 0"),
        ("model.widths=linspace(8,64,3)", "model.widths is structural"),
        ("rule.sigma=[a,b]", "rule.sigma takes numbers"),
        ("rule.sigma=[]", "an empty list"),
        ("rule.sigma", "give KEY=SPEC"),
    ],
)
def test_bad_sweeps_are_clear_errors(config, flag, message):
    with pytest.raises(ValueError, match=message):
        sweep.parse_axis(config, flag)


def test_rule_names_switch_the_section_and_rule_options_apply_where_they_exist(config):
    """rule.name x model.widths x rule.sigma x learning rate: sigma applies to node perturbation
    and not to backprop; a key no swept rule has is refused, naming the numeric keys."""
    flags = [
        "rule.name=[backprop,node_perturbation]",
        "model.widths=[(8,),(16,)]",
        "rule.sigma=[1e-3,1e-2]",
        "optimizer.learning_rate=[1e-3,1e-2,1e-1]",
    ]
    axes, plan = sweep.plan(config, flags, 0, 0)
    assert [a.numeric for a in axes] == [False, False, True, True]
    assert [p.values for p in plan] == [
        {"rule.name": r, "model.widths": w}
        for r in ("backprop", "node_perturbation")
        for w in ((8,), (16,))
    ]
    assert [len(p.numeric) for p in plan] == [3, 3, 6, 6]
    assert plan[0].numeric[1] == {"optimizer.learning_rate": 1e-2}
    assert plan[0].config.rule.name == "backprop" and plan[3].config.model.widths == (16,)
    with pytest.raises(ValueError, match="no swept rule reads the config key 'rule.num_partic"):
        sweep.plan(config, flags[:1] + ["rule.num_particles=[2]"], 0)
    # a swarm moves the parameters itself: its optimizer keys are no hyperparameters of it
    pso = base_config(rule="pso", model="mlp", data="digits")
    assert "optimizer.learning_rate" not in sweep.sweepable(pso)
    with pytest.raises(ValueError, match="rule 'pso' does not use the optimizer section"):
        sweep.plan(pso, ["optimizer.learning_rate=[1e-3]"], 0)
    _, plan = sweep.plan(
        config,
        ["rule.name=[pso,backprop]", "optimizer.learning_rate=[1e-3,1e-2]"],
        0,
        0,
    )
    assert [len(p.numeric) for p in plan] == [1, 2]
    evolution = base_config(rule="evolution", model="mlp", data="digits")
    _, plan = sweep.plan(
        evolution,
        ["rule.strategy=[Open_ES,Sep_CMA_ES]", "optimizer.learning_rate=[1e-3,1e-2]"],
        0,
        0,
    )
    assert [len(p.numeric) for p in plan] == [2, 1]  # Sep_CMA_ES takes no optimizer
    with pytest.raises(ValueError, match="a key given twice"):
        sweep.plan(config, flags[:1] * 2, 0)


def test_a_key_given_twice_is_refused(config):
    axis = sweep.parse_axis(config, "rule.sigma=[1e-3]")
    with pytest.raises(ValueError, match="a key given twice"):
        sweep.points([axis, axis])


def _tiny_base():
    from conftest import tiny_config

    config = tiny_config(steps=10)
    config.eval_every = 5
    config.model.widths = (8,)
    return config


@pytest.mark.slow
def test_a_sweep_is_one_program_per_structural_point_and_rows_equal_single_runs(
    tmp_path, monkeypatch
):
    """2 learning rates x 2 seeds per structural point (2 rules; weight perturbation's sigma
    applies to it alone) as one vmapped program each, sharded over the 8 fake devices: 2
    compilations; each row equals that point trained alone by the runner with the printed
    command's settings; a rerun on the workdir skips every chunk and writes the same sweep.csv;
    another sweep on it is refused."""
    import jax

    from altlearn import driver, runner
    from experiments import sweep as binary

    assert jax.device_count() == 8
    traces = []
    original = driver.make_train

    def counting(*args, **kwargs):  # counts the programs traced (each compiled once)
        train = original(*args, **kwargs)

        def traced(key, hparams):
            traces.append(1)
            return train(key, hparams)

        traced.experiment, traced.eval_steps = train.experiment, train.eval_steps
        return traced

    monkeypatch.setattr(driver, "make_train", counting)
    base = _tiny_base()
    flags_ = [
        "optimizer.learning_rate=[1e-3,1e-2]",
        "rule.name=[backprop,weight_perturbation]",
        "rule.sigma=[3e-3]",
    ]
    result = binary.run_sweep(base, flags_, 2, tmp_path / "s")
    assert len(traces) == 2 and len(result["rows"]) == 8
    row = next(
        r
        for r in result["rows"]
        if r["rule.name"] == "weight_perturbation"
        and r["optimizer.learning_rate"] == 1e-2
        and r["seed"] == 1
    )
    single = config_lib.switch(base.copy_and_resolve_references(), rule="weight_perturbation")
    single.rule.sigma, single.optimizer.learning_rate, single.seed = 3e-3, 1e-2, 1
    single.data.split_seed = result["split_seed"]
    alone = runner.run(single, tmp_path / "alone")
    for key in ("train_loss", "val_loss", "test_accuracy"):
        np.testing.assert_allclose(row[key], alone[key], rtol=1e-4, atol=1e-6)
    assert row["best_val_step"] in (5, 10)
    csv = (tmp_path / "s" / "sweep.csv").read_text()
    assert csv.count("\n") == 9 and (tmp_path / "s" / "sweep.png").exists()
    assert csv.splitlines()[1].startswith("backprop,0.001,,0,")  # no sigma for backprop

    (tmp_path / "s" / "sweep.csv").unlink()
    traces.clear()
    binary.run_sweep(base, flags_, 2, tmp_path / "s")  # every chunk saved: nothing trains
    assert (tmp_path / "s" / "sweep.csv").read_text() == csv and len(traces) == 0
    with pytest.raises(ValueError, match="holds another sweep"):
        binary.run_sweep(base, flags_, 3, tmp_path / "s")


def test_a_memory_budget_below_one_point_says_the_need(tmp_path):
    from experiments import sweep as binary

    with pytest.raises(ValueError, match=r"below one point's need, [0-9.]+ MiB"):
        binary.run_sweep(_tiny_base(), ["optimizer.learning_rate=[1e-3]"], 1, tmp_path, 1e-6)


@pytest.mark.slow
def test_two_processes_write_the_sweep_one_process_writes(tmp_path):
    """The same command under jax.distributed (two local processes of 2 CPU devices each,
    collectives through gloo) writes the sweep.csv of one process (this one, 8 devices); only
    process 0 writes."""
    import os
    import socket
    import subprocess
    import sys

    from conftest import ROOT as root

    args = [
        sys.executable,
        "-m",
        "experiments.sweep",
        "--config=experiments/configs/digits.py",
        "--sweep=optimizer.learning_rate=[1e-3,1e-2]",
        "--seeds=2",
        "--config.steps=10",
        "--config.eval_every=5",
        "--config.model.widths=(8,)",
    ]

    def env(devices):
        flags_ = f"--xla_force_host_platform_device_count={devices}"
        return {**os.environ, "PYTHONPATH": str(root), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags_}

    from altlearn import config as config_lib
    from experiments import sweep as binary

    one = config_lib.load_config_file("experiments/configs/digits.py")  # as the flags give it
    one.steps, one.eval_every, one.model.widths = 10, 5, (8,)
    binary.run_sweep(one, ["optimizer.learning_rate=[1e-3,1e-2]"], 2, tmp_path / "one")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen(
            [
                *args,
                f"--workdir={tmp_path / 'two'}",
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ],
            cwd=root,
            env=env(2),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert "Best point" in outs[0][0] and "Best point" not in outs[1][0]  # process 0 speaks
    csv = (tmp_path / "one" / "sweep.csv").read_text()
    assert (tmp_path / "two" / "sweep.csv").read_text() == csv


@pytest.mark.slow
def test_shards_merge_into_the_unsharded_sweep(tmp_path):
    """--shard=0/2 and 1/2 (a job array) each train their share of the points; merged they
    give the unsharded sweep.csv. Shards of different sweeps, or a missing shard, are refused."""
    from experiments import sweep as binary

    base = _tiny_base()
    flags_ = ["optimizer.learning_rate=[1e-3,3e-3,1e-2]"]
    binary.run_sweep(base, flags_, 1, tmp_path / "all")
    shards = [tmp_path / f"shard{i}" for i in range(2)]
    for i, d in enumerate(shards):
        binary.run_sweep(base, flags_, 1, d, shard=(i, 2))
    assert (shards[0] / "sweep.csv").read_text().count("\n") == 3  # points 0 and 2
    binary.merge(shards, tmp_path / "merged")
    expected = (tmp_path / "all" / "sweep.csv").read_text()
    assert (tmp_path / "merged" / "sweep.csv").read_text() == expected
    with pytest.raises(ValueError, match="need shards 0..1 of 2 once each; got \\[0\\]"):
        binary.merge(shards[:1], tmp_path / "m2")
    other = tmp_path / "other"
    with pytest.raises(ValueError, match="holds no point: the sweep has 1"):
        binary.run_sweep(base, ["optimizer.learning_rate=[1e-3]"], 1, other, shard=(1, 2))
    binary.run_sweep(base, ["optimizer.learning_rate=[1e-3,2e-3]"], 1, other, shard=(1, 2))
    with pytest.raises(ValueError, match="shards of different sweeps"):
        binary.merge([shards[0], other], tmp_path / "m3")
    with pytest.raises(ValueError, match="give i/n with 0 <= i < n"):
        binary.parse_shard("2/2")
