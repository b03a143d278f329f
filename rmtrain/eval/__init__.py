"""Evaluation people can trust: model-free metrics over per-pair scores, plots and a report.

Everything here works on scores that were already computed (by ``rmtrain score`` or any other
tool), so the numbers can be recomputed, audited and unit-tested without loading a model.
``metrics`` needs only numpy; ``plots`` imports matplotlib lazily, inside its functions.
"""
