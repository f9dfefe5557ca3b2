"""``python -m spherical_channels.cli``: the ``scn`` command (e.g. under ``torchrun``)."""

from . import main

raise SystemExit(main())
