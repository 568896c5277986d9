"""altlearn's benchmark binaries, all on one harness (``benchmarks.harness``).

    python -m benchmarks.overhead      altlearn's backprop step against a hand-written optax loop
    python -m benchmarks.rules         every learning rule's step time against backprop's
    python -m benchmarks.evolution     the evolution rule: overhead against raw evosax, speed,
                                       memory
    python -m benchmarks.pso           the pso rule against pyswarms (``test`` or ``bench`` extra)
    python -m benchmarks.closed_form   the cost of a closed_form alternation and its parts

docs/BENCHMARKS.md holds the measured figures and what each binary compares.
"""
