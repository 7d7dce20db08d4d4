"""Maps the top-level folders into the ``effinfer`` namespace.

``core/`` installs as ``effinfer.core``, ``plugins/model/quantization`` as
``effinfer.plugins.model.quantization`` and so on, so no top-level ``core`` or
``kernels`` package ever lands in site-packages. ``effinfer`` itself is an
implicit namespace package. Everything else lives in pyproject.toml.
"""

from setuptools import find_packages, setup

FOLDERS = ("core", "data", "plugins", "taxonomy", "kernels", "evaluation", "tools")

package_dir: dict[str, str] = {}
packages: list[str] = []
for folder in FOLDERS:
    package_dir[f"effinfer.{folder}"] = folder
    packages.append(f"effinfer.{folder}")
    packages += [f"effinfer.{folder}.{sub}" for sub in find_packages(folder)]

setup(package_dir=package_dir, packages=packages)
