"""Smoke test of the closed_form benchmark (experiments/bench_closed_form.py) at a tiny size.

Growth exponents are not checked against the expected ones here (tiny sizes measure dispatch,
not arithmetic); the benchmark binary reports them.
"""

import json
import math

import jax
import pytest

from experiments import bench_closed_form as bench

TINY = dict(d=5, num_outputs=3, teacher_width=4)


def _positive(value) -> bool:
    return value > 0 and math.isfinite(value)


def test_measure_writes_well_formed_results(tmp_path):
    with jax.enable_x64(True):
        result = bench.measure(
            sizes=(64, 128), width=4, widths=(4, 8), n_fixed=64, repeats=3, matmul_size=32, **TINY
        )
        json_path, md_path = bench.write_outputs(result, tmp_path / "closed_form")
        out = json.loads(json_path.read_text())
        points = [*out["grids"]["n"]["points"], *out["grids"]["h"]["points"]]
        assert [(p["n"], p["h"]) for p in out["grids"]["n"]["points"]] == [(64, 4), (128, 4)]
        assert [(p["n"], p["h"]) for p in out["grids"]["h"]["points"]] == [(64, 4), (64, 8)]
        for p in points:
            assert p["dtype"] == "float64"
            assert p["normal_matrix_size"] == p["h"] * (TINY["d"] + 1)
            assert p["num_chunks"] == 1  # the rule's default budget fits the whole batch
            for name in ("step", *bench.COMPONENTS):
                assert len(p["times_s"][name]) == 3
                assert all(_positive(t) for t in p["times_s"][name]), (name, p["times_s"][name])
                assert _positive(p["median_s"][name]) and _positive(p["compile_s"][name])
            for name in ("normal_matrix", "cholesky_solve"):
                assert _positive(p["flops"][name]) and _positive(p["gflops"][name])
            assert p["flops"]["normal_matrix"] == 2.0 * p["n"] * p["normal_matrix_size"] ** 2
            fractions = p["fractions_of_step"]
            assert set(fractions) == {*bench.COMPONENTS, "other"}
            assert all(f >= 0 and math.isfinite(f) for f in fractions.values()), fractions
            # No bound on their sum: at sub-millisecond sizes each part timed apart carries its
            # own dispatch cost, so the sum is timing noise there, not a property to test.
            assert p["line_search"]["trials"] >= 1
            assert math.isfinite(p["loss"]) and p["loss_after"] <= p["loss"] * (1 + 1e-5)
        for variable in ("n", "h"):
            for name in ("step", *bench.COMPONENTS):
                exponent = out["growth_exponents"][variable][name]
                assert math.isfinite(exponent["fitted"]) and len(exponent["local"]) == 1
        assert _positive(out["float64_matmul_peak"]["gflops"])
        assert out["machine"]["backend"] == jax.default_backend()
        md = md_path.read_text()
        assert "| 128 | 4 | 24 |" in md and "Growth exponents" in md and "Machine:" in md


def test_measure_needs_64_bit_mode():
    with jax.enable_x64(False), pytest.raises(ValueError, match="64-bit"):
        bench.measure_point(16, 2, repeats=1, **TINY)
