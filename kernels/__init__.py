"""Triton kernels of tuco-peft, installed as ``tuco_peft.kernels``."""
