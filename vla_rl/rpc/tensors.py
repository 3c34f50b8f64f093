"""numpy arrays <-> `vla_rl.v1.Tensor` (C-order little-endian bytes + shape + dtype name).

`from_tensor` is the trust boundary for arrays from the wire: every mismatch is a ValueError,
which the servicers turn into INVALID_ARGUMENT.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

import numpy as np

from vla_rl.rpc.gen.v1 import common_pb2

# The dtypes that may cross the wire, by numpy name. An allow-list, so that a peer can never make
# us build object, string or datetime arrays from bytes.
WIRE_DTYPES: frozenset[str] = frozenset(
    {
        "bool",
        "uint8",
        "int8",
        "uint16",
        "int16",
        "uint32",
        "int32",
        "uint64",
        "int64",
        "float16",
        "float32",
        "float64",
    }
)


def to_tensor(array: np.ndarray) -> common_pb2.Tensor:
    """Packs an array (any layout or byte order) as a Tensor."""
    array = np.asarray(array)
    name = array.dtype.name
    if name not in WIRE_DTYPES:
        raise ValueError(f"dtype {name!r} cannot be sent; allowed: {sorted(WIRE_DTYPES)}")
    # The wire is little-endian C order whatever this machine or the array's strides are.
    wire = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return common_pb2.Tensor(data=wire.tobytes(), shape=list(array.shape), dtype=name)


def from_tensor(
    tensor: common_pb2.Tensor,
    *,
    expect_dtype: str | np.dtype | type | None = None,
    expect_ndim: int | Collection[int] | None = None,
    expect_shape: Sequence[int | None] | None = None,
    max_bytes: int | None = None,
    copy: bool = False,
) -> np.ndarray:
    """Unpacks a Tensor after checking it against its own header and the caller's expectations.

    expect_ndim: one rank or a set of allowed ranks (e.g. {1, 2} for an action or a chunk).
    expect_shape: exact shape with None for free dims, e.g. (None, None, None, 3) for images.
    max_bytes: upper bound on the payload, checked before anything else.
    copy: the default result is a read-only view of the message bytes; copy=True makes it
        writable (torch.from_numpy warns on read-only arrays).
    """
    nbytes = len(tensor.data)
    if max_bytes is not None and nbytes > max_bytes:
        raise ValueError(f"tensor payload is {nbytes} bytes, more than the limit of {max_bytes}")
    if tensor.dtype not in WIRE_DTYPES:
        raise ValueError(f"unknown tensor dtype {tensor.dtype!r}; allowed: {sorted(WIRE_DTYPES)}")
    dtype = np.dtype(tensor.dtype)
    if expect_dtype is not None and dtype != np.dtype(expect_dtype):
        raise ValueError(f"expected dtype {np.dtype(expect_dtype).name}, got {dtype.name}")

    shape = tuple(tensor.shape)
    if any(d < 0 for d in shape):
        raise ValueError(f"tensor shape {list(shape)} has a negative dim")
    if expect_ndim is not None:
        allowed = {expect_ndim} if isinstance(expect_ndim, int) else set(expect_ndim)
        if len(shape) not in allowed:
            want = " or ".join(str(n) for n in sorted(allowed))
            raise ValueError(f"expected a {want}-d tensor, got shape {list(shape)}")
    if expect_shape is not None and (
        len(shape) != len(expect_shape)
        or any(w is not None and w != d for w, d in zip(expect_shape, shape, strict=True))
    ):
        want = ["*" if w is None else w for w in expect_shape]
        raise ValueError(f"expected shape {want}, got {list(shape)}")

    # Python ints: a crafted shape cannot overflow the product.
    want_bytes = math.prod(shape) * dtype.itemsize
    if nbytes != want_bytes:
        raise ValueError(
            f"tensor of shape {list(shape)} and dtype {dtype.name} needs {want_bytes} bytes, "
            f"got {nbytes}"
        )

    array = np.frombuffer(tensor.data, dtype=dtype.newbyteorder("<")).reshape(shape)
    if dtype == np.bool_ and array.size and np.frombuffer(tensor.data, np.uint8).max() > 1:
        # numpy would keep other byte values as "true" bools that compare unequal to True.
        raise ValueError("bool tensor holds bytes other than 0 and 1")
    if array.dtype != dtype:  # big-endian host: give back native byte order
        array = array.astype(dtype)
    return array.copy() if copy else array
