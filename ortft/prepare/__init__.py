"""The host side: the only package that imports torch, transformers, peft and optimum (lazily).

`ortft.prepare.pipeline.prepare_bundle(PrepareConfig)` turns a model folder or GGUF file into a bundle.
"""
