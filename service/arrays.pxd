"""Checked raw access to numpy arrays, for the compiled modules.

A typed memoryview argument (``const int64_t[::1] a``) costs ~130 ns to take: the
buffer's format string is parsed and an object is made, for every array of every
call (``timeit``, docs/PERFORMANCE.md). These read the dtype, dimensions, byte order
and layout from the array's header and return its data pointer, in a few ns. What a
memoryview refuses they refuse too, with ValueError (TypeError for something that is
not an array). ``cimport`` them; they compile into each module that uses them.
"""

cimport numpy as cnp
from libc.stdint cimport int32_t, int64_t, uint8_t, uint64_t


cdef inline char* _data(object a, int typenum, int ndim, bint writable) except? NULL:
    if not cnp.PyArray_Check(a):
        raise TypeError(f"expected a numpy array, got {type(a).__name__}")
    cdef cnp.ndarray array = <cnp.ndarray>a
    if (
        not cnp.PyArray_EquivTypenums(cnp.PyArray_TYPE(array), typenum)
        or cnp.PyArray_NDIM(array) != ndim
        or not cnp.PyArray_IS_C_CONTIGUOUS(array)
        or not cnp.PyArray_ISNOTSWAPPED(array)
    ):
        raise ValueError(
            f"expected a C-contiguous {ndim}-D {cnp.PyArray_DescrFromType(typenum)} array, "
            f"got {a.dtype} of shape {a.shape}"
        )
    if writable and not cnp.PyArray_ISWRITEABLE(array):
        raise ValueError("the array to write into is read-only")
    return <char*>cnp.PyArray_DATA(array)


cdef inline Py_ssize_t dim0(object a) noexcept:
    """The first dimension of an array the helpers below accepted."""
    return cnp.PyArray_DIM(<cnp.ndarray>a, 0)


cdef inline Py_ssize_t dim1(object a) noexcept:
    """The second dimension of a 2-D array the helpers below accepted."""
    return cnp.PyArray_DIM(<cnp.ndarray>a, 1)


cdef inline Py_ssize_t first_outside(
    const int64_t* at, Py_ssize_t n, Py_ssize_t size
) noexcept nogil:
    """The first of ``at[:n]`` that is not a row of ``size`` rows (-1: every one is): a
    caller checks every row before it writes any, and names the row it refuses."""
    cdef Py_ssize_t i
    for i in range(n):
        if at[i] < 0 or at[i] >= size:
            return i
    return -1


cdef inline const int64_t* i64(object a) except? NULL:
    return <const int64_t*>_data(a, cnp.NPY_INT64, 1, False)


cdef inline int64_t* i64_out(object a) except? NULL:
    return <int64_t*>_data(a, cnp.NPY_INT64, 1, True)


cdef inline const uint64_t* u64(object a) except? NULL:
    return <const uint64_t*>_data(a, cnp.NPY_UINT64, 1, False)


cdef inline uint64_t* u64_out(object a) except? NULL:
    return <uint64_t*>_data(a, cnp.NPY_UINT64, 1, True)


cdef inline int32_t* i32_out(object a) except? NULL:
    return <int32_t*>_data(a, cnp.NPY_INT32, 1, True)


cdef inline const int32_t* i32(object a) except? NULL:
    return <const int32_t*>_data(a, cnp.NPY_INT32, 1, False)


cdef inline const double* f64(object a) except? NULL:
    return <const double*>_data(a, cnp.NPY_FLOAT64, 1, False)


cdef inline double* f64_out(object a) except? NULL:
    return <double*>_data(a, cnp.NPY_FLOAT64, 1, True)


cdef inline const uint8_t* flags(object a) except? NULL:
    """A bool (or uint8) vector's bytes: 0 is false, anything else true."""
    if cnp.PyArray_Check(a) and cnp.PyArray_TYPE(<cnp.ndarray>a) == cnp.NPY_UINT8:
        return <const uint8_t*>_data(a, cnp.NPY_UINT8, 1, False)
    return <const uint8_t*>_data(a, cnp.NPY_BOOL, 1, False)


cdef inline uint8_t* flags_out(object a) except? NULL:
    return <uint8_t*>_data(a, cnp.NPY_BOOL, 1, True)


cdef inline const float* f32_rows(object a) except? NULL:
    """A ``[n, k]`` float32 array's data, row after row."""
    return <const float*>_data(a, cnp.NPY_FLOAT32, 2, False)


cdef inline float* f32_rows_out(object a) except? NULL:
    return <float*>_data(a, cnp.NPY_FLOAT32, 2, True)


cdef inline char* any_rows(object a) except? NULL:
    """A C-contiguous array's data, of any dtype and at least one dimension: rows along
    the first axis, ``row_bytes(a)`` each."""
    if not cnp.PyArray_Check(a):
        raise TypeError(f"expected a numpy array, got {type(a).__name__}")
    cdef cnp.ndarray array = <cnp.ndarray>a
    if (
        cnp.PyArray_NDIM(array) < 1
        or not cnp.PyArray_IS_C_CONTIGUOUS(array)
        or not cnp.PyArray_ISNOTSWAPPED(array)
    ):
        raise ValueError(f"expected a C-contiguous array of rows, got {a.dtype} {a.shape}")
    return <char*>cnp.PyArray_DATA(array)


cdef inline Py_ssize_t row_bytes(object a) noexcept:
    """The bytes of one row (along the first axis) of an array ``any_rows`` accepted."""
    cdef cnp.ndarray array = <cnp.ndarray>a
    cdef Py_ssize_t size = cnp.PyArray_ITEMSIZE(array), d
    for d in range(1, cnp.PyArray_NDIM(array)):
        size *= cnp.PyArray_DIM(array, d)
    return size


cdef inline object empty_rows_like(object a, Py_ssize_t n):
    """An uninitialised array of ``n`` rows shaped and typed as ``a``'s."""
    cdef cnp.ndarray array = <cnp.ndarray>a
    cdef cnp.npy_intp dims[8]
    cdef int nd = cnp.PyArray_NDIM(array), d
    if nd > 8:
        raise ValueError(f"{nd} dimensions")
    dims[0] = n
    for d in range(1, nd):
        dims[d] = cnp.PyArray_DIM(array, d)
    return cnp.PyArray_EMPTY(nd, dims, cnp.PyArray_TYPE(array), 0)
