"""Interoperability with metatrain and metatomic: metatrain options files
(:func:`translate_options`: ``python -m pl_mtt.train options=options.yaml``) and their
schema (:mod:`pl_mtt.interop.options_schema`); metatomic export and the ASE calculator
live here too. This layer sits on top: it uses the config grammar, the data layer and the
model adapters (:class:`pl_mtt.models.MetatrainModel`), and nothing below imports it
except the app's entry point.
"""

from pl_mtt.interop.options import (
    OptionsTranslation,
    format_not_acted_on,
    read_options,
    translate_options,
)
from pl_mtt.interop.options_schema import check_base_options

__all__ = [
    "OptionsTranslation",
    "check_base_options",
    "format_not_acted_on",
    "read_options",
    "translate_options",
]
