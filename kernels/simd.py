"""The CPU instructions the kernels need that Numba's vectoriser never emits, as Numba intrinsics.

Numba has no vector type, so here a vector is a Numba type whose value *is* an LLVM vector (<32 x i8>,
<8 x float>, ...): a kernel can keep one in a local variable -- an accumulator that stays in a register
across loop iterations -- and pass it to functions that each become one or a few instructions:

    acc = fzeros(8)                                       # 8 float32 lanes
    for b in range(blocks):
        p = dot_s8(izeros(8), load(w, 32 * b, 32), load(xq, 32 * b, 32))   # 32 int8 x int8 -> 8 int32
        acc = fma(to_float(p), splat(scale[b], 8), acc)
    total = hsum(acc)

Vectors of 256 bits run on AVX2, of 512 bits on AVX-512; the width comes from the arguments, so one
kernel source serves both (its `lanes` argument is a compile-time literal). What each intrinsic computes,
and how (`lanes` = elements of the result):

    load(arr, off, n)        arr[off : off + n] as a vector (any alignment, no bounds check);
                             store(arr, off, v)
    splat(x, n), fzeros(n), izeros(n), splat_at(arr, off, n) (= splat(arr[off], n), as one vbroadcastss)
    bf16_pair(arr, off)      8 uint32 words, each holding two bf16, as two float32 vectors: the low halves
                             (word << 16) and the high halves (word & 0xffff0000): no shuffle
    nibbles(arr, off, n)     n 4-bit values from n/2 bytes: low nibbles, then high nibbles (GGML order)
    field(v, shift, mask)    (v >> shift) & mask, bytewise: nibbles and 2-bit fields of packed bytes
    join(low, high, shift)   low | high << shift, bytewise
    pair_splat(arr, off, n)  lane i = arr[off + i // (n/2)]: two scales, each over half of the lanes
    fp16s(arr, off, stride)  8 fp16 numbers at bytes off, off + stride, ... as float32
                             (8 loads, one vcvtph2ps)
    dot_u8s8(acc, u, s)      acc[i] + sum_{j<4} u[4i+j] s[4i+j], u unsigned, s signed bytes:
                             vpmaddubsw + vpmaddwd(ones) + vpaddd;  vpdpbusd with AVX512-VNNI
    dot_s8(acc, a, b)        the same for two signed operands: |a| and b * sign(a) first (llama.cpp's
                             trick: vpmaddubsw takes one unsigned operand); a, b in [-127, 127]
    to_float, fma, hsum      int32 -> float32 lanes; a * b + c; the sum of the lanes; a + b, a * b lanewise
    prefetch(arr, off)       prefetcht0 of arr[off]'s cache line (never faults)

A kernel whose instructions the compile target lacks does not raise: LLVM aborts the process ("Do not know
how to split the result of this operator"). So every intrinsic checks the target's features while it is
typed (`require`) and raises a Numba typing error instead; and kernels/isa.py imports the kernels of the
chosen instruction set only. The plain fallback of every intrinsic is the plain Numba loop each fast kernel
replaces (kernels/ggml.py, matmul.py), which tests compare against.
"""
import operator

from llvmlite import ir
from numba import types
from numba.core import cgutils, errors
from numba.core.registry import cpu_target
from numba.extending import intrinsic, models, overload, register_model


class Vector(types.Type):
    """<lanes x kind>, kind one of i8 (int8 or uint8 by use), i16, i32, f32."""

    def __init__(self, kind: str, lanes: int):
        self.kind, self.lanes = kind, lanes
        super().__init__(name=f"{kind}x{lanes}")

    @property
    def llvm(self):
        element = {"i8": ir.IntType(8), "i16": ir.IntType(16), "i32": ir.IntType(32),
                   "f32": ir.FloatType()}[self.kind]
        return ir.VectorType(element, self.lanes)


@register_model(Vector)
class _VectorModel(models.PrimitiveModel):  # the value is the LLVM vector itself: lives in a register
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, fe_type.llvm)


def target_features() -> set[str]:
    """The features Numba compiles for: the host's, or NUMBA_CPU_NAME / NUMBA_CPU_FEATURES'."""
    codegen = cpu_target.target_context.codegen()
    return {f[1:] for f in codegen._tm_features.split(",") if f.startswith("+")}


def require(*features: str):
    """Raise (at typing, in Python) unless the compile target has these features."""
    missing = set(features) - target_features()
    if missing:
        raise errors.TypingError(f"the compile target lacks {', '.join(sorted(missing))}")


def _call(builder, name, ret, args):
    """call @name(args): an LLVM intrinsic, declared in the module on first use"""
    fnty = ir.FunctionType(ret, [a.type for a in args])
    return builder.call(cgutils.get_or_insert_function(builder.module, fnty, name), args)


def _address(context, builder, array_type, array, off_type, off, pointee):
    data = context.make_array(array_type)(context, builder, array).data
    offset = context.cast(builder, off, off_type, types.intp)
    return builder.bitcast(builder.gep(data, [offset]), pointee.as_pointer())


def _constant(vector, value):
    return ir.Constant(vector, [ir.Constant(vector.element, value)] * vector.count)


def _lanes(n) -> int:
    if not isinstance(n, types.IntegerLiteral):
        raise errors.TypingError("the lane count must be a compile-time constant")
    return n.literal_value


def _vector_for(width_bits: int, kind: str, lanes: int) -> Vector:
    require(*(("avx512f", "avx512bw") if width_bits == 512 else ("avx2", "fma")))
    return Vector(kind, lanes)


@intrinsic
def load(typingctx, arr, off, n):
    kind = {1: "i8", 2: "i16",
            4: "i32" if isinstance(arr.dtype, types.Integer) else "f32"}[arr.dtype.bitwidth // 8]
    v = _vector_for(_lanes(n) * arr.dtype.bitwidth, kind, _lanes(n))

    def codegen(context, builder, sig, args):
        return builder.load(_address(context, builder, sig.args[0], args[0], sig.args[1], args[1], v.llvm),
                            align=1)
    return v(arr, off, n), codegen


@intrinsic
def store(typingctx, arr, off, v):
    if not isinstance(v, Vector):
        return None

    def codegen(context, builder, sig, args):
        builder.store(args[2], _address(context, builder, sig.args[0], args[0], sig.args[1], args[1], v.llvm),
                      align=1)
        return context.get_dummy_value()
    return types.none(arr, off, v), codegen


@intrinsic
def splat_at(typingctx, arr, off, n):
    v = _vector_for(32 * _lanes(n), "f32", _lanes(n))

    def codegen(context, builder, sig, args):
        address = _address(context, builder, sig.args[0], args[0], sig.args[1], args[1], ir.FloatType())
        one = builder.load(address, align=4)
        first = builder.insert_element(ir.Constant(v.llvm, ir.Undefined), one, ir.Constant(ir.IntType(32), 0))
        return builder.shuffle_vector(first, ir.Constant(v.llvm, ir.Undefined),
                                      ir.Constant(ir.VectorType(ir.IntType(32), v.lanes), None))
    return v(arr, off, n), codegen


@intrinsic
def bf16_pair(typingctx, arr, off):
    f32x8 = _vector_for(256, "f32", 8)
    pair = types.UniTuple(f32x8, 2)

    def codegen(context, builder, sig, args):
        i32x8 = ir.VectorType(ir.IntType(32), 8)
        address = _address(context, builder, sig.args[0], args[0], sig.args[1], args[1], i32x8)
        words = builder.load(address, align=4)
        low = builder.bitcast(builder.shl(words, _constant(i32x8, 16)), f32x8.llvm)
        high = builder.bitcast(builder.and_(words, _constant(i32x8, -65536)), f32x8.llvm)
        return context.make_tuple(builder, pair, [low, high])
    return pair(arr, off), codegen


@intrinsic
def splat(typingctx, x, n):
    v = _vector_for(32 * _lanes(n), "f32", _lanes(n))

    def codegen(context, builder, sig, args):
        scalar = context.cast(builder, args[0], sig.args[0], types.float32)
        one = builder.insert_element(ir.Constant(v.llvm, ir.Undefined), scalar,
                                     ir.Constant(ir.IntType(32), 0))
        return builder.shuffle_vector(one, ir.Constant(v.llvm, ir.Undefined), ir.Constant(
            ir.VectorType(ir.IntType(32), v.lanes), None))
    return v(x, n), codegen


def _zeros(kind):
    @intrinsic
    def zeros(typingctx, n):
        v = _vector_for(32 * _lanes(n), kind, _lanes(n))
        return v(n), lambda context, builder, sig, args: ir.Constant(v.llvm, None)
    return zeros


fzeros, izeros = _zeros("f32"), _zeros("i32")


@intrinsic
def nibbles(typingctx, arr, off, n):
    v = _vector_for(8 * _lanes(n), "i8", _lanes(n))

    def codegen(context, builder, sig, args):
        half = ir.VectorType(ir.IntType(8), v.lanes // 2)
        packed = builder.load(_address(context, builder, sig.args[0], args[0], sig.args[1], args[1], half),
                              align=1)
        both = builder.shuffle_vector(packed, packed, ir.Constant(ir.VectorType(ir.IntType(32), v.lanes),
                                                                  list(range(v.lanes // 2)) * 2))
        shift = ir.Constant(v.llvm, [ir.Constant(ir.IntType(8), 0 if i < v.lanes // 2 else 4)
                                     for i in range(v.lanes)])
        return builder.and_(builder.lshr(both, shift), _constant(v.llvm, 15))
    return v(arr, off, n), codegen


@intrinsic
def field(typingctx, v, shift, mask):
    if not (isinstance(v, Vector) and v.kind == "i8"):
        return None

    def codegen(context, builder, sig, args):
        shift_, mask_ = (builder.trunc(a, ir.IntType(8)) for a in args[1:])
        undefined = ir.Constant(v.llvm, ir.Undefined)
        splats = [builder.shuffle_vector(builder.insert_element(undefined, a, ir.Constant(ir.IntType(32), 0)),
                                         undefined, ir.Constant(ir.VectorType(ir.IntType(32), v.lanes), None))
                  for a in (shift_, mask_)]
        return builder.and_(builder.lshr(args[0], splats[0]), splats[1])
    return v(v, shift, mask), codegen


@intrinsic
def join(typingctx, low, high, shift):
    if not (isinstance(low, Vector) and low.kind == "i8" and low == high
            and isinstance(shift, types.IntegerLiteral)):
        return None

    def codegen(context, builder, sig, args):
        return builder.or_(args[0], builder.shl(args[1], _constant(low.llvm, shift.literal_value)))
    return low(low, high, shift), codegen


@intrinsic
def pair_splat(typingctx, arr, off, n):
    v = _vector_for(32 * _lanes(n), "f32", _lanes(n))

    def codegen(context, builder, sig, args):
        two = builder.load(_address(context, builder, sig.args[0], args[0], sig.args[1], args[1],
                                    ir.VectorType(ir.FloatType(), 2)), align=4)
        half = v.lanes // 2
        return builder.shuffle_vector(two, two, ir.Constant(ir.VectorType(ir.IntType(32), v.lanes),
                                                            [0] * half + [1] * half))
    return v(arr, off, n), codegen


@intrinsic
def fp16s(typingctx, arr, off, stride):
    v = _vector_for(256, "f32", 8)

    def codegen(context, builder, sig, args):
        halves = ir.Constant(ir.VectorType(ir.IntType(16), 8), ir.Undefined)
        for i in range(8):
            at = builder.add(args[1], builder.mul(args[2], context.get_constant(sig.args[2], i)))
            half = builder.load(_address(context, builder, sig.args[0], args[0], sig.args[1], at,
                                         ir.IntType(16)), align=1)
            halves = builder.insert_element(halves, half, ir.Constant(ir.IntType(32), i))
        return builder.fpext(builder.bitcast(halves, ir.VectorType(ir.HalfType(), 8)), v.llvm)
    return v(arr, off, stride), codegen


def _pairs_of_pairs(builder, u, s, acc):
    """acc + sum of 4 consecutive u8 * s8 products per int32 lane (pmaddubsw, pmaddwd with ones)"""
    wide = u.type.count == 64
    i16, i32 = ir.VectorType(ir.IntType(16), u.type.count // 2), acc.type
    pairs = _call(builder, "llvm.x86.avx512.pmaddubs.w.512" if wide else "llvm.x86.avx2.pmadd.ub.sw", i16,
                  [u, s])
    quads = _call(builder, "llvm.x86.avx512.pmaddw.d.512" if wide else "llvm.x86.avx2.pmadd.wd", i32,
                  [pairs, _constant(i16, 1)])
    return builder.add(acc, quads)


def _dot_u8s8_ir(context, builder, acc, u, s):
    features = target_features()
    if u.type.count == 64 and "avx512vnni" in features:  # one instruction: vpdpbusd
        return _call(builder, "llvm.x86.avx512.vpdpbusd.512", acc.type, [acc, u, s])
    if u.type.count == 32 and ({"avx512vnni", "avx512vl"} <= features or "avxvnni" in features):
        return _call(builder, "llvm.x86.avx512.vpdpbusd.256", acc.type, [acc, u, s])
    return _pairs_of_pairs(builder, u, s, acc)


@intrinsic
def dot_u8s8(typingctx, acc, u, s):
    if not (isinstance(acc, Vector) and acc.kind == "i32" and u == s and u.kind == "i8"
            and u.lanes == 4 * acc.lanes):
        return None
    return acc(acc, u, s), lambda context, builder, sig, args: _dot_u8s8_ir(context, builder, *args)


@intrinsic
def dot_s8(typingctx, acc, a, b):
    if not (isinstance(acc, Vector) and acc.kind == "i32" and a == b and a.kind == "i8"
            and a.lanes == 4 * acc.lanes):
        return None

    def codegen(context, builder, sig, args):
        acc_, a_, b_ = args
        negative = builder.icmp_signed("<", a_, _constant(a_.type, 0))
        magnitude = builder.select(negative, builder.neg(a_), a_)  # |a| as unsigned (a != -128)
        signed_b = builder.select(negative, builder.neg(b_), b_)  # b * sign(a)
        return _dot_u8s8_ir(context, builder, acc_, magnitude, signed_b)
    return acc(acc, a, b), codegen


@intrinsic
def to_float(typingctx, v):
    if not (isinstance(v, Vector) and v.kind == "i32"):
        return None
    f = Vector("f32", v.lanes)
    return f(v), lambda context, builder, sig, args: builder.sitofp(args[0], f.llvm)


@intrinsic
def fma(typingctx, a, b, c):
    if not (isinstance(a, Vector) and a.kind == "f32" and a == b == c):
        return None
    return a(a, b, c), lambda context, builder, sig, args: _call(
        builder, f"llvm.fma.v{a.lanes}f32", a.llvm, list(args))


@intrinsic
def _add(typingctx, a, b):
    def codegen(context, builder, sig, args):
        return (builder.fadd if a.kind == "f32" else builder.add)(*args)
    return a(a, b), codegen


@intrinsic
def _multiply(typingctx, a, b):
    def codegen(context, builder, sig, args):
        return (builder.fmul if a.kind == "f32" else builder.mul)(*args)
    return a(a, b), codegen


@overload(operator.add)
def _vector_add(a, b):
    if isinstance(a, Vector) and a == b:
        return lambda a, b: _add(a, b)
    return None


@overload(operator.mul)
def _vector_multiply(a, b):
    if isinstance(a, Vector) and a == b:
        return lambda a, b: _multiply(a, b)
    return None


@intrinsic
def hsum(typingctx, v):
    """the sum of the lanes, in a fixed order (halves added until one lane is left)"""
    if not (isinstance(v, Vector) and v.kind == "f32"):
        return None

    def codegen(context, builder, sig, args):
        x = args[0]
        while x.type.count > 1:
            n = x.type.count // 2
            lo, hi = (builder.shuffle_vector(x, x, ir.Constant(ir.VectorType(ir.IntType(32), n),
                                                               list(range(s, s + n))))
                      for s in (0, n))
            x = builder.fadd(lo, hi)
        return builder.extract_element(x, ir.Constant(ir.IntType(32), 0))
    return types.float32(v), codegen


@intrinsic
def prefetch(typingctx, arr, off):
    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        pointer = _address(context, builder, sig.args[0], args[0], sig.args[1], args[1], ir.IntType(8))
        # llvm.prefetch(address, read, keep in all levels, data cache)
        _call(builder, "llvm.prefetch.p0", ir.VoidType(), [pointer, ir.Constant(i32, 0), ir.Constant(i32, 3),
                                                          ir.Constant(i32, 1)])
        return context.get_dummy_value()
    return types.none(arr, off), codegen
