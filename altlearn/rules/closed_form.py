"""Closed-form alternating layer solves for two-layer ReLU networks.

Paper 002 (A. Barbu, "Training a two layer ReLU network analytically", arXiv 2304.02972) finds
the critical point of the square loss analytically for one layer while the other layer AND the
neuron activation pattern are fixed, and alternates; its claim is a significantly smaller
training loss than SGD and Adam on four of five real datasets, faster, with virtually no tuning.
The paper's full derivation was not available to us; the one below is ours. For
f(x) = V^T sigma(W x_bar) + c with x_bar = [x, 1], sigma(u) = u s(u), s(u) = 1 if u > 0 else
alpha, and the square loss, each layer's critical point is a least-squares solution once the
other layer and the activation pattern S_ij = s(w_j . x_bar_i) are fixed. One step of the rule
is one alternation:

1. Output step (W fixed): [V; c] = (H_bar^T H_bar + lambda I)^{-1} H_bar^T Y with
   H_bar = [sigma(X_bar W^T), 1] (ridge least squares; multi-output Y column-wise).
2. Hidden step (V, c and S fixed): f_k(x_i) = sum_j V_jk S_ij w_j . x_bar_i + c_k is linear in
   vec(W). The normal matrix is built from its block structure,

       A[(j, p), (j', q)] = M_jj' sum_i S_ij S_ij' x_bar_ip x_bar_iq,   M = V V^T,

   i.e. A = (U^T U) o (M kron 1) with U_i = S_i kron x_bar_i (n x h(d+1)), accumulated over
   chunks of samples (the normal equations are sums over samples), never from the n K x h(d+1)
   design matrix; b = vec((S o ((Y - c) V^T))^T X_bar). Solved by Cholesky.
3. Acceptance (our decision: recomputing the pattern after a hidden step can raise the loss):
   re-solve the output layer for W_t = W + t (W_new - W) and accept the first t in 1, 1/2,
   1/4, ... (``max_backtracks`` halvings) whose loss does not exceed the loss before the hidden
   step; if none does, W stays (step length 0). The loss sequence is therefore non-increasing.

Decisions where the paper is silent:

* Ridge: lambda = ``ridge`` x mean diagonal of the normal matrix (relative, default 1e-8), never
  below 100 machine epsilons of the solve dtype (2e-14 in float64; 1.2e-5 in float32, where
  measured on digits width 32 a floor of 1e-6 made every hidden Cholesky fail and every step be
  rejected, 1e-5 let every step through). The hidden step's ridge pulls towards the current
  W, not towards 0 (min ||D w - r||^2 + lambda ||w - w_old||^2): a ReLU unit that no sample
  activates has an all-zero block, and a ridge towards 0 would set its weights to 0 and kill
  it for good.
* Precision: ``dtype='auto'`` solves in float64 when JAX's 64-bit mode is on and the backend is
  not a TPU, float32 otherwise (with a warning). The experiment binaries turn 64-bit mode on for
  this rule (``altlearn.train.configure_jax``). The rule keeps a master copy of the parameters in
  the solve dtype in its state, so the guarantee of step 3 holds exactly; the model's float32
  parameters are that copy rounded (a copy changed from outside the rule is picked up).
* Classification: one-hot targets with the square loss (``loss=squared_error``).
* Full batch by design: the rule solves on the batch it is given; its configs set
  ``batch_size`` above the training-set size. On a minibatch it is a stochastic alternation.

Metrics per step: ``loss`` (before the step), ``loss_output_solved`` (after step 1),
``loss_after`` (after step 3), ``accepted`` (1 if the full step t = 1 was taken),
``step_length`` (t, 0 when rejected), ``backtracks`` (halvings tried).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from absl import logging

from altlearn.losses import Task
from altlearn.models import Model
from altlearn.rules.base import (
    Batch,
    LearningRule,
    Metrics,
    RuleSpec,
    Sizes,
    Splits,
    Variables,
    never,
)

DTYPES = ("auto", "float64", "float32")
SUPPORTED_ACTIVATIONS = ("relu", "leaky_relu")


class ClosedFormState(NamedTuple):
    hidden: jax.Array  # W_bar [h, d+1] in the solve dtype (master copy)
    output: jax.Array  # [V; c] [h+1, K] in the solve dtype (master copy)
    count: jax.Array  # int32 [], alternations taken


def solve_dtype(dtype: str) -> jnp.dtype:
    """The dtype the solves use for the ``dtype`` option (see the module docstring)."""
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r} for closed_form; valid choices: {DTYPES}.")
    x64 = bool(jax.config.jax_enable_x64)
    tpu = jax.default_backend() == "tpu"
    if dtype == "float32":
        return jnp.float32
    if dtype == "float64":
        if not x64 or tpu:
            raise ValueError(
                "closed_form dtype='float64' needs JAX's 64-bit mode on a CPU or GPU backend "
                f"(jax_enable_x64={x64}, backend={jax.default_backend()}). Call "
                "jax.config.update('jax_enable_x64', True) before building anything (the "
                "experiment binaries do), or use dtype='auto' / 'float32'."
            )
        return jnp.float64
    return jnp.float64 if x64 and not tpu else jnp.float32


def ridge_of(diag_mean: jax.Array, ridge: Any, dtype) -> jax.Array:
    """lambda = max(ridge, 100 eps) x mean diagonal (a tiny floor keeps an all-zero matrix PD)."""
    rel = jnp.maximum(jnp.asarray(ridge, dtype), 100 * jnp.finfo(dtype).eps)
    return rel * jnp.maximum(diag_mean, jnp.finfo(dtype).tiny) + jnp.finfo(dtype).tiny


def cholesky_solve(a: jax.Array, b: jax.Array) -> jax.Array:
    """x = a^{-1} b for a symmetric positive definite ``a`` (NaN if it is not)."""
    factor = jax.scipy.linalg.cho_factor(a, lower=True)
    return jax.scipy.linalg.cho_solve(factor, b)


def with_bias(x: jax.Array) -> jax.Array:
    return jnp.concatenate([x, jnp.ones((*x.shape[:-1], 1), x.dtype)], axis=-1)


def output_solve(
    features: jax.Array, targets: jax.Array, ridge: Any, mask: jax.Array | None = None
) -> jax.Array:
    """Ridge least squares [V; c] = argmin ||H_bar [V; c] - Y||^2 + lambda ||[V; c]||^2.

    ``features`` H [n, h], ``targets`` Y [n, K]; ``mask`` [n] (1 = real sample) zeroes padding.
    """
    hb = with_bias(features)
    if mask is not None:
        hb = hb * mask[:, None]
    gram = hb.T @ hb
    lam = ridge_of(jnp.trace(gram) / gram.shape[0], ridge, gram.dtype)
    return cholesky_solve(gram + lam * jnp.eye(gram.shape[0], dtype=gram.dtype), hb.T @ targets)


def pattern(pre: jax.Array, alpha: Any) -> jax.Array:
    """s(u): 1 where u > 0, alpha elsewhere."""
    return jnp.where(pre > 0, jnp.ones((), pre.dtype), jnp.asarray(alpha, pre.dtype))


def sample_chunk_size(
    h: int, d1: int, itemsize: int, chunk_size: int, memory_budget_mb: int
) -> int:
    """Samples per accumulation chunk: ``chunk_size``, or the most whose slice of U
    (chunk x h(d+1)) fits in ``memory_budget_mb``."""
    if chunk_size:
        return int(chunk_size)
    return max(1, int(memory_budget_mb * 2**20 // (h * d1 * itemsize)))


def hidden_normal_equations(
    xb: jax.Array,
    s: jax.Array,
    residual: jax.Array,
    v: jax.Array,
    chunk_size: int,
) -> tuple[jax.Array, jax.Array]:
    """(A [h(d+1), h(d+1)], b [h(d+1)]) of the hidden step, summed over chunks of samples.

    ``xb`` X_bar [n, d+1] (padding rows all zero), ``s`` the pattern [n, h], ``residual``
    Y - c [n, K], ``v`` [h, K]. Peak memory: one chunk of U (chunk_size x h(d+1)) plus A.
    """
    n, d1 = xb.shape
    h = s.shape[1]
    size = h * d1
    chunks = -(-n // chunk_size)
    pad = chunks * chunk_size - n
    if pad:
        xb = jnp.concatenate([xb, jnp.zeros((pad, d1), xb.dtype)])
        s = jnp.concatenate([s, jnp.zeros((pad, h), s.dtype)])
    xs = xb.reshape(chunks, chunk_size, d1)
    ss = s.reshape(chunks, chunk_size, h)

    def add(gram, chunk):
        x_c, s_c = chunk
        u = (s_c[:, :, None] * x_c[:, None, :]).reshape(chunk_size, size)
        return gram + u.T @ u, None

    gram, _ = jax.lax.scan(add, jnp.zeros((size, size), xb.dtype), (xs, ss))
    m = v @ v.T  # [h, h]
    a = (gram.reshape(h, d1, h, d1) * m[:, None, :, None]).reshape(size, size)
    weighted = s[:n] * (residual @ v.T)  # [n, h]
    b = (weighted.T @ xb[:n]).reshape(size)
    return a, b


def hidden_solve(a: jax.Array, b: jax.Array, w_old: jax.Array, ridge: Any) -> jax.Array:
    """argmin ||D w - r||^2 + lambda ||w - w_old||^2 from the normal equations (A, b)."""
    lam = ridge_of(jnp.trace(a) / a.shape[0], ridge, a.dtype)
    flat = cholesky_solve(a + lam * jnp.eye(a.shape[0], dtype=a.dtype), b + lam * w_old.ravel())
    return flat.reshape(w_old.shape)


def square_loss(prediction: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean over samples of 0.5 ||f(x) - y||^2 (the task's squared_error, batch-averaged)."""
    return 0.5 * jnp.sum(jnp.square(prediction - targets)) / targets.shape[0]


def closed_form(
    model: Model,
    task: Task,
    optimizer: optax.GradientTransformation,
    data: Splits,
    ridge: float = 1e-8,
    max_backtracks: int = 10,
    dtype: str = "auto",
    chunk_size: int = 0,
    memory_budget_mb: int = 512,
) -> LearningRule:
    """Alternating closed-form layer solves (paper 002) for a two-layer dense ReLU/leaky model.

    Options: ``ridge`` (relative ridge of both solves), ``max_backtracks`` (halvings of a hidden
    step before it is rejected), ``dtype`` ('auto', 'float64', 'float32': the solve dtype),
    ``chunk_size`` (samples per accumulation chunk of the hidden normal matrix; 0 picks the
    largest that keeps one chunk of U within ``memory_budget_mb``). The optimizer is unused.
    """
    del optimizer, data
    _check_model(model, task)
    if int(max_backtracks) < 0:
        raise ValueError(f"max_backtracks must be >= 0, got {max_backtracks}.")
    if int(chunk_size) < 0 or int(memory_budget_mb) < 1:
        raise ValueError(
            f"chunk_size must be >= 0 and memory_budget_mb >= 1, got {chunk_size} and "
            f"{memory_budget_mb}."
        )
    dt = solve_dtype(dtype)
    if dtype == "auto" and dt == jnp.float32:
        logging.log_first_n(
            logging.WARNING,
            "closed_form solves in float32 (JAX 64-bit mode is off or the backend is a TPU); "
            "the normal equations square the condition number, float64 is more accurate.",
            1,
        )
    logging.log_first_n(logging.INFO, "closed_form solves in %s.", 1, jnp.dtype(dt).name)
    alpha = model.negative_slope if model.activation == "leaky_relu" else 0.0
    num_outputs = model.layers[-1].module.features
    itemsize = jnp.dtype(dt).itemsize
    first, second = model.layer_names

    def unpack(variables: Variables) -> tuple[jax.Array, jax.Array]:
        p = variables["params"]
        hidden = jnp.concatenate([p[first]["kernel"], p[first]["bias"][None]]).T
        output = jnp.concatenate([p[second]["kernel"], p[second]["bias"][None]])
        return hidden.astype(dt), output.astype(dt)

    def pack(variables: Variables, hidden: jax.Array, output: jax.Array) -> Variables:
        p = variables["params"]
        kd, kb = p[first]["kernel"].dtype, p[second]["kernel"].dtype
        params = {
            **p,
            first: {"kernel": hidden[:, :-1].T.astype(kd), "bias": hidden[:, -1].astype(kd)},
            second: {"kernel": output[:-1].astype(kb), "bias": output[-1].astype(kb)},
        }
        return {**variables, "params": params}

    def check_sizes(hidden: jax.Array) -> int:
        h, d1 = hidden.shape
        normal_mb = (h * d1) ** 2 * itemsize / 2**20
        if normal_mb > 8 * memory_budget_mb:
            raise ValueError(
                f"closed_form: the hidden normal matrix for width {h} and {d1 - 1} inputs is "
                f"{h * d1} x {h * d1} ({normal_mb:,.0f} MB in {jnp.dtype(dt).name}; its "
                f"Cholesky needs about as much again), more than 8 x memory_budget_mb = "
                f"{8 * memory_budget_mb} MB. Use a narrower hidden layer, fewer input features, "
                f"or raise rule.memory_budget_mb."
            )
        return sample_chunk_size(h, d1, itemsize, chunk_size, memory_budget_mb)

    def init(key: jax.Array, variables: Variables) -> ClosedFormState:
        del key
        hidden, output = unpack(variables)
        check_sizes(hidden)
        return ClosedFormState(hidden, output, jnp.zeros((), jnp.int32))

    def step(
        key: jax.Array, variables: Variables, state: ClosedFormState, batch: Batch
    ) -> tuple[Variables, ClosedFormState, Metrics]:
        del key
        x, y = batch
        n = x.shape[0]
        xb = with_bias(x.reshape(n, -1).astype(dt))
        targets = _targets(y, num_outputs, dt)
        # The master copy unless the model's parameters were changed outside the rule.
        given_hidden, given_output = unpack(variables)
        params = variables["params"]
        ours = jnp.all(
            state.hidden.astype(params[first]["kernel"].dtype).astype(dt) == given_hidden
        )
        ours &= jnp.all(
            state.output.astype(params[second]["kernel"].dtype).astype(dt) == given_output
        )
        hidden = jnp.where(ours, state.hidden, given_hidden)
        output = jnp.where(ours, state.output, given_output)
        chunk = min(check_sizes(hidden), n)

        def features(w):
            pre = xb @ w.T
            return pre * pattern(pre, alpha), pre

        def fit(w, h_w=None, pre=None):
            if h_w is None:
                h_w, pre = features(w)
            out = output_solve(h_w, targets, ridge)
            return square_loss(with_bias(h_w) @ out, targets), out, pre

        h0, pre_h0 = features(hidden)
        loss_before = square_loss(with_bias(h0) @ output, targets)
        loss0, output0, pre0 = fit(hidden, h0, pre_h0)
        v, c = output0[:-1], output0[-1]
        a, b = hidden_normal_equations(xb, pattern(pre0, alpha), targets - c, v, chunk)
        proposal = hidden_solve(a, b, hidden, ridge)

        def trial(carry):
            t, tries, _, _, _ = carry
            w = hidden + t * (proposal - hidden)
            loss_t, out_t, _ = fit(w)
            ok = loss_t <= loss0  # False for NaN: a failed solve is never accepted
            return jnp.where(ok, t, t / 2), tries + 1, ok, loss_t, out_t

        def searching(carry):
            _, tries, ok, _, _ = carry
            return (~ok) & (tries <= max_backtracks)

        t, tries, ok, loss_t, output_t = jax.lax.while_loop(
            searching,
            trial,
            (jnp.ones((), dt), jnp.zeros((), jnp.int32), jnp.zeros((), bool), loss0, output0),
        )
        step_length = jnp.where(ok, t, 0.0)
        new_hidden = jnp.where(ok, hidden + t * (proposal - hidden), hidden)
        new_output = jnp.where(ok, output_t, output0)
        loss_after = jnp.where(ok, loss_t, loss0)
        metrics = {
            "loss": loss_before.astype(jnp.float32),
            "loss_output_solved": loss0.astype(jnp.float32),
            "loss_after": loss_after.astype(jnp.float32),
            "accepted": (ok & (t == 1)).astype(jnp.float32),
            "step_length": step_length.astype(jnp.float32),
            "backtracks": jnp.maximum(tries - 1, 0).astype(jnp.float32),
        }
        new_state = ClosedFormState(new_hidden, new_output, state.count + 1)
        return pack(variables, new_hidden, new_output), new_state, metrics

    return LearningRule(init, step)


def _targets(y: jax.Array, num_outputs: int, dt) -> jax.Array:
    """One-hot for integer labels, [n, K] for regression targets."""
    if jnp.issubdtype(y.dtype, jnp.integer):
        return jax.nn.one_hot(y, num_outputs, dtype=dt)
    return y.reshape(y.shape[0], num_outputs).astype(dt)


def _check_model(model: Model, task: Task) -> None:
    supported = (
        "closed_form supports two-layer dense models (model mlp with widths=(h,), activation "
        "relu or leaky_relu with any negative_slope, no decorrelation or intrinsic noise) with "
        "the square loss (loss=squared_error; one-hot targets for classification)"
    )
    activation = getattr(model, "activation", None)
    problems = []
    if getattr(model, "name", None) != "mlp" or not model.layered:
        problems.append(f"model is {model.name!r}")
    elif model.num_layers != 2:
        problems.append(f"the mlp has {model.num_layers - 1} hidden layers")
    elif activation not in SUPPORTED_ACTIVATIONS:
        problems.append(f"hidden activation is {activation!r}")
    elif model.decorrelation or model.intrinsic_noise:
        problems.append("the model has decorrelation or intrinsic noise")
    if task.loss_name != "squared_error":
        problems.append(f"loss is {task.loss_name!r}")
    if problems:
        raise ValueError(f"{supported}; here {', '.join(problems)}.")


def cost(model: Model, options: dict[str, Any], sizes: Sizes) -> float:
    """An alternation in forward-pass equivalents, by FLOPs: the hidden normal matrix
    (2 n (h(d+1))^2), two output solves' Gram matrices (2 n (h+1)^2 each) and two forward passes
    (2 n (d h + h K) each), over one forward pass; a line-search trial adds an output solve and
    a forward pass, and the Cholesky ((h(d+1))^3 / 3, independent of n) is not counted."""
    del options, sizes
    d = math.prod(model.input_shape or (0,))
    h = int(model.layers[0].module.features)
    k = int(model.layers[-1].module.features)
    forward = d * h + h * k
    return 2.0 + ((h * (d + 1)) ** 2 + 2 * (h + 1) ** 2) / max(forward, 1)


SPEC = RuleSpec(
    closed_form,
    summary="two-layer ReLU/leaky MLP, square loss: alternating closed-form solves of the "
    "output layer (ridge) and the hidden layer (activation pattern frozen, block-structured "
    "normal equations, Cholesky), backtracked so the loss never rises; float64, full batch",
    source="paper 002 (Barbu, arXiv 2304.02972)",
    cost=cost,
    needs=("layered",),
    wants_x64=lambda options: options.get("dtype", "auto") != "float32",
    uses_optimizer=never,
    search=("ridge=[1e-10,1e-4]",),
)

__all__ = [
    "ClosedFormState",
    "closed_form",
    "hidden_normal_equations",
    "hidden_solve",
    "output_solve",
    "sample_chunk_size",
    "solve_dtype",
]
