"""A fake Cloud Storage for tests: `gs://<bucket>/<key>` is stored at `<root>/<bucket>/<key>`.

Inside `with fake_gcs(root):` every etils epath call on a gs:// path (what `patch_forcing.paths`
uses) goes to that folder through epath's own mock backend, and `paths.native` (what libraries
with their own gs:// client get: orbax/tensorstore, array_record's reader, TensorBoard) maps the
same way. So the code runs with gs:// strings end to end; a local-file call on one (the bug this
guards against: `os.makedirs('gs://b/x')` makes `./gs:/b/x`) shows up as a `gs:` folder under
the working directory, which the tests check is absent.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from unittest import mock

from etils.epath import gpath, testing

from patch_forcing import paths

PREFIX = "gs://"


@contextlib.contextmanager
def fake_gcs(root: Path):
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)

    def to_local(p) -> str:
        s = os.fspath(p)
        return str(root / s[len(PREFIX):]) if s.startswith(PREFIX) else s

    def to_gs(p) -> str:
        s = os.fspath(p)
        return PREFIX + os.path.relpath(s, root) if s.startswith(str(root) + os.sep) else s

    def one(fn, p, *args, **kwargs):
        return fn(to_local(p), *args, **kwargs)

    def write_parent(p):  # an object store has no folders: writing a key needs no mkdir
        if os.fspath(p).startswith(PREFIX):
            os.makedirs(os.path.dirname(to_local(p)), exist_ok=True)

    def open_(fn, p, mode):
        if any(m in mode for m in "wa"):
            write_parent(p)
        return fn(to_local(p), mode)

    def two(fn, src, dst, **kwargs):
        write_parent(dst)
        return fn(to_local(src), to_local(dst), **kwargs)

    def glob(fn, pattern):  # gs:// in, gs:// out; local stays local
        remote = os.fspath(pattern).startswith(PREFIX)
        return [to_gs(p) if remote else p for p in fn(to_local(pattern))]

    def walk(fn, top, **kwargs):
        remote = os.fspath(top).startswith(PREFIX)
        for d, dirs, files in fn(to_local(top), **kwargs):
            yield to_gs(d) if remote else d, dirs, files

    real_native = paths.native
    with contextlib.ExitStack() as stack:
        stack.enter_context(testing.mock_epath(
            open=open_, exists=one, isdir=one, listdir=one, makedirs=one, mkdir=one, remove=one, rmtree=one,
            stat=one, rename=two, replace=two, copy=two, glob=glob, walk=walk))
        # With TensorFlow installed epath sends gs:// to tf.io.gfile past the mocked backends.
        stack.enter_context(mock.patch.object(gpath, "_is_tf_installed", lambda: False))
        stack.enter_context(mock.patch.object(paths, "native", lambda p: to_local(real_native(p))))
        yield root
