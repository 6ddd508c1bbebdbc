import os
import sys

# tests/engine/engine_toy.py is imported by the tests and run as a script by the multi-process ones.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
