"""Optional dependencies, imported when first needed, with an error naming what to install."""

from __future__ import annotations

from g3n.errors import G3nError


def import_llama_cpp(purpose: str):
    try:
        import llama_cpp
    except ImportError:
        raise G3nError(f"{purpose} uses llama.cpp: pip install llama-cpp-python (or g3n[llama])") from None
    return llama_cpp
