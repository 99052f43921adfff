"""Structured channel pruning: channel graph (networkx), min-cut selection and boundaries,
importance, physical removal. The pass is `prune_pass.Prune`; see docs/pruning.md."""
