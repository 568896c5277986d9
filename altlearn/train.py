"""The training program: the whole run is one function of a PRNG key (purejaxrl style).

    train = make_train(config)                  # evaluations every config.eval_every steps
    state, curves = jax.jit(train)(jax.random.PRNGKey(0))                  # one run
    jax.jit(jax.vmap(train))(keys)                                          # seeds, one program
    jax.jit(jax.vmap(train))(keys, {"optimizer.learning_rate": lrs})        # a sweep

``curves`` holds every evaluation's figures, step 0 included: ``step``, ``{split}_loss`` and
``{split}_accuracy`` for every split (train, val, test), ``grad_cosine`` (a gradient-like rule's
estimate against the true gradient), the rule's own reports and its per-step metrics averaged
over the interval (``rule/<name>``), and ``train_loss_running`` (the interval's mean batch
loss; NaN at step 0), each an array over the evaluations. ``make_train(config, eval_at=...)``
evaluates at the steps given instead. Every binary trains through this program
(``altlearn.driver`` runs points x seeds of it); the checkpointed single run
(``altlearn.runner``) runs the same steps and the same evaluation in chunks.

``Experiment`` holds the pieces (data on the device, model, task, the rule resolved once) and
offers the pure functions the program composes: ``init``, ``train_steps`` (a ``lax.scan`` over
steps) and ``evaluate``.

Every random choice derives from the run key and the step number: the batch of step t comes
from the permutation of epoch t // steps_per_epoch, and the rule's key is fold_in(key, t). A run
resumed from a checkpoint at step t therefore continues exactly as if never stopped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from altlearn import config as config_lib
from altlearn import data as data_lib
from altlearn import losses, models, optimizers, prng, rules


class TrainState(NamedTuple):
    step: jax.Array  # int32 []
    key: jax.Array  # the run key (raw uint32 [2]); never advanced, per-step keys are folded in
    variables: Any  # flax variables: 'params' and non-trainable collections
    rule_state: Any
    hparams: dict[str, jax.Array]  # sweepable hyperparameters, float32 []


def _cosine(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b) + 1e-30)


def mean_offdiagonal_correlation(z: jax.Array) -> jax.Array:
    """Mean |C_ij| / sqrt(C_ii C_jj) over i != j, C = Z^T Z / B (uncentred, as the rule uses)."""
    c = z.T @ z / z.shape[0]
    d = jnp.sqrt(jnp.clip(jnp.diag(c), 1e-30))
    corr = jnp.abs(c / d[:, None] / d[None, :])
    n = c.shape[0]
    return (jnp.sum(corr) - jnp.trace(corr)) / max(n * (n - 1), 1)


def _eval_chunks(x: np.ndarray, y: np.ndarray, size: int) -> rules.base.EvalSplit:
    """Pads a split to whole chunks of ``size``: arrays [C, size, ...] and a mask [C, size]."""
    n = x.shape[0]
    size = max(1, min(size, n))
    chunks = math.ceil(n / size)
    pad = chunks * size - n
    mask = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
    y = np.concatenate([y, np.zeros((pad, *y.shape[1:]), y.dtype)])
    reshape = lambda a: jnp.asarray(a.reshape(chunks, size, *a.shape[1:]))
    return rules.base.EvalSplit(reshape(x), reshape(y), reshape(mask), n)


def split_seed(config: ml_collections.ConfigDict) -> int:
    """The seed of the validation split: ``data.split_seed``, or the run's seed if it is -1 (a
    sweep pins it, so that every seed of a point trains on the same split)."""
    seed = int(config.data.get("split_seed", -1))
    return int(config.seed) if seed < 0 else seed


class Experiment:
    """Data, model, task and rule for one config; every method is pure and jittable."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        dataset: data_lib.Dataset | None = None,
        model: models.Model | None = None,
    ):
        """``dataset`` and ``model`` replace the ones ``config`` names (arrays, a flax module
        of your own: ``models.from_flax``)."""
        config_lib.validate(config)
        self.config = config
        if dataset is None:
            dataset = data_lib.load_dataset(
                config.data.name,
                data_dir=config.data.data_dir or None,
                seed=split_seed(config),
                validation_fraction=config.data.validation_fraction,
                standardize=config.data.standardize,
                train_on_validation=bool(config.data.get("train_on_validation", False)),
            )
        self.dataset = dataset
        self.task = losses.make_task(dataset.task, config.loss)
        if model is None:
            model_opts = {k: v for k, v in config.model.items() if k != "name"}
            model = models.make_model(
                config.model.name, dataset.x_train.shape[1:], dataset.num_outputs, **model_opts
            )
        self.model = model
        self.rule = rules.resolve(config.rule)  # the rule, resolved once
        self.num_train = dataset.x_train.shape[0]
        self.batch_size = min(int(config.batch_size), self.num_train)
        self.steps_per_epoch = self.num_train // self.batch_size
        self.x_train = jnp.asarray(dataset.x_train)
        self.y_train = jnp.asarray(dataset.y_train)
        self.splits = {
            name: _eval_chunks(x, y, config.eval_batch_size)
            for name, x, y in (
                ("train", dataset.x_train, dataset.y_train),
                ("val", dataset.x_val, dataset.y_val),
                ("test", dataset.x_test, dataset.y_test),
            )
            if x.shape[0] > 0
        }
        # The whole splits a rule declares (RuleSpec.needs), as device arrays; never the test.
        x_val, y_val = jnp.asarray(dataset.x_val), jnp.asarray(dataset.y_val)
        self.rule_data = {"train": (self.x_train, self.y_train), "val": (x_val, y_val)}
        self.sizes = rules.Sizes(self.batch_size, self.num_train, int(x_val.shape[0]))
        self.default_hparams = config_lib.hparams(config)
        self._check_shapes()
        # Build once on concrete values: bad rule options fail here, before anything compiles.
        self._phase_step = self.build_rule(self.default_hparams).phase_step

    @property
    def phase_steps(self) -> Callable[[int], bool] | None:
        """t -> whether step t (counted from 1) runs the rule's occasional phase
        (``LearningRule.phase_step``), or None for a rule without phases."""
        return self._phase_step

    @property
    def step_cost(self) -> float:
        """Forward-pass equivalents one step of the rule spends (its ``RuleSpec.cost``; a
        backward or jvp pass counts 2)."""
        return self.rule.cost(self.model, self.sizes)

    def check_point(self, values: dict[str, Any]) -> None:
        """Refuses hyperparameter values (a sweep or tuning point) that ``experiments.train``
        would refuse with them set in the config: checked here, before anything compiles."""
        self.full_hparams(values)  # an unknown name is refused naming the valid ones
        config = ml_collections.ConfigDict(self.config.to_dict())
        for key, value in values.items():
            config_lib.set_key(config, key, float(value))
        config_lib.validate(config)
        self.build_rule({**self.default_hparams, **values})

    def _check_shapes(self) -> None:
        x = self.x_train[:1]
        try:
            variables = jax.eval_shape(self.model.init, jax.random.PRNGKey(0), x)
            out = jax.eval_shape(self.model.apply, variables, x)
        except Exception as e:  # flax raises many kinds; all mean the same thing here
            raise ValueError(
                f"Model {self.model.name!r} cannot take inputs of shape {tuple(x.shape[1:])} from "
                f"dataset {self.dataset.name!r}: {type(e).__name__}: {e}"
            ) from e
        expected = (1, self.dataset.num_outputs)
        if out.shape != expected:
            raise ValueError(
                f"Model {self.model.name!r} outputs shape {out.shape[1:]} per sample but dataset "
                f"{self.dataset.name!r} needs {expected[1:]}."
            )

    # ---------------------------------------------------------------- building blocks
    def build_rule(self, hp: dict[str, Any]) -> rules.LearningRule:
        """The rule with sweepable hyperparameters taken from ``hp`` (possibly traced)."""
        opt = config_lib.section_with(self.config, "optimizer", hp)
        optimizer = optimizers.make_optimizer(
            self.config.optimizer.name, total_steps=int(self.config.steps), **opt
        )
        values = {k.split(".", 1)[1]: v for k, v in hp.items() if k.startswith("rule.")}
        return self.rule(self.model, self.task, optimizer, self.rule_data, values)

    def full_hparams(self, hparams: dict[str, Any] | None) -> dict[str, jax.Array]:
        hp = dict(self.default_hparams)
        for name, value in (hparams or {}).items():
            if name not in hp:
                raise ValueError(
                    f"Unknown hyperparameter {name!r}; sweepable ones for this config: "
                    f"{', '.join(sorted(hp)) or '(none)'}."
                )
            hp[name] = value
        return {k: jnp.asarray(v, jnp.float32) for k, v in hp.items()}

    def epoch_permutations(self, key: jax.Array, first_epoch: jax.Array, num_epochs: int):
        """Permutations of the training split for epochs first_epoch .. +num_epochs: [E, N]."""
        epochs = first_epoch + jnp.arange(num_epochs)
        return jax.vmap(
            lambda e: jax.random.permutation(jax.random.fold_in(key, e), self.num_train)
        )(epochs)

    # ---------------------------------------------------------------- the pure functions
    def init(self, key: jax.Array, hparams: dict[str, Any] | None = None) -> TrainState:
        hp = self.full_hparams(hparams)
        key_model, key_rule, key_run = jax.random.split(key, 3)
        variables = self.model.init(key_model, self.x_train[:1])
        rule_state = self.build_rule(hp).init(key_rule, variables)
        return TrainState(jnp.zeros((), jnp.int32), key_run, variables, rule_state, hp)

    def train_step(self, state: TrainState, batch: rules.base.Batch):
        """One step of the rule on ``batch``; the rule's key is fold_in(key, step)."""
        rule = self.build_rule(state.hparams)
        key_rule = prng.fold_in(prng.split(state.key)[1], state.step)
        variables, rule_state, metrics = rule.step(
            key_rule, state.variables, state.rule_state, batch
        )
        new = state._replace(step=state.step + 1, variables=variables, rule_state=rule_state)
        return new, metrics

    def train_steps(self, state: TrainState, num_steps: int):
        """``num_steps`` steps in one ``lax.scan``; returns per-step metrics [num_steps].

        The batch of step t is slice t % steps_per_epoch of the permutation of epoch
        t // steps_per_epoch. Each epoch's permutation is drawn once per chunk, up front (a
        sort per step would cost more than a small model's step).
        """
        batch_of = self._batches(state, num_steps)
        return jax.lax.scan(
            lambda s, _: self.train_step(s, batch_of(s.step)), state, None, num_steps
        )

    def _batches(self, state: TrainState, max_steps: int) -> Callable[[jax.Array], Any]:
        """``step -> batch`` for the next ``max_steps`` steps from ``state``: the batch of step t
        is slice t % steps_per_epoch of the permutation of epoch t // steps_per_epoch. Each
        epoch's permutation is drawn once, up front (a sort per step would cost more than a
        small model's step)."""
        spe = self.steps_per_epoch
        first_epoch = state.step // spe
        perms = self.epoch_permutations(
            jax.random.split(state.key)[0], first_epoch, max_steps // spe + 2
        )

        def batch_of(step: jax.Array):
            epoch, pos = jnp.divmod(step, spe)
            perm = jax.lax.dynamic_index_in_dim(perms, epoch - first_epoch, keepdims=False)
            idx = jax.lax.dynamic_slice_in_dim(perm, pos * self.batch_size, self.batch_size)
            return self.x_train[idx], self.y_train[idx]

        return batch_of

    def train_interval(self, state: TrainState, num_steps: jax.Array, max_steps: int):
        """The same steps as ``train_steps(state, num_steps)`` for a TRACED ``num_steps`` (at
        most ``max_steps``), in one loop whose step is traced once; returns the state and the
        interval's figures: ``train_loss_running`` (the mean batch loss) and the rule's per-step
        metrics averaged over the steps that report them (``rule/<name>``; NaN for none)."""
        batch_of = self._batches(state, max_steps)
        shapes = jax.eval_shape(lambda s: self.train_step(s, batch_of(s.step))[1], state)
        zeros = {k: jnp.zeros((), _floating(v).dtype) for k, v in shapes.items()}

        def body(_, carry):
            s, sums, counts = carry
            s, metrics = self.train_step(s, batch_of(s.step))
            metrics = {k: _floating(v) for k, v in metrics.items()}
            known = {k: ~jnp.isnan(v) for k, v in metrics.items()}
            sums = {k: sums[k] + jnp.where(known[k], v, 0) for k, v in metrics.items()}
            counts = {k: counts[k] + known[k] for k in counts}
            return s, sums, counts

        state, sums, counts = jax.lax.fori_loop(0, num_steps, body, (state, zeros, zeros))
        means = {k: sums[k] / counts[k] for k in sums}  # 0 / 0: NaN, no step reported it
        out = {"train_loss_running": means.pop("loss")}
        return state, {**out, **{f"rule/{k}": v for k, v in means.items()}}

    def evaluate_split(self, variables: Any, split: str) -> dict[str, jax.Array]:
        """Mean loss (and accuracy) over a whole split, in chunks of ``eval_batch_size``."""
        return rules.base.split_figures(self.model, self.task, variables, self.splits[split])

    def diagnostics(self, state: TrainState) -> dict[str, jax.Array]:
        """Rule diagnostics on a fixed probe batch (the first ``batch_size`` training samples).

        - ``grad_cosine`` and ``grad_cosine/<layer>``: cosine similarity between a
          gradient-like rule's estimate and the true backprop gradient of the noise-free loss.
        - ``input_correlation/<layer>``: mean |off-diagonal correlation| of each decorrelated
          layer's input (what decorrelation drives towards zero).
        """
        out = {}
        batch = (self.x_train[: self.batch_size], self.y_train[: self.batch_size])
        variables = state.variables
        rule = self.build_rule(state.hparams)
        if rule.estimate is not None:
            key = jax.random.fold_in(jax.random.split(state.key, 3)[2], state.step)
            estimate, _, _ = rule.estimate(key, variables, state.rule_state, batch)
            true = jax.grad(rules.params_loss(self.model, self.task, variables, batch))(
                variables["params"]
            )
            flat = lambda t: jnp.concatenate([jnp.ravel(a) for a in jax.tree.leaves(t)])
            out["grad_cosine"] = _cosine(flat(estimate), flat(true))
            for name in true:
                out[f"grad_cosine/{name}"] = _cosine(flat(estimate[name]), flat(true[name]))
        if "decorrelation" in variables:
            _, inputs = rules.batch_loss(self.model, self.task, variables, batch)
            for name, z in inputs.items():
                out[f"input_correlation/{name}"] = mean_offdiagonal_correlation(z)
        return out

    def evaluate(self, state: TrainState) -> dict[str, jax.Array]:
        """``{split}_{metric}`` for every non-empty split (train, val, test), diagnostics, and
        the rule's own ``report`` as ``rule/<name>``."""
        out = {}
        for split in self.splits:
            for name, value in self.evaluate_split(state.variables, split).items():
                out[f"{split}_{name}"] = value
        rule = self.build_rule(state.hparams)
        if rule.report is not None:
            report = rule.report(state.variables, state.rule_state, self.splits)
            out.update({f"rule/{name}": value for name, value in report.items()})
        return {**out, **self.diagnostics(state)}


def configure_jax(config: ml_collections.ConfigDict) -> bool:
    """Turns JAX's 64-bit mode on when the config's rule solves in float64 (its
    ``RuleSpec.wants_x64``, e.g. closed_form) and the backend has float64 (not a TPU). Call it
    before anything is built; binaries do. Other rules' arrays keep their float32 dtypes.
    Returns whether 64-bit is on."""
    wanted = rules.resolve(config.rule).wants_x64
    if wanted and jax.default_backend() != "tpu" and not jax.config.jax_enable_x64:
        jax.config.update("jax_enable_x64", True)
    return bool(jax.config.jax_enable_x64)


def _floating(values: Any) -> Any:
    """``values`` as floats: an integer or boolean metric becomes float32 (NaN marks a step
    without it), a float keeps its precision."""
    if jnp.issubdtype(values.dtype, jnp.floating):
        return values
    if isinstance(values, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(values.shape, jnp.float32)
    return values.astype(jnp.float32)


def eval_steps(steps: int, eval_every: int, eval_at: Sequence[int] | None = None) -> list[int]:
    """The steps a run is evaluated at: ``eval_at`` (or every ``eval_every``-th step), with 0
    and ``steps`` always included, sorted; a step outside [0, steps] is an error."""
    if eval_at is None:
        eval_at = range(0, steps, max(1, eval_every))
    at = sorted({0, steps, *(int(t) for t in eval_at)})
    if at[0] < 0 or at[-1] > steps:
        raise ValueError(f"Evaluation steps must lie in [0, {steps}]; got {at[0]}..{at[-1]}.")
    return at


def make_train(
    config: ml_collections.ConfigDict,
    eval_at: Sequence[int] | None = None,
    dataset: data_lib.Dataset | None = None,
    observe: Callable[[TrainState], dict[str, jax.Array]] | None = None,
    model: models.Model | None = None,
):
    """Returns ``train(key, hparams=None) -> (final TrainState, curves)`` for ``config.steps``
    steps, evaluated at step 0, every ``config.eval_every`` steps and at the end (or at the
    steps of ``eval_at``): the module docstring lists the figures; ``observe(state)`` adds
    figures of your own (the parameters, say); ``dataset`` and ``model`` replace the config's.
    Jit it; vmap it over keys and hyperparameters.
    ``train.experiment`` is the ``Experiment``, ``train.eval_steps`` the evaluation steps.
    """
    experiment = Experiment(config, dataset, model)
    steps = int(config.steps)
    at = eval_steps(steps, int(config.eval_every), eval_at)
    intervals = jnp.asarray([0, *np.diff(at).tolist()], jnp.int32)  # steps before each

    def train(key: jax.Array, hparams: dict[str, Any] | None = None):
        state = experiment.init(key, hparams)

        # ONE SCAN OVER THE EVALUATIONS: the steps up to each (none before step 0), then every
        # figure; the step and the evaluation are each traced once.
        def body(s: TrainState, num_steps: jax.Array):
            s, figures = experiment.train_interval(s, num_steps, int(np.max(np.diff(at))))
            figures = {"step": s.step, **experiment.evaluate(s), **figures}
            return s, {**figures, **(observe(s) if observe is not None else {})}

        return jax.lax.scan(body, state, intervals)

    train.experiment = experiment
    train.eval_steps = at
    return train
