"""bitstable/_launch.py's recognition of Triton 3.6's launcher (CPU: no kernel runs).

The direct path calls the C launcher without Triton's per-call descriptor wrapper only
when the compiled kernel's launcher has the wrapper's exact shape; these tests build
launchers of that shape (and of others) and check what would be passed to the C launcher
equals what the wrapper passes, and that other shapes keep their own launcher.  The GPU
test (tests/test_direct_launch.py) checks the bits of real launches through this path."""

from bitstable import _launch

#: What the wrapper's module holds in Triton 3.6 (read from the wrapper's globals).
_BASE_ARGS_FORMAT_LEN = 13


def make_tensordesc_arg(arg, meta):
    """A stand-in expansion: a descriptor becomes its fields and the metadata's tag."""
    return [("base", arg), ("shape", arg), meta]


def _wrap(launcher, desc_positions, metas):
    """A wrapper of Triton 3.6's shape: the first 13 fields pass, descriptor arguments expand."""
    tensordesc_indices = set(desc_positions)
    tensordesc_meta = metas

    def inner(*args):
        out = list(args[:_BASE_ARGS_FORMAT_LEN])
        j = 0
        for i, a in enumerate(args[_BASE_ARGS_FORMAT_LEN:]):
            if i in tensordesc_indices:
                out.extend(make_tensordesc_arg(a, tensordesc_meta[j]))
                j += 1
            else:
                out.append(a)
        return launcher(*out)
    return inner


class CudaLauncher:
    def __init__(self, launch, scratch=0):
        self.launch = launch
        self.global_scratch_size = scratch
        self.profile_scratch_size = 0
        self.launch_cooperative_grid = False
        self.launch_pdl = True

    def __call__(self, gridX, gridY, gridZ, stream, function, *args):
        self.launch(gridX, gridY, gridZ, stream, function, self.launch_cooperative_grid, self.launch_pdl,
                    None, None, *args)


class _Compiled:
    def __init__(self, run):
        self.run = run
        self.function = 77
        self.packed_metadata = (4, 1, 0)


def _record():
    seen = []
    return seen, (lambda *a: seen.append(a))


def test_the_raw_launch_passes_what_the_descriptor_wrapper_passes():
    args = tuple(range(100, 110))
    for positions in ((), (1,), (1, 2), (0, 5, 9)):
        metas = [f"m{p}" for p in positions]
        wrapped_seen, wrapped_c = _record()
        compiled = _Compiled(CudaLauncher(_wrap(wrapped_c, positions, metas)))
        compiled.run(1, 2, 3, 9, compiled.function, compiled.packed_metadata, None, None, None, *args)

        raw_seen, raw_c = _record()
        direct = _launch._Direct(_Compiled(CudaLauncher(_wrap(raw_c, positions, metas))))
        assert direct.raw is raw_c and direct.pdl is True and direct.cooperative is False
        values = _launch.expand_descriptors(args, direct.descs, direct.make_desc)
        direct.raw(1, 2, 3, 9, 77, direct.cooperative, direct.pdl, None, None, (4, 1, 0), None, None, None, *values)
        assert raw_seen == wrapped_seen, positions


def test_a_plain_c_launcher_is_called_as_is():
    direct = _launch._Direct(_Compiled(CudaLauncher(print)))   # a builtin: no wrapper
    assert direct.raw is print and direct.descs == ()


def test_other_launchers_keep_their_own_path():
    def other_shape(*args):    # a closure over other names
        return len(args)
    assert _launch._Direct(_Compiled(CudaLauncher(other_shape))).raw is None
    scratch = CudaLauncher(_wrap(print, (1,), ["m"]), scratch=64)   # needs a scratch buffer
    assert _launch._Direct(_Compiled(scratch)).raw is None

    class CudaLauncherNewer(CudaLauncher):   # Triton 3.8's: metadata and hooks are named fields
        def __call__(self, gridX, gridY, gridZ, stream, function, kernel_metadata, launch_metadata,
                     enter, exit, *args):
            pass
    CudaLauncherNewer.__name__ = "CudaLauncher"
    assert _launch._Direct(_Compiled(CudaLauncherNewer(print))).raw is None
