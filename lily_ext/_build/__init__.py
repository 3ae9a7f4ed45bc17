"""Private plumbing: building and loading the native libraries, and writing files atomically.

``toolkit``, ``ort_library`` and ``atomic`` use the standard library only: ``setup.py`` loads this
package by path before anything is built. ``library`` and ``info`` need torch and the built ``_C``.
"""
