"""``python -m router.ctl``: the same as the ``routerctl`` command."""

from router.ctl.cli import main

main()
