"""The channel rules of `passes.prune.channel_graph`, one mixin of `_Builder` per op family.

Each `rule_<kind>(node, view, shape)` records how one op ties channels (slots, links, a
`Rule` for apply) or raises `_Pin`; they share the builder's slot helpers (`passthrough`,
`single_input`, `slot_on`, `link`, ...), defined in `channel_graph`.
"""
