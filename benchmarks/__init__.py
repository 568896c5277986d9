"""altlearn's benchmark binaries, all on one harness (``benchmarks.harness``).

    python -m benchmarks.overhead      altlearn's backprop step against a hand-written optax loop
    python -m benchmarks.rules         every learning rule's step time against backprop's, with
                                       its arithmetic floor, for one seed or many
    python -m benchmarks.noise         what a perturbation-noise entry costs, by generator
    python -m benchmarks.evolution     the evolution rule: overhead against raw evosax, speed,
                                       memory
    python -m benchmarks.pso           the pso rule against pyswarms (``test`` or ``bench`` extra)
                                       and against a raw evosax PSO loop
    python -m benchmarks.closed_form   the cost of a closed_form alternation and its parts

docs/BENCHMARKS.md holds the measured figures and what each binary compares.
"""
