"""kv_cache_in_place: a Relax function's concatenated KV cache → a cache the function writes in place.

Matches: a Relax function (the Relax route's `prefill` or `decode`, targets/relax.py) whose parameters
`first … first+count-1` are the past keys and values `[1, G, P, D]` (one symbolic past length P for all), each read
only by `concat((past_i, new), axis=2)` (HF's DynamicCache.update), whose result is read only as K or V (arguments 1
and 2) by call_tir of PrimFuncs marked `aqlm.kv_capacity` (kernels/attention.py: K/V of any capacity C, the keys that
count set by the mask) and by the function's output tuple `(logits, *present)`.
Emits: the function `(…inputs before first, past_length: R.Shape([P]), *cache_i [1, G, C, D], …the rest) → logits`
(one capacity symbol C for all caches), each concat → `call_tir_inplace(kv_append, (cache_i, new, P), [0])`: the new
rows written at P … P+S-1 of the caller's buffer, which the same attention calls then read. The function carries
`aqlm.kv_cache = "in_place"` and the caches are outputs no more.
Why: the concatenation allocated and copied each layer's whole cache twice per step (SmolLM2: 60 calls of ≈ 5.6 µs
at 64 cached tokens, instrumented, and growing with the context), and the runtime then unpacked 60 present tensors
from the result; in place, a step writes only its own rows (docs/tvm-and-ort-notes.md N31).
Where: after import in targets/relax.py `relax_decoder_module` (CPU targets, whose attention is kernels/attention.py);
the runtimes (runtime/tvm_runtime.py, targets/runner/aqlm_vm_run.cc) allocate the caches and grow them, from the
manifest's `tvm.kv_cache`. Returns None, the function untouched, when the graph is not of that form (another
reader of a past tensor or of its concatenation): the route then keeps the concatenation.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable

import tvm
from tvm import relax, tirx

IN_PLACE = "in_place"


def _is_axis2_concat(value, past_var) -> bool:
    if not isinstance(value, relax.Call) or value.op != tvm.ir.Op.get("relax.concat"):
        return False
    fields = value.args[0]
    if not isinstance(fields, relax.Tuple) or len(fields.fields) != 2 or not fields.fields[0].same_as(past_var):
        return False
    return int(value.attrs.axis) in (2, -2)


def kv_cache_in_place(mod: tvm.IRModule, name: str, first: int, count: int,
                      append_kernel: Callable[[int, int], tirx.PrimFunc]) -> tvm.IRModule | None:
    """`mod` with function `name` rewritten (see the module docstring), or None where it does not match.
    `append_kernel(G, D)` builds the PrimFunc that writes the new rows (kernels/attention.py `kv_append`)."""
    func = mod[name]
    params = list(func.params)
    past = params[first:first + count]
    if len(past) != count or count == 0 or not isinstance(func.body, relax.SeqExpr):
        return None
    if not all(isinstance(p.ty, relax.TensorType) and p.ty.dtype == "float32" for p in past):
        return None  # kv_append writes fp32
    shapes = [p.ty.shape for p in past]
    if any(s is None or len(s) != 4 or not all(isinstance(s[i], tvm.tirx.IntImm) for i in (0, 1, 3)) or
           int(s[0]) != 1 for s in shapes):
        return None  # [1, G, P, D] with G and D known
    past_len = shapes[0][2]
    if not isinstance(past_len, tirx.Var) or any(not s[2].same_as(past_len) for s in shapes):
        return None
    bindings = [b for block in func.body.blocks for b in block.bindings]
    users = defaultdict(list)
    for b in bindings:
        for v in relax.analysis.free_vars(b.value):
            users[v].append(b)
    out_var = func.body.body
    out_binding = next((b for b in bindings if b.var.same_as(out_var)), None)
    if out_binding is None or not isinstance(out_binding.value, relax.Tuple) or \
            len(out_binding.value.fields) != 1 + count:
        return None  # (logits, *present): the presents are what the rewrite drops

    def reads_capacity(b, var) -> bool:  # an attention call reading `var` as K or V only
        value = b.value
        if not isinstance(value, relax.Call) or value.op != tvm.ir.Op.get("relax.call_tir"):
            return False
        callee = mod[value.args[0]]
        args = value.args[1].fields
        return bool(callee.attrs and callee.attrs.get("aqlm.kv_capacity")) and \
            all(i in (1, 2) for i, a in enumerate(args) if a.same_as(var))

    concat_of = {}  # concat binding var → past index
    for i, p in enumerate(past):
        readers = users.get(p, [])
        if len(readers) != 1 or not _is_axis2_concat(readers[0].value, p):
            return None
        cat = readers[0]
        if not all(b is out_binding or reads_capacity(b, cat.var) for b in users.get(cat.var, [])):
            return None
        if not out_binding.value.fields[1 + i].same_as(cat.var):
            return None  # present i is not this concatenation
        concat_of[cat.var] = i

    capacity = tirx.Var("kv_capacity", "int64")
    length_param = relax.Var("past_length", relax.ShapeType([past_len]))
    caches = [relax.Var(f"cache_{i}", relax.TensorType([1, s[1], capacity, s[3]], "float32"))
              for i, s in enumerate(shapes)]
    kernels = {}  # (G, D) → (symbol, PrimFunc)
    for s in shapes:
        key = (int(s[1]), int(s[3]))
        if key not in kernels:
            symbol = f"{name}_kv_append_{key[0]}x{key[1]}"
            kernels[key] = (symbol, append_kernel(*key).with_attr("global_symbol", symbol)
                            .with_attr("tirx.is_scheduled", True))
    gvars = {}

    @relax.expr_functor.mutator
    class Rewrite(relax.PyExprMutator):
        def visit_var_binding_(self, binding):
            if binding.var in concat_of:
                i = concat_of[binding.var]
                new = self.visit_expr(binding.value.args[0].fields[1])
                key = (int(shapes[i][1]), int(shapes[i][3]))
                call = relax.call_tir_inplace(gvars[key], [caches[i], new, relax.prim_value(past_len)], [0],
                                              caches[i].ty)
                self.set_var_remap(binding.var, self.builder_.emit(call, name_hint=f"cache_{i}_written"))
            elif binding is out_binding or binding.var.same_as(out_var):
                logits = self.visit_expr(binding.value.fields[0])
                self.set_var_remap(binding.var, self.builder_.emit_output(logits, name_hint="logits"))
            else:
                super().visit_var_binding_(binding)

    rewrite = Rewrite(mod)
    for key, (symbol, prim) in kernels.items():
        gvars[key] = rewrite.builder_.add_func(prim, symbol)
    body = rewrite.visit_expr(func.body)
    out = rewrite.builder_.get()
    new_params = params[:first] + [length_param] + caches + params[first + count:]
    attrs = dict(func.attrs) if func.attrs else {}
    if "num_input" in attrs:
        attrs["num_input"] = first + 1 + count
    attrs["aqlm.kv_cache"] = IN_PLACE
    new_func = relax.Function(new_params, body, None, func.is_pure, tvm.ir.make_node("ir.DictAttrs", **attrs))
    out[out.get_global_var(name)] = new_func
    out = relax.transform.Normalize()(out)
    return out
