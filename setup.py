"""Map the user's top-level folders onto the ``reflexarc`` namespace.

``edge/`` installs as ``reflexarc.edge``, ``fog/`` as ``reflexarc.fog`` and so
on, so nothing generic lands at the top level of site-packages. Sub-packages
are discovered, so adding ``hpc_bridge/compose/`` needs no edit here.
"""

from setuptools import find_packages, setup

TIERS = {"edge": "edge", "fog": "fog", "cloud": "cloud", "hpc_bridge": "hpc_bridge", "deploy": "deploy"}

package_dir = {"reflexarc": "reflexarc"}
packages = ["reflexarc", *(f"reflexarc.{p}" for p in find_packages("reflexarc"))]
for name, folder in TIERS.items():
    package_dir[f"reflexarc.{name}"] = folder
    packages.append(f"reflexarc.{name}")
    for sub in find_packages(folder):
        package_dir[f"reflexarc.{name}.{sub}"] = f"{folder}/{sub.replace('.', '/')}"
        packages.append(f"reflexarc.{name}.{sub}")

setup(package_dir=package_dir, packages=packages)
