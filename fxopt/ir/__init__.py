"""IR helpers shared by every pass: the semantic op view, parameter handles, rewrites, running."""
from .bindings import ATEN_OP, EagerCall, aten_op_of, call_through_binding, eager_call, op_name
from .effects import (aliases_of, drop_fresh_copies, fresh_literal_constants, functionalize_writes, is_effectful,
                      mutated_input, reads_memory_order, written_base, written_in_place)
from .interpret import BufferState, flatten_inputs, fresh_inputs, node_values, run_graph, same_random_draws
from .leaf import leaf_function
from .packed import split_packed_parameters
from .splits import splits_as_slices
from .opview import (OpSpec, OpView, SPECS, bind_arguments, metadata_read, names_a_dtype, op_view, size_read,
                     spec_for, transposed_parameter, written_arguments)
from .params import (
    ParamRef,
    add_tensor_attr,
    attribute_use_counts,
    delete_unused_attributes,
    delete_unused_submodules,
    get_attr_value,
    ref_for_get_attr,
    resolve_attr,
)
from .rewrite import (
    COMPUTES,
    PRIVATE_OF,
    clone_sharing_tensors,
    contiguous_outputs,
    deep_copy,
    downstream,
    drop_empty_cat_inputs,
    is_shared,
    call_as,
    make_private,
    meta_value,
    module_path,
    origin,
    replace_uses,
    symbolic_sizes,
    tensor_meta,
    tensor_versions,
    unpack_tuples,
    upstream,
    value_nbytes,
    weight_matmuls_as_linear,
)

__all__ = [
    "ATEN_OP", "BufferState", "aliases_of", "EagerCall", "aten_op_of", "call_through_binding", "eager_call",
    "COMPUTES", "PRIVATE_OF", "OpSpec", "OpView", "ParamRef", "SPECS", "add_tensor_attr", "attribute_use_counts",
    "bind_arguments", "call_as", "clone_sharing_tensors", "contiguous_outputs", "deep_copy", "delete_unused_attributes",
    "delete_unused_submodules", "downstream",
    "drop_empty_cat_inputs", "drop_fresh_copies", "fresh_literal_constants",
    "flatten_inputs", "functionalize_writes", "get_attr_value", "is_effectful", "is_shared", "leaf_function",
    "make_private", "meta_value", "metadata_read", "module_path", "mutated_input", "names_a_dtype", "reads_memory_order", "written_base", "node_values", "op_name", "op_view", "origin", "ref_for_get_attr", "replace_uses",
    "fresh_inputs", "resolve_attr", "run_graph", "same_random_draws", "size_read", "spec_for", "split_packed_parameters", "splits_as_slices", "symbolic_sizes", "tensor_meta", "tensor_versions",
    "transposed_parameter", "unpack_tuples", "upstream",
    "value_nbytes", "weight_matmuls_as_linear", "written_arguments", "written_in_place",
]
