"""Host LAPACK eigensolvers that release the GIL, for the CPU diagnostics thread pool.

scipy.linalg's f2py wrappers hold the GIL while LAPACK runs, so a pool of threads calling them
runs one call at a time (measured on 2 cores: syevr 0.91x, sytrd 1.11x, svdvals 0.95x in two
threads, against 1.96x for numpy's eigvalsh). The very same LAPACK routines are reached here
through scipy.linalg.cython_lapack's function pointers and ctypes, which releases the GIL for
each foreign call. Arrays are passed as column-major; every matrix here is symmetric, so a
C-ordered copy is the same matrix.

  top_eigh(g, n)             the n largest eigenpairs (syevr, one tridiagonalisation, MRRR)
  eigvalsh_and_top(g, n)     every eigenvalue and the top n eigenvectors from one
                             tridiagonalisation (sytrd, sterf, stemr, ormtr)

Both return eigenvalues in descending order and eigenvectors as the columns of an n_rows x n
array. Without the capsules (another scipy) they fall back to scipy.linalg, GIL and all.
"""
from __future__ import annotations

import ctypes
import functools

import numpy as np

_C = ctypes.POINTER(ctypes.c_char)
_I = ctypes.POINTER(ctypes.c_int)
# argument kinds: c = char*, i = int*, s = scalar real*, a = real array
_SIGNATURES = {
    "syevr": "cccia" "i" "ss" "ii" "s" "i" "aa" "i" "i" "a" "i" "i" "i" "i",
    "sytrd": "cia" "i" "aaa" "a" "i" "i",
    "sterf": "iaai",
    "stemr": "cci" "aa" "ss" "ii" "i" "aa" "i" "i" "i" "i" "a" "i" "i" "i" "i",
    "ormtr": "ccc" "ii" "a" "i" "a" "a" "i" "a" "i" "i",
}
_PREFIX = {np.dtype(np.float32): "s", np.dtype(np.float64): "d"}


@functools.cache
def _routine(name: str):
    """ctypes function for LAPACK routine `name` (e.g. "dsyevr") or None when unavailable."""
    try:
        import scipy.linalg.cython_lapack as cl

        capsule = cl.__pyx_capi__[name]
    except (ImportError, AttributeError, KeyError):  # pragma: no cover - another scipy
        return None
    get_name = ctypes.pythonapi.PyCapsule_GetName
    get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    get_ptr = ctypes.pythonapi.PyCapsule_GetPointer
    get_ptr.restype, get_ptr.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    real = ctypes.POINTER(ctypes.c_float if name[0] == "s" else ctypes.c_double)
    kinds = {"c": _C, "i": _I, "s": real, "a": real}
    proto = ctypes.CFUNCTYPE(None, *(kinds[k] for k in _SIGNATURES[name[1:]]))
    return proto(get_ptr(capsule, get_name(capsule)))


def available() -> bool:
    return all(_routine(p + r) is not None for p in "sd" for r in _SIGNATURES)


class _Call:
    """Keeps the ctypes scalars and array pointers of one LAPACK call alive and typed."""

    def __init__(self, dtype):
        self.ctype = ctypes.c_float if dtype == np.float32 else ctypes.c_double
        self.real = ctypes.POINTER(self.ctype)
        self._keep = []

    def c(self, ch: str):
        x = ctypes.c_char(ch.encode())
        self._keep.append(x)
        return ctypes.byref(x)

    def i(self, v: int = 0):
        x = ctypes.c_int(v)
        self._keep.append(x)
        return x

    def s(self, v: float = 0.0):
        x = self.ctype(v)
        self._keep.append(x)
        return ctypes.byref(x)

    def a(self, arr: np.ndarray):
        return arr.ctypes.data_as(self.real)

    def ia(self, arr: np.ndarray):
        return arr.ctypes.data_as(_I)


def _check(info: ctypes.c_int, name: str) -> None:
    if info.value != 0:
        raise np.linalg.LinAlgError(f"LAPACK {name} failed (info={info.value})")


def _run(k: _Call, fn, head: tuple, dtype, name: str, *, iwork: bool) -> None:
    """fn(*head, work, lwork, [iwork, liwork], info): LAPACK's lwork = -1 size query, then the call."""
    info = k.i()
    wq, iwq = np.empty(1, dtype), np.empty(1, np.intc)
    query = (k.a(wq), ctypes.byref(k.i(-1))) + ((k.ia(iwq), ctypes.byref(k.i(-1))) if iwork else ())
    fn(*head, *query, ctypes.byref(info))
    _check(info, name + " workspace query")
    work = np.empty(max(1, int(wq[0])), dtype)
    args = (k.a(work), ctypes.byref(k.i(work.size)))
    if iwork:
        iw = np.empty(max(1, int(iwq[0])), np.intc)
        args += (k.ia(iw), ctypes.byref(k.i(iw.size)))
    fn(*head, *args, ctypes.byref(info))
    _check(info, name)


def top_eigh(g: np.ndarray, n_vec: int) -> tuple[np.ndarray, np.ndarray]:
    """(top n_vec eigenvalues descending, their eigenvectors as columns) of a symmetric g."""
    g = np.asarray(g)
    n = g.shape[0]
    n_vec = max(1, min(int(n_vec), n))
    fn = _routine(_PREFIX[g.dtype] + "syevr")
    if fn is None:  # pragma: no cover
        import scipy.linalg

        lam, vec = scipy.linalg.eigh(g, subset_by_index=[n - n_vec, n - 1], driver="evr", check_finite=False)
        return lam[::-1], vec[:, ::-1]
    k = _Call(g.dtype)
    a = np.array(g, order="C", copy=True)
    w = np.empty(n, g.dtype)
    z = np.empty((n_vec, n), g.dtype)  # column-major n x n_vec
    isuppz = np.empty(2 * n_vec, np.intc)
    m = k.i()
    head = (k.c("V"), k.c("I"), k.c("L"), ctypes.byref(k.i(n)), k.a(a), ctypes.byref(k.i(n)), k.s(), k.s(),
            ctypes.byref(k.i(n - n_vec + 1)), ctypes.byref(k.i(n)), k.s(), ctypes.byref(m), k.a(w), k.a(z),
            ctypes.byref(k.i(n)), k.ia(isuppz))
    _run(k, fn, head, g.dtype, "syevr", iwork=True)
    if m.value != n_vec:
        raise np.linalg.LinAlgError(f"LAPACK syevr returned {m.value} of {n_vec} eigenpairs")
    return w[:n_vec][::-1].copy(), z[::-1].T.copy()


def eigvalsh_and_top(g: np.ndarray, n_vec: int) -> tuple[np.ndarray, np.ndarray]:
    """(every eigenvalue descending, top n_vec eigenvectors as columns) from one tridiagonalisation.

    eigvalsh followed by a subset eigh would reduce g twice, and the reduction is most of the
    cost: sytrd once, then sterf for the values, stemr for the few tridiagonal eigenvectors and
    ormtr to bring them back.
    """
    g = np.asarray(g)
    n = g.shape[0]
    n_vec = max(1, min(int(n_vec), n))
    p = _PREFIX[g.dtype]
    fns = [_routine(p + r) for r in ("sytrd", "sterf", "stemr", "ormtr")]
    if n < 3 or any(f is None for f in fns):
        lam, vec = np.linalg.eigh(g)
        return lam[::-1], vec[:, ::-1][:, :n_vec].copy()
    sytrd, sterf, stemr, ormtr = fns
    k = _Call(g.dtype)
    a = np.array(g, order="C", copy=True)
    d, e, tau = np.empty(n, g.dtype), np.zeros(n, g.dtype), np.empty(n - 1, g.dtype)
    head = (k.c("L"), ctypes.byref(k.i(n)), k.a(a), ctypes.byref(k.i(n)), k.a(d), k.a(e), k.a(tau))
    _run(k, sytrd, head, g.dtype, "sytrd", iwork=False)

    info = k.i()
    lam, e_copy = d.copy(), e[:n - 1].copy()
    sterf(ctypes.byref(k.i(n)), k.a(lam), k.a(e_copy), ctypes.byref(info))
    _check(info, "sterf")

    d2, e2 = d.copy(), e.copy()  # stemr overwrites both; e needs length n
    w = np.empty(n, g.dtype)
    z = np.empty((n_vec, n), g.dtype)
    isuppz = np.empty(2 * n_vec, np.intc)
    m, tryrac = k.i(), k.i(1)
    head = (k.c("V"), k.c("I"), ctypes.byref(k.i(n)), k.a(d2), k.a(e2), k.s(), k.s(),
            ctypes.byref(k.i(n - n_vec + 1)), ctypes.byref(k.i(n)), ctypes.byref(m), k.a(w), k.a(z),
            ctypes.byref(k.i(n)), ctypes.byref(k.i(n_vec)), k.ia(isuppz), ctypes.byref(tryrac))
    _run(k, stemr, head, g.dtype, "stemr", iwork=True)  # the size query leaves d2, e2 untouched
    if m.value != n_vec:
        raise np.linalg.LinAlgError(f"LAPACK stemr returned {m.value} of {n_vec} eigenpairs")

    head = (k.c("L"), k.c("L"), k.c("N"), ctypes.byref(k.i(n)), ctypes.byref(k.i(n_vec)), k.a(a),
            ctypes.byref(k.i(n)), k.a(tau), k.a(z), ctypes.byref(k.i(n)))
    _run(k, ormtr, head, g.dtype, "ormtr", iwork=False)
    return lam[::-1].copy(), z[::-1].T.copy()
