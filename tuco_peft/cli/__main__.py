"""``python -m tuco_peft.cli``, as ``torchrun -m tuco_peft.cli`` launches each rank."""

import sys

from . import main

sys.exit(main())
