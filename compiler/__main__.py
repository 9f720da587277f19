"""`python -m compiler ...`: see compiler.cli."""
import sys

from compiler.cli import main

sys.exit(main())
