"""The command line: the binaries' config files, rule and model switches and clear errors;
scripts/test_floors' pins."""

import json
import subprocess
import tomllib

import pytest
from absl import flags
from conftest import ROOT, run_binary
from packaging.requirements import Requirement

from altlearn import config as config_lib
from altlearn import models, rules
from altlearn.train import Experiment

CONFIGS = sorted(p.relative_to(ROOT) for p in (ROOT / "experiments/configs").glob("[!_]*.py"))
DEFAULT = "experiments/configs/default.py"


@pytest.fixture(autouse=True)
def _in_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # config paths are relative to the repository, as in the README


def parse(*args, default=DEFAULT):
    """The config the command line ``args`` gives, overrides applied as the binaries do."""
    flag_values = flags.FlagValues()
    holder, argv = config_lib.define_config_flag(["prog", *args], default, flag_values)
    assert flag_values(argv) == ["prog"]
    return holder.value


def test_switching_the_rule_gives_its_defaults_and_overrides_in_any_order():
    defaults = {**rules.options_of("neuron_pso"), "name": "neuron_pso"}
    config = parse("--config.rule.particles_per_neuron=4", "--config.rule.name=neuron_pso")
    assert config.rule.to_dict() == {**defaults, "particles_per_neuron": 4}
    assert config.model.widths == (512, 512) and config.optimizer.learning_rate == 3e-3
    config = parse(
        "--config.rule.name", "neuron_pso", "--config.rule.inertia=0.5", f"--config={DEFAULT}"
    )
    assert config.rule.to_dict() == {**defaults, "inertia": 0.5}


def test_a_switch_drops_the_files_rule_options_and_keeps_the_rest():
    # np_family.py sets sigma 1e-2 for node perturbation; weight perturbation's default is 1e-3.
    config = parse(
        "--config=experiments/configs/np_family.py:method=np,noise=0.1",
        "--config.rule.name=weight_perturbation",
    )
    assert config.rule.to_dict() == {
        "name": "weight_perturbation",
        **rules.options_of("weight_perturbation"),
    }
    assert config.model.intrinsic_noise == 0.1 and config.model.widths == (256, 256, 256)
    # population.py sets Open_ES's strategy_params; PSO has no such option.
    config = parse(
        "--config=experiments/configs/population.py:method=open_es", "--config.rule.name=pso"
    )
    assert config.rule.to_dict() == {"name": "pso", **rules.options_of("pso")}
    # Naming the file's own rule changes nothing.
    file = "--config=experiments/configs/np_family.py:method=danp"
    same = parse(file, "--config.rule.name=node_perturbation")
    assert same.rule.to_dict() == parse(file).rule.to_dict()
    assert same.rule.sigma == 1e-2 and same.rule.variant == "anp"


def test_switching_the_model_on_default_trains_a_cnn_on_mnist1d():
    config = parse("--config.model.name=cnn", "--config.model.channels=(4,)")
    assert config.model.to_dict() == {
        **models.model_options("cnn"),
        "name": "cnn",
        "channels": (4,),
    }
    Experiment(config)  # validates, loads mnist1d, checks shapes, builds the rule


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_file_takes_every_rule_and_model(path):
    for kind, names in (("rule", rules.RULES), ("model", models.MODELS)):
        for name in names:
            config, _ = config_lib.config_from_argv(
                ["prog", f"--config={path}", f"--config.{kind}.name={name}"], DEFAULT
            )
            config_lib.validate(config)
            assert config[kind].name == name


@pytest.mark.parametrize(
    "args,message",
    [
        (("--config.rule.sigma=0.1",), "valid keys of config.rule: decorrelation_every, "),
        (
            ("--config.rule.name=neuron_pso", "--config.rule.sigma=0.1"),
            "valid keys of config.rule: cognitive, inertia, init_scale",
        ),
        (("--config.rule.name=hebbian",), "Unknown rule 'hebbian'; valid choices: backprop"),
        (("--config.model.name=mlp2",), "Unknown model 'mlp2'; valid choices: mlp, cnn"),
        (
            ("--config=experiments/configs/nope.py",),
            "config file 'experiments/configs/nope.py' not found; config files in "
            "experiments/configs: closed_form.py, default.py, digits.py",
        ),
        (("--config=missing/nope.py",), "no directory 'missing'"),
    ],
)
def test_bad_command_lines_name_the_valid_choices(args, message):
    with pytest.raises(ValueError) as error:
        parse(*args)
    assert message in str(error.value)


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags,message",
    [  # the messages of a bad command line: test_bad_command_lines_name_the_valid_choices
        ((f"--config={DEFAULT}:data=mnist",), "train-images-idx3-ubyte"),
        ((f"--config={DEFAULT}:data=iris,model=cnn",), "1-D signal"),
    ],
)
def test_binary_bad_data_or_model_is_a_clear_error(tmp_path, flags, message):
    result = run_binary(tmp_path, *flags)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.slow
def test_binary_switches_the_rule_with_options_given_before_it(tmp_path):
    result = run_binary(
        tmp_path,
        "--config.rule.particles_per_neuron=2",
        "--config.rule.name=neuron_pso",
        "--config=experiments/configs/digits.py",
        "--config.model.widths=(8,)",
        "--config.steps=2",
        "--config.eval_every=2",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["rule"] == {
        **rules.options_of("neuron_pso"),
        "name": "neuron_pso",
        "particles_per_neuron": 2,
    }
    assert json.loads((tmp_path / "summary.json").read_text())["step"] == 2


def test_floor_pins_are_pyprojects_floors():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    expected = []
    for line in [*project["dependencies"], *project["optional-dependencies"]["test"]]:
        requirement = Requirement(line)
        (floor,) = [s.version for s in requirement.specifier if s.operator == ">="]
        expected.append(f"{requirement.name}=={floor}")
    result = subprocess.run(
        ["bash", "scripts/test_floors", "--print-pins"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == expected


def test_every_test_the_floor_check_names_exists():
    """scripts/test_floors runs a named subset: each file and test function it names exists."""
    script = (ROOT / "scripts" / "test_floors").read_text()
    names = script.split("floor_tests=(", 1)[1].split(")", 1)[0].split()
    assert names
    for name in names:
        path, _, test = name.partition("::")
        assert (ROOT / path).is_file(), name
        if test:
            assert f"def {test}(" in (ROOT / path).read_text(), name
