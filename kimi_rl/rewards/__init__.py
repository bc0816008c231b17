"""Rewards: correctness verifiers and the Kimi length penalty (SPEC.md section 2)."""
