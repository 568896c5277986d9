"""Experiment configs, and every experiment binary end to end on tiny settings: its outputs
(with provenance and intervals), and its bad input as one line with no traceback."""

import json

import pytest
from conftest import run_module

from altlearn import config as config_lib
from altlearn.train import Experiment
from experiments import compare, hybrid_study
from experiments.configs import np_family


@pytest.mark.parametrize("method", sorted(np_family.METHODS))
def test_np_family_configs_are_valid_at_both_scales(method):
    cpu = np_family.get_config(f"method={method},data=digits")
    Experiment(cpu)  # validates, loads the data, checks shapes and builds the rule
    paper = np_family.get_config(f"method={method},data=cifar10,scale=paper")
    config_lib.validate(paper)
    assert paper.model.widths == (1024, 1024, 1024) and paper.batch_size == 1000
    assert cpu.model.decorrelation == method.startswith("d")


def test_np_family_variant_errors():
    with pytest.raises(ValueError, match="valid choices: bp, dbp, np"):
        np_family.get_config("method=xnp")
    with pytest.raises(ValueError, match="keys: method, data"):
        np_family.get_config("optimiser=adam")


def test_population_config_and_generated_rice_table(tmp_path):
    from altlearn.data import load_dataset
    from experiments import make_table
    from experiments.configs import population

    path = make_table.write_table(tmp_path / "rice_like.csv", rows=200)
    data = load_dataset(f"csv:{path}")
    assert data.task == "classification" and data.num_outputs == 2
    assert data.x_train.shape[1] == 7
    for method in population.METHODS:
        config = population.get_config(f"method={method},data=csv:{path}")
        assert config.model.widths == (16,)
    with pytest.raises(ValueError, match="valid choices: bp, pso"):
        population.get_config("method=cma")


def test_compare_takes_config_variants_and_any_registered_rule():
    """--methods: the config file's variants and rules by name (its defaults, on the file's
    model and data); --set applies to every method that has the key; the steps are exact."""
    configs = compare.method_configs(
        "experiments/configs/np_family.py", ["bp", "weight_perturbation"], "digits", "",
        ["rule.sigma=0.05", "batch_size=32"],
    )  # fmt: skip
    assert configs["weight_perturbation"].rule.name == "weight_perturbation"
    assert configs["weight_perturbation"].rule.sigma == 0.05
    assert configs["weight_perturbation"].model.widths == configs["bp"].model.widths
    assert configs["bp"].batch_size == 32 == configs["weight_perturbation"].batch_size
    with pytest.raises(ValueError, match="unknown method 'hebbian'; valid choices: the variants"):
        compare.method_configs("experiments/configs/np_family.py", ["hebbian"], "digits", "", [])
    with pytest.raises(ValueError, match="--set rule.sgima=1: give KEY=VALUE with a key"):
        compare.method_configs(
            "experiments/configs/np_family.py", ["bp"], "digits", "", ["rule.sgima=1"]
        )
    every = compare.method_configs(
        "experiments/configs/np_family.py", ["danp", "danp/every=4"], "digits", "", []
    )  # a variant with an option of its own: its own row
    assert every["danp"].rule.decorrelation_every == 1
    assert every["danp/every=4"].rule.decorrelation_every == 4
    with pytest.raises(ValueError, match="Bad variant 'evry=4'; keys: method"):
        compare.method_configs("experiments/configs/np_family.py", ["dbp/evry=4"], "digits", "", [])
    config = configs["bp"]
    compare.set_steps(config, seeds=2, steps=300)
    assert (config.steps, config.eval_every) == (300, 15)  # 20 evaluations: a curve


@pytest.mark.slow
def test_compare_pairs_tabulate_paired_differences_and_refuse_unknown_methods():
    methods = ["np", "np/dist=normal"]
    assert compare.parse_pairs(["np:np/dist=normal"], methods) == [("np", "np/dist=normal")]
    for bad in ("np", "np:anp", "anp:np"):
        with pytest.raises(ValueError, match="both among --methods"):
            compare.parse_pairs([bad], methods)
    final = lambda acc, loss: {"test_accuracy": acc, "train_loss": loss}
    results = {
        "digits": {
            "np": {"final": final([0.9, 0.8, 0.7], [1.0, 1.0, 1.0])},
            "np/dist=normal": {"final": final([0.8, 0.8, 0.8], [2.0, 1.0, 0.0])},
        }
    }
    text = compare.pairs_table(results, [("np", "np/dist=normal")])
    # differences +0.1, 0, -0.1 (mean 0, std 0.1) and -1, 0, +1 (mean 0, std 1)
    assert "| np | np/dist=normal | " in text and "0.000 ± 0.100 [-0.248, +0.248] |" in text
    assert "over 3 seeds" in text


def test_compare_binary_end_to_end(tmp_path):
    """At equal steps and at the forward passes bp spends in them (np: 2 a step, bp: 3)."""
    result = run_module(
        "experiments.compare", "--methods=bp,np", "--data=digits", "--seeds=2", "--steps=6",
        "--eval_every=2", "--set=model.widths=(16,)", "--budgets=steps,passes",
        f"--workdir={tmp_path}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    document = json.loads((tmp_path / "compare.json").read_text())
    np_run = document["results"]["digits, equal steps"]["np"]
    assert [c["step"] for c in np_run["curves"]] == [0, 2, 4, 6]
    assert np_run["forward_passes"] == 2 and np_run["tuned"] is None
    passes = document["results"]["digits, equal forward passes"]
    assert passes["bp"]["steps"] == 6 and passes["np"]["steps"] == 9  # 18 passes each
    assert passes["np"]["budget_value"] == 18 * passes["np"]["batch_size"]  # in samples
    assert document["provenance"]["command"].startswith("python -m experiments.compare")
    table = (tmp_path / "compare.md").read_text()
    assert "minus bp" in table and "[" in table and (tmp_path / "compare.png").exists()


STUDIES = {
    "persistent_toy": ("experiments.persistent_study", "--study=toy", "--iterations=2",
                       "--steps=20"),
    "persistent_kink": ("experiments.persistent_study", "--study=kink", "--inits=2",
                        "--iteration_steps=10", "--penalties=inverse", "--distances=function"),
    "hybrid": ("experiments.hybrid_study", "--data=digits", "--methods=hybrid,bp", "--seeds=2",
               "--tune_seeds=1", "--set=steps=20", "--set=rule.es_every=10",
               "--set=rule.population_size=2", "--set=model.channels=(4,)", "--set=model.dense=()"),
    "closed_form": ("experiments.closed_form_compare", "--data=wine", "--methods=adam",
                    "--alternations=3", "--steps=20", "--records=4", "--seeds=2",
                    "--max_steps=40"),
}  # fmt: skip


def test_cnn_study_tunes_every_method_alike_and_reports_its_choice(monkeypatch):
    """persistent_study's CNN study: the baselines' learning rate and persistent's lambda x tau
    each tuned on 6 points (the same seeds count), and each method trained at its choice."""
    from experiments import persistent_study as study

    tuned, reported = [], {}

    class Tuned:
        def __init__(self, config, grid):
            self.chosen = {
                "from": (config.rule.name, config.optimizer.get("cycles"), "|".join(grid))
            }

        def record(self):
            return {"chosen": self.chosen}

    def fake_tune(config, grid, seeds):
        points = 1
        for spec in grid:
            points *= 6 if "logspace" in spec else len(spec.split(","))
        tuned.append((config.rule.name, points, seeds))
        return Tuned(config, grid)

    monkeypatch.setattr(study.tune, "tune", fake_tune)
    monkeypatch.setattr(
        study, "compare_methods", lambda methods, k, seeds: reported.update(methods) or {}
    )
    out = study.cnn_study(["digits"], 3, 5, [0.1])
    assert len(tuned) == 5 and {points for _, points, _ in tuned} == {6}
    assert {seeds for *_, seeds in tuned} == {3}  # as many tuning seeds as reported, by default
    tuned.clear()
    assert study.cnn_study(["digits"], 10, 5, [0.1], tune_seeds=2)["tune_seeds"] == 2
    assert {seeds for *_, seeds in tuned} == {2}
    assert list(out["results"]) == ["digits, init x0.1"]
    for name, (config, _kind, point) in reported.items():  # each at its own tuning's choice
        grid = point["from"][2]
        assert grid.startswith("optimizer.learning_rate")  # persistent's too, with lambda
        assert ("rule.strength" in grid) == ("persistent" in name)
        assert point["from"][0] == config.rule.name


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(STUDIES))
def test_study_binaries_end_to_end_at_a_tiny_size(tmp_path, name):
    """persistent_study (toy, kink), hybrid_study and closed_form_compare from the command
    line: each writes its json (with provenance), md and png."""
    module, *flags = STUDIES[name]
    result = run_module(module, *flags, f"--workdir={tmp_path}", f"--name={name}")
    assert result.returncode == 0, (name, result.stderr[-3000:])
    document = json.loads((tmp_path / f"{name}.json").read_text())
    assert document["provenance"]["versions"]["jax"]
    assert (tmp_path / f"{name}.md").exists() and (tmp_path / f"{name}.png").exists()
    if name == "hybrid":
        hybrid = document["results"]["digits"]["hybrid"]
        assert [p["step"] for p in hybrid["around_phases"]] == [10, 20]
        assert hybrid["vs_bp_test_accuracy"]["n"] == 2
        # tuned alike: three grid points each on tuning seed 1000; the hybrid at bp's rate
        tuning = document["tuning"]["digits"]
        assert [len(tuning[m]["grid"]) for m in ("bp", "hybrid")] == [3, 3]
        assert tuning["bp"]["seeds"] == [1000]
        lr = tuning["bp"]["chosen"]["optimizer.learning_rate"]
        assert hybrid["hparams"]["optimizer.learning_rate"] == pytest.approx(lr)
        rows = [v["control"] for v in document["verdicts"]["digits"]]
        assert rows == ["bp, final iterate", "bp, best iterate on validation"]
        assert 0 <= document["verdicts"]["digits"][1]["test_accuracy"]["p_holm"] <= 1
    if name == "persistent_kink":  # baselines tuned on as many points as a penalty's grid
        tuning = document["tuning"]
        assert len(tuning["one long run"]["grid"]) == len(tuning["restarts"]["grid"]) == 9
        assert list(document["results"])[2] == "persistent (inverse, function distance)"
        lr = document["chosen"]["restarts"]["optimizer.learning_rate"]
        assert lr == tuning["restarts"]["chosen"]["optimizer.learning_rate"]
    if name == "closed_form":
        md = tmp_path / f"{name}.md"
        assert "Adam's best training loss" in md.read_text()
        md.write_text("")  # --replot: the tables again from the JSON, nothing trained
        again = run_module(module, *flags, "--replot", f"--workdir={tmp_path}", f"--name={name}")
        assert again.returncode == 0, again.stderr[-3000:]
        assert "Adam's best training loss" in md.read_text()
        assert "Line search over the 6 alternations" in md.read_text()  # 3 x 2 seeds
        assert (
            json.loads((tmp_path / f"{name}.json").read_text())["provenance"]
            == document["provenance"]
        )


def test_hybrid_study_keeps_bp_matched_s_extra_steps_when_the_steps_are_set():
    default = hybrid_study.configs("digits", ["bp", "bp_matched"], [])
    share = default["bp_matched"].steps / default["bp"].steps
    assert share > 1.2  # the phases' forward passes as extra steps
    shorter = hybrid_study.configs("digits", ["bp", "bp_matched"], ["steps=100"])
    assert shorter["bp"].steps == 100
    assert shorter["bp_matched"].steps == round(100 * share)


BINARIES = {
    "experiments.compare": ("--methods=bp", "--data=digits"),
    "experiments.sweep": ("--config=experiments/configs/digits.py",),
    "experiments.hybrid_study": ("--data=digits", "--methods=bp"),
    "experiments.persistent_study": ("--study=kink",),
    "experiments.closed_form_compare": ("--data=wine",),
    "experiments.train": ("--config=experiments/configs/digits.py",),
}
BAD_VALUES = {
    "experiments.compare": ("--tune=optimizer.learning_rate=[-1]", "learning_rate must be > 0"),
    "experiments.sweep": ("--sweep=optimizer.learning_rate=[-1]", "learning_rate must be > 0"),
    "experiments.hybrid_study": ("--set=rule.es_every=0", "es_every must be >= 1"),
    "experiments.persistent_study": ("--data=nope", "Unknown dataset 'nope'"),
    "experiments.closed_form_compare": ("--adam_lrs=fast", "takes numbers; got ['fast']"),
    "experiments.train": ("--config.rule.name=hebbian", "Unknown rule 'hebbian'"),
}


@pytest.mark.slow
@pytest.mark.parametrize("module", sorted(BINARIES))
def test_every_binary_says_bad_input_in_one_line(tmp_path, module):
    """A bad value (a sweep or tuning value, a method, a dataset, a rule) and a workdir that is
    a file: each a short message and a non-zero exit, never a traceback; an unknown flag is
    absl's one message, the same for every binary (checked on compare)."""
    file = tmp_path / "file"
    file.write_text("")
    bad, message = BAD_VALUES[module]
    cases = [((bad,), message), ((f"--workdir={file}",), "is a file; give a directory")]
    if module == "experiments.compare":
        cases.append((("--no_such_flag=1",), "Unknown command line flag 'no_such_flag'"))
    if module == "experiments.persistent_study":
        cases[0] = ((bad, "--study=cnn"), message)
    for extra, expected in cases:
        result = run_module(module, *BINARIES[module], f"--workdir={tmp_path / 'out'}", *extra)
        assert result.returncode != 0, (module, extra)
        assert expected in result.stderr, (module, extra, result.stderr[-2000:])
        assert "Traceback" not in result.stderr, (module, extra, result.stderr[-2000:])
        assert len(result.stderr.strip().splitlines()) <= 2, (module, result.stderr[-2000:])
