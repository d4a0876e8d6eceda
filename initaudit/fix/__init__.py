"""``--fix``: turn an audit's findings into a plan, apply it to a copy of the model file, and
re-audit what was written. See :mod:`initaudit.fix.command` for the entry point."""
