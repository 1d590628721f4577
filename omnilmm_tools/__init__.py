"""Command-line tools around the OmniLMM remote-code files (conversion, chat, fine-tuning, benchmarks).

Nothing in this package is copied into a model folder; the remote code lives in the flat
``*_omnilmm.py`` / ``resampler.py`` files at the repository root.
"""
