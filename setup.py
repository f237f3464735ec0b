"""setuptools hook (the project's metadata is in pyproject.toml): a built wheel carries the Hydra configs.

The top-level ``configs/`` folder is copied into the wheel as ``qrepro/configs``, so an installed qrepro
composes its configs without a checkout (``qrepro.cli.CONFIG_DIR`` picks the checkout's ``configs/`` when
there is one). Editable installs read the checkout's ``configs/`` directly and get no copy.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CONFIGS = Path(__file__).resolve().parent / "configs"


class BuildPyWithConfigs(build_py):
    def run(self):
        super().run()
        if self.editable_mode:
            return
        dst = Path(self.build_lib) / "qrepro" / "configs"
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(CONFIGS, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(cmdclass={"build_py": BuildPyWithConfigs})
