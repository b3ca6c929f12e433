"""Package discovery: every package under tuco_peft/, and the kernels/ folder as tuco_peft.kernels."""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["tuco_peft", "tuco_peft.*"]), "tuco_peft.kernels"])
