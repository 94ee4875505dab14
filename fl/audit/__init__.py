"""Empirical leakage audits of a trained model: membership inference and canary exposure.

These measure what an attacker holding the final model can learn; they complement, and never
replace, the formal (epsilon, delta) guarantees of ``fl.privacy``.
"""
