"""The ``lily-ext`` command-line application: demo, train, export, bench, info.

Built on the library (``lily_ext``) and never imported by it.
"""
