"""Smoke test of the overhead benchmark (experiments/bench.py) on a tiny config.

Timings are not asserted against the 1.10 target here (too flaky in a test); the benchmark
binary reports it.
"""

import json
import math

import jax

from altlearn.config import base_config
from experiments import bench


def test_measure_writes_well_formed_json(tmp_path):
    config = base_config(data="digits")
    config.model.widths = (32,)
    config.batch_size = 32
    result = bench.measure(config, chunk_steps=20, repeats=2, matmul_size=128)
    path = bench.write_json(result, tmp_path / "overhead.json")
    out = json.loads(path.read_text())

    for name in ("altlearn", "hand"):
        loop = out[name]
        assert len(loop["chunk_times_s"]) == 2
        assert all(t > 0 for t in loop["chunk_times_s"])
        for key in ("compile_s", "median_chunk_s", "step_us", "gflops", "fraction_of_peak"):
            assert loop[key] > 0 and math.isfinite(loop[key]), (name, key, loop[key])
        assert math.isfinite(loop["loss_last_50_steps"])
    assert out["ratio_altlearn_over_hand"] > 0 and math.isfinite(out["ratio_altlearn_over_hand"])
    assert isinstance(out["target_met"], bool)
    assert out["flops_per_step"] > 0 and out["matmul_peak"]["gflops"] > 0
    assert out["config"]["layer_sizes"] == [64, 32, 10]
    assert out["config"]["batch_size"] == 32
    assert out["num_params"] == 64 * 32 + 32 + 32 * 10 + 10
    assert out["machine"]["backend"] == jax.default_backend()
    assert "| altlearn |" in bench.markdown_table(out)
