"""An in-process fake ``gs://bucket`` for etils.epath (tests of gs:// paths without a network)."""

from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def fake_bucket(local_dir):
    """Route ``gs://bucket/...`` to ``local_dir`` in every epath backend call (etils' mock_epath);
    counts the calls that named a gs:// path."""
    from etils.epath import testing

    calls = {"n": 0}
    prefix = "gs://bucket"

    def to_local(p):
        p = os.fspath(p)
        if p.startswith(prefix):
            calls["n"] += 1
            return str(local_dir) + p[len(prefix) :]
        return p

    def to_remote(p):
        return prefix + p[len(str(local_dir)) :] if p.startswith(str(local_dir)) else p

    def wrap(name):
        def fn(orig, path, *a, **k):
            if name in ("rename", "replace", "copy"):
                a = (to_local(a[0]), *a[1:])
            out = orig(to_local(path), *a, **k)
            if name == "glob":
                return [to_remote(x) for x in out]
            if name == "walk":
                return ((to_remote(d), ds, fs) for d, ds, fs in out)
            return out

        return fn

    names = ("open", "exists", "isdir", "listdir", "glob", "makedirs", "mkdir", "stat", "walk", "remove")
    with testing.mock_epath(**{n: wrap(n) for n in names}):
        yield calls
