"""Builds the compiled decoders (``cdc/decoding/_native.pyx``, ``_copy.pyx``); pyproject.toml has the rest.

The extension is optional: without Cython or a C compiler the install goes on and cdc
decodes in pure Python (it warns at start; ``CDC_PURE_PYTHON=1`` chooses that explicitly).
"""

from __future__ import annotations

import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """build_ext that warns instead of failing: the pure-Python decoder is the fallback."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any compiler or Cython failure
            print(f"WARNING: cdc's compiled decoder was not built ({exc}); cdc will decode "
                  "in pure Python", file=sys.stderr)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            print(f"WARNING: building {ext.name} failed ({exc}); cdc will decode in pure "
                  "Python", file=sys.stderr)


def extensions() -> list[Extension]:
    try:
        from Cython.Build import cythonize
    except ImportError:
        print("WARNING: Cython is missing; cdc will decode in pure Python", file=sys.stderr)
        return []
    return cythonize(  # type: ignore[no-any-return]
        [Extension(f"cdc.decoding.{name}", [f"cdc/decoding/{name}.pyx"],
                   extra_compile_args=["-O2"]) for name in ("_native", "_copy")],
        compiler_directives={"language_level": "3"}, quiet=True)


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
