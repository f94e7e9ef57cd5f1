"""The CPU instructions the kernels need that Numba's vectoriser never emits, as Numba intrinsics.

Numba has no vector type, so here a vector is a Numba type whose value *is* an LLVM vector (<32 x i8>,
<8 x float>, ...): a kernel can keep one in a local variable -- an accumulator that stays in a register
across loop iterations -- and pass it to functions that each become one or a few instructions:

    acc = fzeros(8)                                       # 8 float32 lanes
    for b in range(blocks):
        p = dot_s16(izeros(8), load(w, 16 * b, 16), load(xq, 16 * b, 16))   # 16 int16 x int16 -> 8 int32
        acc = fma(to_float(p), splat(scale[b], 8), acc)
    total = hsum(acc)

Vectors of 256 bits run on AVX2, of 512 bits on AVX-512; the width comes from the arguments, so one
kernel source serves both (its `lanes` argument is a compile-time literal). What each intrinsic computes,
and how (`lanes` = elements of the result):

    load(arr, off, n)        arr[off : off + n] as a vector (any alignment, unchecked); store(arr, off, v)
    splat(x, n), fzeros(n), izeros(n), splat_at(arr, off, n) (= splat(arr[off], n), as one vbroadcastss)
    splat32(arr, off, n)     the int16 pair or byte quad at arr[off:] in every 32-bit lane (n lanes of arr's)
    fp16_splat(arr, off, n)  the fp16 at bytes arr[off : off + 2] as n float32 lanes (vpbroadcastw +
                             vcvtph2ps: no partial register write to tie it to earlier work)
    u32_at(arr, off)         the little-endian uint32 at bytes arr[off : off + 4] (a scalar)
    bytes_of(w0, w1)         the 8 bytes of two 32-bit words as a vector (w0's low byte first)
    bytes_to_float(v, signed)  byte lanes -> float32 lanes (vpmovzxbd / vpmovsxbd + vcvtdq2ps)
    lane(v, j), quads(v, j)  v[j] in every lane; v[j + i // 4] in lane i of each 8-lane half, from the
                             half's own lanes (one vpermps each)
    words(arr, off, stride, n)  n 16-bit lanes of the bytes at arr[off:], for n = 32 the second 16 from
                             arr[off + stride:]
    bit_words(arr, off, value)  the 16 bits of the uint16 at bytes arr[off : off + 2] as 16 int16 lanes:
                             `value` where the bit is set, 0 elsewhere (bit i -> lane i)
    field(v, shift, mask)    (v >> shift) & mask, per byte or 16-bit lane: nibbles and 2-bit fields
    widen16(arr, off, signed)  the 16 bytes at arr[off] as 16-bit lanes (one vpmovzxbw / vpmovsxbw)
    as_bytes(v)              int16 lanes' bits as byte lanes (each lane's low byte first)
    join(low, high, shift)   low | high << shift, per byte or 16-bit lane
    lookup16(table, index)   table[index] per 16-bit lane (index 0..15): a 16-entry codebook in a register
                             (one vpshufb). The table is 16 unsigned bytes repeated in each 128-bit half
                             of a byte vector, and its entry 0 must be 0: a lane's high byte, 0, looks it up
    dot_s16(acc, a, b)       acc[i] + a[2i] b[2i] + a[2i+1] b[2i+1], int16 lanes summed in int32:
                             vpmaddwd + vpaddd;  vpdpwssd where the path has VNNI (isa.VNNI_BITS)
    dot_u8s8(acc, a, b)      acc[i] + sum_j<4 a[4i+j] b[4i+j], a's bytes unsigned, b's signed, in int32:
                             vpdpbusd, on the widths isa.VNNI_BITS has (vpmaddubsw, its stand-in, saturates)
    dot_bf16(acc, a, b)      acc[i] + a[2i] b[2i] + a[2i+1] b[2i+1], bf16 lanes (their bits), in float32:
                             vdpbf16ps (AVX512-BF16: subnormal inputs and results flush to zero)
    round16(v)               float32 lanes -> the nearest integers (ties to even: vcvtps2dq) as int16 lanes
    to_float, fma, hsum      int32 -> float32 lanes; a * b + c; the sum of the lanes; a + b adds lanes, a * b
                             multiplies float lanes (floats as written: ORDERED), v - c subtracts a constant
    abs_max(v)               the largest |lane|
    transpose32(dst, o, src, o2, stride, n)  an n x n block of 32-bit words transposed (n = 8 or 16)
    prefetch(arr, off)       prefetcht0 of arr[off]'s cache line (never faults)
    AMX (tile numbers t, a, b, c: compile-time constants; each tile 16 rows of 64 bytes, as TILES sets them):
    tiles(on)                ldtilecfg TILES (True) / tilerelease (False): this thread's tiles
    tile_load(t, arr, off, stride), tile_store(...), tile_zero(c)   tileloadd / tilestored: tile t's row r is
                             the 64 bytes at arr[off + r stride:]; tilezero
    tile_dot_bf16(c, a, b)   tdpbf16ps: c[m, n] += sum_j a[m, 2j] b[j, 2n] + a[m, 2j + 1] b[j, 2n + 1] (bf16)

A kernel whose instructions the compile target lacks does not raise: LLVM aborts the process ("Do not know
how to split the result of this operator"). So every intrinsic checks the target's features while it is
typed (`require`) and raises a Numba typing error instead; and kernels/linear.py imports only the kernels
of the path kernels/isa.py chose. Which instructions a path uses is isa.py's to say (here: whether a dot
product is one vpdpwssd). The plain fallback of every intrinsic is the plain Numba loop each fast kernel
replaces (kernels/ggml.py, matmul.py), which tests compare against.
"""
import operator

from llvmlite import ir
from numba import types
from numba.core import cgutils, errors
from numba.extending import intrinsic, models, overload, register_model

from . import isa

ORDERED = ("nnan", "ninf", "nsz", "arcp", "afn")  # fastmath's flags but reassoc and contract: see _lanewise


class Vector(types.Type):
    """<lanes x kind>, kind one of i8 (int8 or uint8 by use), i16, i32, f32."""

    def __init__(self, kind: str, lanes: int):
        self.kind, self.lanes = kind, lanes
        super().__init__(name=f"{kind}x{lanes}")

    @property
    def llvm(self):
        element = ir.FloatType() if self.kind == "f32" else ir.IntType(int(self.kind[1:]))  # iN: N bits
        return ir.VectorType(element, self.lanes)


@register_model(Vector)
class _VectorModel(models.PrimitiveModel):  # the value is the LLVM vector itself: lives in a register
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, fe_type.llvm)


def require(*features: str):
    """Raise (at typing, in Python) unless the compile target has these features."""
    missing = set(features) - isa.FEATURES
    if missing:
        raise errors.TypingError(f"the compile target lacks {', '.join(sorted(missing))}")


def _call(builder, name, ret, args):
    """call @name(args): an LLVM intrinsic, declared in the module on first use"""
    fnty = ir.FunctionType(ret, [a.type for a in args])
    return builder.call(cgutils.get_or_insert_function(builder.module, fnty, name), args)


def _address(context, builder, sig, args, pointee, i=0, offset=None):
    """a pointee* to element args[i + 1] (or the intp offset given) of the array args[i]"""
    data = context.make_array(sig.args[i])(context, builder, args[i]).data
    if offset is None:
        offset = context.cast(builder, args[i + 1], sig.args[i + 1], types.intp)
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


def _broadcast(builder, scalar, vector_type):
    """scalar in every lane of vector_type (insert + all-zero shuffle: one vpbroadcast)"""
    undefined = ir.Constant(vector_type, ir.Undefined)
    one = builder.insert_element(undefined, scalar, ir.Constant(ir.IntType(32), 0))
    all_first = ir.Constant(ir.VectorType(ir.IntType(32), vector_type.count), None)
    return builder.shuffle_vector(one, undefined, all_first)


@intrinsic
def load(typingctx, arr, off, n):
    kind = {1: "i8", 2: "i16",
            4: "i32" if isinstance(arr.dtype, types.Integer) else "f32"}[arr.dtype.bitwidth // 8]
    v = _vector_for(_lanes(n) * arr.dtype.bitwidth, kind, _lanes(n))
    def codegen(context, builder, sig, args):
        return builder.load(_address(context, builder, sig, args, v.llvm), align=1)
    return v(arr, off, n), codegen


@intrinsic
def store(typingctx, arr, off, v):  # int16 lanes into a byte array: their low bytes (int8 activations)
    if not isinstance(v, Vector):
        return None
    stored = Vector("i8", v.lanes) if v.kind == "i16" and arr.dtype.bitwidth == 8 else v
    def codegen(context, builder, sig, args):
        value = builder.trunc(args[2], stored.llvm) if stored is not v else args[2]
        builder.store(value, _address(context, builder, sig, args, stored.llvm), align=1)
        return context.get_dummy_value()
    return types.none(arr, off, v), codegen


@intrinsic
def splat_at(typingctx, arr, off, n):
    v = _vector_for(32 * _lanes(n), "f32", _lanes(n))
    def codegen(context, builder, sig, args):
        scalar = builder.load(_address(context, builder, sig, args, ir.FloatType()), align=4)
        return _broadcast(builder, scalar, v.llvm)
    return v(arr, off, n), codegen


@intrinsic
def fp16_splat(typingctx, arr, off, n):
    v = _vector_for(32 * _lanes(n), "f32", _lanes(n))
    require("f16c")
    def codegen(context, builder, sig, args):
        bits = builder.load(_address(context, builder, sig, args, ir.IntType(16)), align=1)
        halves = builder.bitcast(_broadcast(builder, bits, ir.VectorType(ir.IntType(16), v.lanes)),
                                 ir.VectorType(ir.HalfType(), v.lanes))
        return builder.fpext(halves, v.llvm)
    return v(arr, off, n), codegen


@intrinsic
def u32_at(typingctx, arr, off):
    def codegen(context, builder, sig, args):
        return builder.load(_address(context, builder, sig, args, ir.IntType(32)), align=1)
    return types.uint32(arr, off), codegen


@intrinsic
def bytes_of(typingctx, w0, w1):
    if not (isinstance(w0, types.Integer) and isinstance(w1, types.Integer)):
        return None
    v = _vector_for(64, "i8", 8)
    def codegen(context, builder, sig, args):
        words = ir.Constant(ir.VectorType(ir.IntType(32), 2), ir.Undefined)
        for i, (word, word_type) in enumerate(zip(args, sig.args)):
            word = context.cast(builder, word, word_type, types.uint32)
            words = builder.insert_element(words, word, ir.Constant(ir.IntType(32), i))
        return builder.bitcast(words, v.llvm)
    return v(w0, w1), codegen


@intrinsic
def bytes_to_float(typingctx, v, signed):
    if not (isinstance(v, Vector) and v.kind == "i8" and isinstance(signed, types.BooleanLiteral)):
        return None
    f = _vector_for(32 * v.lanes, "f32", v.lanes)
    def codegen(context, builder, sig, args):
        extend = builder.sext if signed.literal_value else builder.zext
        return builder.sitofp(extend(args[0], ir.VectorType(ir.IntType(32), v.lanes)), f.llvm)
    return f(v, signed), codegen


def _picker(name, pattern):  # lane i of the result is v[j + pattern(i)]: one vpermps
    def pick(typingctx, v, j):
        if not (isinstance(v, Vector) and v.kind == "f32" and v.lanes in (8, 16)
                and isinstance(j, types.Integer)):
            return None
        def codegen(context, builder, sig, args):
            index = context.cast(builder, args[1], sig.args[1], types.int32)
            i32s = ir.VectorType(ir.IntType(32), v.lanes)
            indices = builder.add(_broadcast(builder, index, i32s),
                                  ir.Constant(i32s, [pattern(i) for i in range(v.lanes)]))
            permute = "llvm.x86.avx2.permps" if v.lanes == 8 else "llvm.x86.avx512.permvar.sf.512"
            return _call(builder, permute, v.llvm, [args[0], indices])
        return v(v, j), codegen
    pick.__name__ = pick.__qualname__ = name
    return intrinsic(pick)


lane, quads = _picker("lane", lambda i: 0), _picker("quads", lambda i: i // 8 * 8 + i % 8 // 4)


@intrinsic
def words(typingctx, arr, off, stride, n):
    v = _vector_for(16 * _lanes(n), "i16", _lanes(n))
    def codegen(context, builder, sig, args):
        start = context.cast(builder, args[1], sig.args[1], types.intp)
        starts = [start, builder.add(start, context.cast(builder, args[2], sig.args[2], types.intp))]
        sixteen = ir.VectorType(ir.IntType(16), 16)
        parts = [builder.load(_address(context, builder, sig, args, sixteen, offset=at), align=1)
                 for at in starts[:v.lanes // 16]]
        return parts[0] if v.lanes == 16 else builder.shuffle_vector(
            *parts, ir.Constant(ir.VectorType(ir.IntType(32), 32), list(range(32))))
    return v(arr, off, stride, n), codegen


@intrinsic
def splat32(typingctx, arr, off, n):  # one vpbroadcastd: a dot_s16, dot_u8s8 or dot_bf16 operand
    if arr.dtype.bitwidth not in (8, 16):
        return None
    v = _vector_for(arr.dtype.bitwidth * _lanes(n), f"i{arr.dtype.bitwidth}", _lanes(n))
    def codegen(context, builder, sig, args):
        word = builder.load(_address(context, builder, sig, args, ir.IntType(32)), align=1)
        pair = _broadcast(builder, word, ir.VectorType(ir.IntType(32), v.lanes * arr.dtype.bitwidth // 32))
        return builder.bitcast(pair, v.llvm)
    return v(arr, off, n), codegen


@intrinsic
def splat(typingctx, x, n):
    v = _vector_for(32 * _lanes(n), "f32", _lanes(n))
    def codegen(context, builder, sig, args):
        return _broadcast(builder, context.cast(builder, args[0], sig.args[0], types.float32), v.llvm)
    return v(x, n), codegen


def _zeros(kind):
    @intrinsic
    def zeros(typingctx, n):
        v = _vector_for(32 * _lanes(n), kind, _lanes(n))
        return v(n), lambda context, builder, sig, args: ir.Constant(v.llvm, None)
    return zeros


fzeros, izeros = _zeros("f32"), _zeros("i32")


@intrinsic
def bit_words(typingctx, arr, off, value):
    if not isinstance(value, types.IntegerLiteral):
        return None
    v = _vector_for(256, "i16", 16)
    def codegen(context, builder, sig, args):
        bits = builder.load(_address(context, builder, sig, args, ir.IntType(16)), align=1)
        bit = ir.Constant(v.llvm, [ir.Constant(ir.IntType(16), 1 << i) for i in range(16)])
        is_set = builder.icmp_unsigned("!=", builder.and_(_broadcast(builder, bits, v.llvm), bit),
                                       ir.Constant(v.llvm, None))
        return builder.select(is_set, _constant(v.llvm, value.literal_value), ir.Constant(v.llvm, None))
    return v(arr, off, value), codegen


@intrinsic
def field(typingctx, v, shift, mask):
    if not (isinstance(v, Vector) and v.kind in ("i8", "i16")):
        return None
    def codegen(context, builder, sig, args):
        shift_, mask_ = (_broadcast(builder, builder.trunc(a, v.llvm.element), v.llvm) for a in args[1:])
        return builder.and_(builder.lshr(args[0], shift_), mask_)
    return v(v, shift, mask), codegen


@intrinsic
def join(typingctx, low, high, shift):
    if not (isinstance(low, Vector) and low.kind in ("i8", "i16") and low == high
            and isinstance(shift, types.IntegerLiteral)):
        return None
    def codegen(context, builder, sig, args):
        return builder.or_(args[0], builder.shl(args[1], _constant(low.llvm, shift.literal_value)))
    return low(low, high, shift), codegen


@intrinsic
def lookup16(typingctx, table, index):
    if not (isinstance(table, Vector) and table.kind == "i8" and isinstance(index, Vector)
            and index.kind == "i16" and table.lanes == 2 * index.lanes):
        return None
    def codegen(context, builder, sig, args):
        name = "llvm.x86.avx512.pshuf.b.512" if table.lanes == 64 else "llvm.x86.avx2.pshuf.b"
        found = _call(builder, name, table.llvm, [args[0], builder.bitcast(args[1], table.llvm)])
        return builder.bitcast(found, index.llvm)
    return index(table, index), codegen


@intrinsic
def dot_s16(typingctx, acc, a, b):
    if not (isinstance(acc, Vector) and acc.kind == "i32" and a == b and a.kind == "i16"
            and a.lanes == 2 * acc.lanes):
        return None
    def codegen(context, builder, sig, args):
        bits = 16 * a.lanes
        if bits in isa.VNNI_BITS:  # one instruction: vpdpwssd (the path decides, not the CPU: isa.py)
            return _call(builder, f"llvm.x86.avx512.vpdpwssd.{bits}", acc.llvm, list(args))
        pairs = _call(builder, "llvm.x86.avx512.pmaddw.d.512" if a.lanes == 32 else "llvm.x86.avx2.pmadd.wd",
                      acc.llvm, list(args[1:]))
        return builder.add(args[0], pairs)
    return acc(acc, a, b), codegen


@intrinsic
def dot_u8s8(typingctx, acc, a, b):
    if not (isinstance(acc, Vector) and acc.kind == "i32" and a == b and a.kind == "i8"
            and a.lanes == 4 * acc.lanes):
        return None
    if 8 * a.lanes not in isa.VNNI_BITS:
        raise errors.TypingError(f"dot_u8s8 on {8 * a.lanes} bits needs VNNI on the {isa.ISA} path")
    return acc(acc, a, b), lambda context, builder, sig, args: _call(
        builder, f"llvm.x86.avx512.vpdpbusd.{8 * a.lanes}", acc.llvm, list(args))


@intrinsic
def dot_bf16(typingctx, acc, a, b):
    if not (isinstance(acc, Vector) and acc.kind == "f32" and a == b and a.kind == "i16"
            and a.lanes == 2 * acc.lanes):
        return None
    require("avx512bf16")
    pairs = ir.VectorType(ir.IntType(32), acc.lanes)  # older LLVM's operands; newer (22 here) upgrades them
    return acc(acc, a, b), lambda context, builder, sig, args: _call(
        builder, f"llvm.x86.avx512bf16.dpbf16ps.{32 * acc.lanes}", acc.llvm,
        [args[0], builder.bitcast(args[1], pairs), builder.bitcast(args[2], pairs)])


TILES = bytes([1] + [0] * 15 + [64, 0] * 8 + [0] * 16 + [16] * 8 + [0] * 8)  # ldtilecfg's: palette 1, 8 tiles


@intrinsic
def tiles(typingctx, on):  # ldtilecfg TILES (True) or tilerelease (False): this thread's tile state
    require("amx-tile", "amx-bf16")
    byte = ir.IntType(8)
    def codegen(context, builder, sig, args):
        if on.literal_value:
            config = cgutils.alloca_once_value(builder, ir.Constant(ir.ArrayType(byte, 64), bytearray(TILES)))
            _call(builder, "llvm.x86.ldtilecfg", ir.VoidType(), [builder.bitcast(config, byte.as_pointer())])
        else:
            _call(builder, "llvm.x86.tilerelease", ir.VoidType(), [])
        return context.get_dummy_value()
    return (types.none(on), codegen) if isinstance(on, types.BooleanLiteral) else None


def _amx(name, memory=False):  # an AMX instruction on tiles; with memory, on the tile's 16 rows at arr[off:],
    def instruction(typingctx, *operands):  # `stride` elements apart (operands: tile, arr, off, stride)
        require("amx-tile", "amx-bf16")
        tile_operands = operands[:1] if memory else operands  # numbers the instruction encodes: constants
        if not all(isinstance(t, types.IntegerLiteral) for t in tile_operands):
            raise errors.TypingError("a tile number must be a compile-time constant")
        numbers = [ir.Constant(ir.IntType(8), t.literal_value) for t in tile_operands]
        def codegen(context, builder, sig, args):
            memory_operands = []
            if memory:  # the address of arr[off], the rows' stride in bytes
                _, arr, off, stride = cgutils.unpack_tuple(builder, args[0])
                address = _address(context, builder, types.none(*operands[1:3]), [arr, off], ir.IntType(8))
                element_bytes = ir.Constant(ir.IntType(64), operands[1].dtype.bitwidth // 8)
                stride = builder.mul(context.cast(builder, stride, operands[3], types.int64), element_bytes)
                memory_operands = [address, stride]
            _call(builder, name, ir.VoidType(), numbers + memory_operands)
            return context.get_dummy_value()
        return types.none(types.StarArgTuple.from_types(operands)), codegen
    return intrinsic(instruction)


tile_zero, tile_dot_bf16 = _amx("llvm.x86.tilezero"), _amx("llvm.x86.tdpbf16ps")
tile_load, tile_store = _amx("llvm.x86.tileloadd64", True), _amx("llvm.x86.tilestored64", True)


@intrinsic
def as_bytes(typingctx, v):  # no instruction: the same bits as byte lanes
    if not (isinstance(v, Vector) and v.kind == "i16"):
        return None
    b = Vector("i8", 2 * v.lanes)
    return b(v), lambda context, builder, sig, args: builder.bitcast(args[0], b.llvm)


@intrinsic
def widen16(typingctx, arr, off, signed):
    if not isinstance(signed, types.BooleanLiteral):
        return None
    v = _vector_for(256, "i16", 16)
    def codegen(context, builder, sig, args):
        packed = builder.load(_address(context, builder, sig, args, ir.VectorType(ir.IntType(8), 16)),
                              align=1)
        return (builder.sext if signed.literal_value else builder.zext)(packed, v.llvm)
    return v(arr, off, signed), codegen


@intrinsic
def to_float(typingctx, v):
    if not (isinstance(v, Vector) and v.kind == "i32"):
        return None
    f = Vector("f32", v.lanes)
    return f(v), lambda context, builder, sig, args: builder.sitofp(args[0], f.llvm)


@intrinsic
def round16(typingctx, v):
    if not (isinstance(v, Vector) and v.kind == "f32"):
        return None
    i16 = Vector("i16", v.lanes)
    def codegen(context, builder, sig, args):
        name = "llvm.x86.avx512.mask.cvtps2dq.512" if v.lanes == 16 else "llvm.x86.avx.cvt.ps2dq.256"
        i32 = ir.VectorType(ir.IntType(32), v.lanes)
        extra = [ir.Constant(i32, None), ir.Constant(ir.IntType(16), -1), ir.Constant(ir.IntType(32), 4)]
        rounded = _call(builder, name, i32, [args[0]] + (extra if v.lanes == 16 else []))
        return builder.trunc(rounded, i16.llvm)
    return i16(v), codegen


@intrinsic
def fma(typingctx, a, b, c):
    if not (isinstance(a, Vector) and a.kind == "f32" and a == b == c):
        return None
    return a(a, b, c), lambda context, builder, sig, args: _call(
        builder, f"llvm.fma.v{a.lanes}f32", a.llvm, list(args))


@intrinsic
def _lanewise(typingctx, a, b, op):  # a + b or a * b (op "+", "*") lane by lane; float lanes with ORDERED's
    if not isinstance(op, types.StringLiteral):  # flags: fastmath's let LLVM regroup a * b * c where a
        return None  # product has one use (compiled for one token, not for four) and so round it otherwise
    def codegen(context, builder, sig, args):
        float_op = builder.fadd if op.literal_value == "+" else builder.fmul
        return float_op(*args[:2], flags=ORDERED) if a.kind == "f32" else builder.add(*args[:2])
    return a(a, b, op), codegen


@overload(operator.add)
def _vector_add(a, b):
    return (lambda a, b: _lanewise(a, b, "+")) if isinstance(a, Vector) and a == b else None


@overload(operator.mul)
def _vector_mul(a, b):
    float_lanes = isinstance(a, Vector) and a == b and a.kind == "f32"
    return (lambda a, b: _lanewise(a, b, "*")) if float_lanes else None


@intrinsic
def _sub_constant(typingctx, v, c):
    if not isinstance(c, types.IntegerLiteral):
        return None
    def codegen(context, builder, sig, args):
        return builder.sub(args[0], _constant(v.llvm, c.literal_value))
    return v(v, c), codegen


@overload(operator.sub, prefer_literal=True)
def _vector_sub(v, c):
    int_lanes = isinstance(v, Vector) and v.kind in ("i8", "i16") and isinstance(c, types.IntegerLiteral)
    return (lambda v, c: _sub_constant(v, c)) if int_lanes else None


@intrinsic
def hsum(typingctx, v):
    """the sum of the lanes, in a fixed order (halves added until one lane is left)"""
    if not (isinstance(v, Vector) and v.kind == "f32"):
        return None
    def codegen(context, builder, sig, args):
        return _halving(builder, args[0], lambda lo, hi: builder.fadd(lo, hi, flags=ORDERED))
    return types.float32(v), codegen


def _halving(builder, x, combine):
    """x's lanes folded in halves by combine(low half, high half) until one lane is left"""
    while x.type.count > 1:
        n = x.type.count // 2
        lo, hi = (builder.shuffle_vector(x, x, ir.Constant(ir.VectorType(ir.IntType(32), n),
                                                           list(range(s, s + n))))
                  for s in (0, n))
        x = combine(lo, hi)
    return builder.extract_element(x, ir.Constant(ir.IntType(32), 0))


@intrinsic
def transpose32(typingctx, dst, dst_off, src, src_off, stride, n):
    """dst[dst_off + n j + r] = src[src_off + stride r + j] for r, j < n: an n x n block of 32-bit words
    transposed in registers (log2 n rounds of vpermt2d-style shuffles: each swaps off-diagonal sub-blocks)"""
    if not (dst.dtype.bitwidth == src.dtype.bitwidth == 32 and _lanes(n) in (8, 16)):
        return None
    v = _vector_for(32 * _lanes(n), "i32", _lanes(n))
    def codegen(context, builder, sig, args):
        count = v.lanes
        first, base, step = (context.cast(builder, args[i], sig.args[i], types.intp) for i in (1, 3, 4))

        def at(i, offset):  # the vector at offset in argument i (0: dst, 2: src)
            return _address(context, builder, sig, args, v.llvm, i, offset)
        rows = [builder.load(at(2, builder.add(base, builder.mul(step, ir.Constant(step.type, r)))), align=4)
                for r in range(count)]
        h = 1
        while h < count:
            for i in (i for i in range(count) if not i & h):
                a, b = rows[i], rows[i + h]
                low = [k if not k & h else count + k - h for k in range(count)]  # a's block, then b's
                high = [k + h if not k & h else count + k for k in range(count)]
                pick = [ir.Constant(ir.VectorType(ir.IntType(32), count), m) for m in (low, high)]
                rows[i], rows[i + h] = (builder.shuffle_vector(a, b, p) for p in pick)
            h *= 2
        for j, row in enumerate(rows):
            builder.store(row, at(0, builder.add(first, ir.Constant(first.type, count * j))), align=4)
        return context.get_dummy_value()
    return types.none(dst, dst_off, src, src_off, stride, n), codegen


@intrinsic
def abs_max(typingctx, v):
    """the largest |lane| (halves compared until one lane is left: no chain of scalar compares)"""
    if not (isinstance(v, Vector) and v.kind == "f32"):
        return None
    def codegen(context, builder, sig, args):
        magnitudes = _call(builder, f"llvm.fabs.v{v.lanes}f32", v.llvm, [args[0]])
        return _halving(builder, magnitudes, lambda lo, hi: _call(
            builder, f"llvm.maxnum.v{lo.type.count}f32", lo.type, [lo, hi]))
    return types.float32(v), codegen


@intrinsic
def prefetch(typingctx, arr, off):
    def codegen(context, builder, sig, args):
        i32, pointer = ir.IntType(32), _address(context, builder, sig, args, ir.IntType(8))
        # llvm.prefetch(address, read, keep in all levels, data cache)
        _call(builder, "llvm.prefetch.p0", ir.VoidType(), [pointer, ir.Constant(i32, 0), ir.Constant(i32, 3),
                                                          ir.Constant(i32, 1)])
        return context.get_dummy_value()
    return types.none(arr, off), codegen
