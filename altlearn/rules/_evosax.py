"""The evosax strategies by name, checked and built: shared by the rules that run one
(``evolution`` over the whole params pytree, ``hybrid`` in its evolution phases).

A strategy is named as evosax names it (``STRATEGIES``); ``check_strategy_options`` validates
the constructor arguments and ``Params`` fields a user gives, ``build_strategy`` constructs it
(refusing num_dims x num_dims strategies above a size), ``strong`` keeps a strategy state's
dtypes fixed for a ``lax.scan`` carry.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from typing import Any

import jax
import jax.numpy as jnp
from evosax.algorithms import algorithms as EVOSAX_ALGORITHMS

STRATEGIES: dict[str, type] = dict(sorted(EVOSAX_ALGORITHMS.items(), key=lambda kv: kv[0].lower()))
QUADRATIC_MEMORY = (
    "ASEBO",
    "CMA_ES",
    "DiffusionEvolution",
    "MA_ES",
    "SV_CMA_ES",
    "iAMaLGaM_Full",
    "xNES",
)
LOW_MEMORY_ALTERNATIVES = ("Sep_CMA_ES", "SNES", "Open_ES", "PGPE")
SET_BY_RULE = ("self", "population_size", "solution")  # constructor arguments the rule fills


def strong(tree: Any) -> Any:
    """``tree`` without weak types: evosax states mix Python scalars (weakly typed) with arrays,
    and the state must keep one type from ``init`` on (a ``lax.scan`` carry, one jit trace)."""
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.result_type(a)), tree)


def strategy_class(name: str) -> type:
    if name not in STRATEGIES:
        raise ValueError(
            f"Unknown evosax strategy {name!r}; valid choices: {', '.join(STRATEGIES)}."
        )
    return STRATEGIES[name]


def constructor_args(cls: type) -> dict[str, inspect.Parameter]:
    """The constructor arguments a user may set through ``strategy_kwargs``."""
    params = inspect.signature(cls.__init__).parameters
    return {k: p for k, p in params.items() if k not in SET_BY_RULE}


def param_fields(cls: type) -> tuple[str, ...]:
    """Field names of the strategy's ``Params`` dataclass (what ``default_params`` holds)."""
    return tuple(f.name for f in dataclasses.fields(sys.modules[cls.__module__].Params))


def is_float(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, float):
        return True
    return getattr(value, "ndim", None) == 0 and jnp.issubdtype(value.dtype, jnp.floating)


def check_strategy_options(
    name: str, kwargs: dict[str, Any], params: dict[str, Any]
) -> tuple[type, bool]:
    """Validates names; returns the class and whether ``std_init`` sets its ``std_schedule``."""
    cls = strategy_class(name)
    valid = constructor_args(cls)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(
            f"Unknown strategy_kwargs {unknown} for {name}({cls.__name__}); valid constructor "
            f"arguments: {', '.join(valid)} (population_size and solution are set by the rule)."
        )
    missing = [
        k
        for k, p in valid.items()
        if p.default is inspect.Parameter.empty and k not in kwargs and p.kind != p.VAR_KEYWORD
    ]
    if missing:
        raise ValueError(f"Strategy {name} needs strategy_kwargs {missing} (no default).")
    std_schedule = "std_schedule" in valid
    fields = param_fields(cls)
    allowed = (*fields, "std_init") if std_schedule else fields
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        hint = " (std_init sets the constant std_schedule)" if std_schedule else ""
        raise ValueError(
            f"Unknown strategy_params {unknown} for {name}; valid fields: "
            f"{', '.join(dict.fromkeys(allowed)) or '(none)'}{hint}."
        )
    if std_schedule and "std_init" in params and "std_schedule" in kwargs:
        raise ValueError(
            f"Give {name} either strategy_params.std_init or strategy_kwargs.std_schedule."
        )
    return cls, std_schedule


def build_strategy(
    name: str,
    cls: type,
    population_size: int,
    solution: Any,
    kwargs: dict[str, Any],
    max_cma_dims: int,
) -> Any:
    num_dims = sum(int(leaf.size) for leaf in jax.tree.leaves(solution))
    quadratic = name in QUADRATIC_MEMORY and not (
        name == "DiffusionEvolution" and kwargs.get("num_latent_dims")
    )
    if quadratic and num_dims > max_cma_dims:
        raise ValueError(
            f"Strategy {name} stores a num_dims x num_dims matrix ({num_dims}^2 = "
            f"{num_dims**2:.3g} entries, {4 * num_dims**2 / 2**30:.3g} GiB) but max_cma_dims is "
            f"{max_cma_dims}. Use a diagonal or low-rank strategy "
            f"({', '.join(LOW_MEMORY_ALTERNATIVES)}) or raise rule.max_cma_dims."
        )
    try:
        return cls(population_size=population_size, solution=solution, **kwargs)
    except AssertionError as e:  # evosax checks its size constraints with asserts
        raise ValueError(
            f"Strategy {name} cannot run with population_size={population_size}: {e}"
        ) from None
